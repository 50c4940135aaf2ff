"""Framebuffer and DRM entries of a display function, present while a graphics driver is bound.

A GPU driver registers ``graphics/fbN`` (fbdev) and ``drm/cardN`` plus
``drm/renderD<128+N>`` under the PCI function when it binds, with matching
``class/graphics`` and ``class/drm`` links and /dev/dri nodes, and removes them when
it unbinds. vfio-pci registers none of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.simulate.devices import VFIO_DRIVER, DeviceDescription
from agent.simulate.files import _symlink

# The DRM core numbers render nodes from minor 128, so the first one is renderD128.
_RENDER_MINOR_BASE = 128


def _display_names(devices: tuple[DeviceDescription, ...], spec: DeviceDescription) -> list[tuple[str, str]]:
    """Return (class, name) of each display entry of ``spec``, numbered in address order."""
    names = []
    if spec.framebuffer:
        index = sorted(d.address for d in devices if d.framebuffer).index(spec.address)
        names.append(("graphics", f"fb{index}"))
    if spec.drm:
        index = sorted(d.address for d in devices if d.drm).index(spec.address)
        names.append(("drm", f"card{index}"))
        names.append(("drm", f"renderD{_RENDER_MINOR_BASE + index}"))

    return names


def _sync_display(
    root: Path,
    dev_root: Path,
    devices: tuple[DeviceDescription, ...],
    device_dir: Path,
    spec: DeviceDescription,
    driver: str | None,
) -> None:
    """Create or remove the display entries of ``spec`` to match whether a graphics driver is bound."""
    bound = driver is not None and driver != VFIO_DRIVER
    for class_name, name in _display_names(devices, spec):
        entry_dir = device_dir / class_name / name
        class_link = root / "class" / class_name / name
        node = dev_root / "dri" / name
        if not bound:
            shutil.rmtree(entry_dir, ignore_errors=True)
            class_link.unlink(missing_ok=True)
            node.unlink(missing_ok=True)
            continue

        entry_dir.mkdir(parents=True, exist_ok=True)
        if not (entry_dir / "device").is_symlink():
            _symlink(entry_dir / "device", device_dir)
        if not class_link.is_symlink():
            class_link.parent.mkdir(parents=True, exist_ok=True)
            _symlink(class_link, entry_dir)
        if class_name == "drm":
            node.parent.mkdir(exist_ok=True)
            node.touch()
