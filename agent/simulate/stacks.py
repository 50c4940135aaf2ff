"""Sysfs entries of the interfaces and disks that the kernel stacks on others.

Bridges, bonds and VLANs live under ``devices/virtual/net`` with ``lower_*`` and
``upper_*`` links, bridge ports in ``brif`` and bond slaves in ``bonding/slaves``.
Device-mapper and md disks live under ``devices/virtual/block`` with ``slaves`` and
``holders`` links, as on Linux 6.x.

NOTE: the entries are laid out once at boot. When a port's or slave's PCI function is
removed later, its bridge, bond or disk keeps naming it, so its links dangle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.simulate.devices import VirtualBlockDescription, VirtualInterfaceDescription
from agent.simulate.files import _symlink, _write_file


def _add_virtual_interface(root: Path, interface: VirtualInterfaceDescription, lower: Sequence[str]) -> None:
    """Create ``interface`` over the already present interfaces ``lower``."""
    interface_dir = root / "devices" / "virtual" / "net" / interface.name
    interface_dir.mkdir(parents=True)
    _symlink(root / "class" / "net" / interface.name, interface_dir)
    if interface.kind == "bridge":
        (interface_dir / "bridge").mkdir()
        (interface_dir / "brif").mkdir()
    if interface.kind == "bond":
        _write_file(interface_dir / "bonding" / "slaves", " ".join(lower) + "\n", 0o644)

    for name in lower:
        lower_dir = Path(os.path.realpath(root / "class" / "net" / name))
        _symlink(interface_dir / f"lower_{name}", lower_dir)
        _symlink(lower_dir / f"upper_{interface.name}", interface_dir)
        if interface.kind != "vlan":
            _symlink(lower_dir / "master", interface_dir)
        if interface.kind == "bridge":
            (lower_dir / "brport").mkdir()
            _symlink(interface_dir / "brif" / name, lower_dir / "brport")


def _add_virtual_block_device(root: Path, disk: VirtualBlockDescription) -> None:
    """Create the dm or md disk ``disk`` over its already present slaves."""
    disk_dir = root / "devices" / "virtual" / "block" / disk.name
    (disk_dir / "slaves").mkdir(parents=True)
    (disk_dir / "holders").mkdir()
    _symlink(root / "class" / "block" / disk.name, disk_dir)
    _symlink(root / "block" / disk.name, disk_dir)
    if disk.dm_name is not None:
        _write_file(disk_dir / "dm" / "name", disk.dm_name + "\n", 0o444)

    for name in disk.slaves:
        slave_dir = Path(os.path.realpath(root / "class" / "block" / name))
        _symlink(disk_dir / "slaves" / name, slave_dir)
        (slave_dir / "holders").mkdir(exist_ok=True)
        _symlink(slave_dir / "holders" / disk.name, disk_dir)


def _lowest_first(below: Mapping[str, Sequence[str]]) -> list[str]:
    """Order names so that each comes after every name in ``below[name]`` that is a key too."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in below:
            return
        for lower in below[name]:
            visit(lower)
        ordered.append(name)

    for name in below:
        visit(name)

    return ordered
