"""Reading back the kernel state that an earlier process left in a simulated tree.

A real kernel outlives the agent, but the simulated kernel lives in the agent's process
and dies with it. Every piece of its state is also in the tree, so a new process reads
it from there. The present functions come from ``bus/pci/devices``, each function's
driver from its ``driver`` link and its override from ``driver_override``. The VFs of
a PF come from ``sriov_numvfs``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from agent.simulate.bus import _LiveDevice
from agent.simulate.devices import DeviceDescription

if TYPE_CHECKING:
    from agent.simulate.description import HostDescription


def _read_live_devices(root: Path, description: HostDescription) -> list[_LiveDevice]:
    """Return the functions present in the sysfs tree at ``root``, in address order.

    Raises:
        ValueError: the tree is not a simulated sysfs tree, was built from another
            description, or contains a state that no completed kernel write leaves.
    """
    devices_dir = root / "bus" / "pci" / "devices"
    drivers_dir = root / "bus" / "pci" / "drivers"
    if not devices_dir.is_dir() or not drivers_dir.is_dir():
        raise ValueError(
            f"{root} is not a simulated sysfs tree: bus/pci/devices or bus/pci/drivers is missing"
        )

    tree_drivers = {entry.name for entry in drivers_dir.iterdir()}
    if tree_drivers != description.drivers:
        raise ValueError(
            f"{root} has the drivers {sorted(tree_drivers)}, but host {description.host} loads "
            f"{sorted(description.drivers)}; was the tree built from another description?"
        )

    functions = _known_functions(description)
    devices = []
    for link in sorted(devices_dir.iterdir(), key=lambda entry: entry.name):
        known = functions.get(link.name)
        if known is None:
            raise ValueError(
                f"{root} has the PCI function {link.name}, but host {description.host} describes no "
                "such function or VF; was the tree built from another description?"
            )
        spec, physfn = known
        devices.append(_read_live_device(root, link, spec, physfn, description.drivers))

    _check_vf_counts(root, devices)

    return devices


def _known_functions(description: HostDescription) -> dict[str, tuple[DeviceDescription, str | None]]:
    """Map each address the host can have to its function and, for a VF, the address of its PF."""
    functions: dict[str, tuple[DeviceDescription, str | None]] = {}
    for spec in description.devices:
        functions[spec.address] = (spec, None)
        if spec.sriov is None:
            continue
        for index in range(spec.sriov.totalvfs):
            vf = spec.virtual_function(index)
            functions[vf.address] = (vf, spec.address)

    return functions


def _read_live_device(
    root: Path, link: Path, spec: DeviceDescription, physfn: str | None, drivers: frozenset[str]
) -> _LiveDevice:
    device_dir = Path(os.path.realpath(link))
    if not device_dir.is_dir() or root not in device_dir.parents:
        raise ValueError(f"{link} does not lead to a function directory under {root}")

    driver = None
    if (device_dir / "driver").is_symlink():
        driver = os.path.basename(os.readlink(device_dir / "driver"))
        if driver not in drivers:
            raise ValueError(
                f"{device_dir / 'driver'} names the driver {driver}, which the host does not load"
            )

    # The attribute shows "(null)" while no override is set, as the kernel prints a NULL string.
    override_text = (device_dir / "driver_override").read_text()
    override = override_text.split("\n", 1)[0]

    numvfs = 0
    if spec.sriov is not None:
        numvfs = _read_count(device_dir / "sriov_numvfs")

    return _LiveDevice(
        spec=spec,
        directory=PurePosixPath(device_dir.relative_to(root).as_posix()),
        physfn=physfn,
        driver=driver,
        driver_override=None if override == "(null)" else override,
        numvfs=numvfs,
    )


def _read_count(path: Path) -> int:
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} contains {text!r}, not a number")

    return int(text)


def _check_vf_counts(root: Path, devices: list[_LiveDevice]) -> None:
    """Check that each PF has exactly the VFs its sriov_numvfs counts.

    The simulated kernel adds or removes the VFs before it writes the count, so a
    process killed in between leaves a count that disagrees with the tree.
    """
    for pf in devices:
        if pf.spec.sriov is None:
            continue
        expected = {pf.spec.sriov.vf_address(index) for index in range(pf.numvfs)}
        present = {vf.spec.address for vf in devices if vf.physfn == pf.spec.address}
        if present != expected:
            raise ValueError(
                f"{root}: PF {pf.spec.address} has sriov_numvfs {pf.numvfs} but the VFs "
                f"{sorted(present) or 'none'} are present, so the process that changed them was "
                "killed mid-change. Build a new tree"
            )
