"""Reads of sysfs and procfs that map the host's own resources to the PCI functions under them.

Each reader takes the roots it needs, so the same code reads the real /sys, /proc and
/dev and a simulated tree. A file that does not exist reads as empty, because kernels
without a feature (IPv6, swap, fbdev) leave its file out.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from devpass.pci import PciAddress

# A full PCI address as sysfs names a function's directory: domain:bus:device.function.
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4,5}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# /proc/mounts and /proc/swaps escape space, tab, newline and backslash as octal.
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# Route flags from include/uapi/linux/route.h.
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
# The kernel accepts root=PARTUUID= and PARTLABEL=, and initramfs tools also UUID= and LABEL=.
# udev links each kind of name under /dev/disk.
_ROOT_NAME_LINKS = {
    "UUID": "by-uuid",
    "PARTUUID": "by-partuuid",
    "LABEL": "by-label",
    "PARTLABEL": "by-partlabel",
}
_VIRTUAL_TERMINAL = re.compile(r"^tty[0-9]+$")
_NVIDIA_MINOR = re.compile(r"^Device Minor:\s*([0-9]+)\s*$", re.MULTILINE)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts."""

    source: str
    mount_point: str
    fstype: str


@dataclass(frozen=True)
class Route:
    """One usable route of /proc/net/route or /proc/net/ipv6_route."""

    interface: str
    network: Network
    metric: int


def read_text(path: Path) -> str:
    """Return the file's text, or "" when it does not exist."""
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return ""


def owning_function(sysfs_root: Path, path: Path) -> PciAddress | None:
    """Return the PCI function a sysfs device lives on, or None for a virtual device.

    The function is the nearest component of ``path``'s resolved form that is a PCI
    address, as in devices/pci0000:00/0000:00:01.1/0000:01:00.0/nvme/nvme0/nvme0n1.
    """
    if not os.path.lexists(path):
        return None

    root = Path(os.path.realpath(sysfs_root))
    try:
        relative = Path(os.path.realpath(path)).relative_to(root)
    except ValueError:
        return None

    for part in reversed(relative.parts):
        if _PCI_ADDRESS.match(part):
            return PciAddress.parse(part)

    return None


def unescape(field: str) -> str:
    """Undo the octal escapes of /proc/mounts and /proc/swaps (``\\040`` is a space)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


# Block devices ---------------------------------------------------------------


def read_mounts(proc_root: Path) -> list[Mount]:
    mounts = []
    for line in read_text(proc_root / "mounts").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(unescape(fields[0]), unescape(fields[1]), fields[2]))

    return mounts


def read_swap_partitions(proc_root: Path) -> list[str]:
    """Return the active swap partitions. Swap files are left out, since their file system is a mount."""
    paths = []
    for line in read_text(proc_root / "swaps").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "partition":
            paths.append(unescape(fields[0]))

    return paths


def root_parameter(proc_root: Path) -> str | None:
    """Return the value of the last root= on the kernel command line, as the kernel uses it."""
    value = None
    for word in read_text(proc_root / "cmdline").split():
        if word == "--":
            break
        if word.startswith("root="):
            value = word.removeprefix("root=")

    return value


def root_device_path(root: str) -> str | None:
    """Return the /dev path of a root= value, or None when it names no node (like 259:1)."""
    if root.startswith("/dev/"):
        return root

    kind, separator, name = root.partition("=")
    if separator and kind in _ROOT_NAME_LINKS and name:
        return f"/dev/disk/{_ROOT_NAME_LINKS[kind]}/{name}"

    return None


def block_name(sysfs_root: Path, dev_root: Path, device_path: str) -> str | None:
    """Return the kernel's name (sysfs class/block) of the block device at ``device_path``.

    Links such as /dev/mapper/<name> or /dev/disk/by-uuid/<uuid> are followed inside
    ``dev_root``. A node under another name is found by its device number.
    """
    parts = PurePosixPath(device_path).parts
    if len(parts) < 3 or parts[:2] != ("/", "dev"):
        return None

    node = dev_root.joinpath(*parts[2:])
    name = Path(os.path.realpath(node)).name
    if (sysfs_root / "class" / "block" / name).exists():
        return name

    try:
        status = os.stat(node)
    except OSError:
        return None
    if not stat.S_ISBLK(status.st_mode):
        return None

    number = f"{os.major(status.st_rdev)}:{os.minor(status.st_rdev)}"
    target = sysfs_root / "dev" / "block" / number
    return Path(os.path.realpath(target)).name if target.exists() else None


def block_functions(sysfs_root: Path, name: str) -> set[PciAddress]:
    """Return the PCI functions that hold block device ``name``.

    A disk or partition on a PCI device has one. A device-mapper or md device has
    those of its ``slaves``, followed down to the disks. A partition of such a
    device (md0p1) takes the slaves of its whole device.
    """
    functions: set[PciAddress] = set()
    visited: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in visited:
            continue
        visited.add(current)

        device = sysfs_root / "class" / "block" / current
        address = owning_function(sysfs_root, device)
        if address is not None:
            functions.add(address)
            continue

        resolved = Path(os.path.realpath(device))
        pending.extend(_entries(resolved / "slaves"))
        if (resolved / "partition").exists():
            pending.extend(_entries(resolved.parent / "slaves"))

    return functions


# Network interfaces and routes -----------------------------------------------


def interface_functions(sysfs_root: Path, name: str) -> dict[PciAddress, str]:
    """Return each PCI function under interface ``name``, with its interface name there.

    A bridge, bond, VLAN or other stacked interface has no function of its own, so
    its lower interfaces are followed: ``lower_*`` links, bridge ports in ``brif``
    and bond slaves in ``bonding/slaves``.
    """
    functions: dict[PciAddress, str] = {}
    visited: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in visited:
            continue
        visited.add(current)

        interface_dir = sysfs_root / "class" / "net" / current
        if not interface_dir.exists():
            continue
        address = owning_function(sysfs_root, interface_dir)
        if address is not None:
            functions.setdefault(address, current)
            continue

        pending.extend(_lower_interfaces(interface_dir))

    return functions


def _lower_interfaces(interface_dir: Path) -> list[str]:
    names = [entry.removeprefix("lower_") for entry in _entries(interface_dir) if entry.startswith("lower_")]
    names += _entries(interface_dir / "brif")
    names += read_text(interface_dir / "bonding" / "slaves").split()

    return names


def read_routes(proc_root: Path) -> list[Route]:
    """Return the usable IPv4 and IPv6 routes of the main table: up and not reject routes."""
    return list(_ipv4_routes(proc_root)) + list(_ipv6_routes(proc_root))


def _ipv4_routes(proc_root: Path) -> Iterator[Route]:
    # Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask, ... The kernel
    # prints each network-order address as a host-order word, so the hex text is
    # byte-swapped on little-endian hosts.
    for line in read_text(proc_root / "net" / "route").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not _usable(int(fields[3], 16)):
            continue

        destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, sys.byteorder))
        mask = int.from_bytes(int(fields[7], 16).to_bytes(4, sys.byteorder), "big")
        network = ipaddress.IPv4Network((destination, mask.bit_count()), strict=False)
        yield Route(fields[0], network, int(fields[6]))


def _ipv6_routes(proc_root: Path) -> Iterator[Route]:
    # Destination, prefix length, source, source prefix length, next hop, metric,
    # reference count, use count, flags, interface: all hex but the interface.
    for line in read_text(proc_root / "net" / "ipv6_route").splitlines():
        fields = line.split()
        if len(fields) < 10 or not _usable(int(fields[8], 16)):
            continue

        destination = ipaddress.IPv6Address(int(fields[0], 16))
        network = ipaddress.IPv6Network((destination, int(fields[1], 16)), strict=False)
        yield Route(fields[9], network, int(fields[5], 16))


def _usable(flags: int) -> bool:
    return bool(flags & _RTF_UP) and not flags & _RTF_REJECT


def route_to(routes: list[Route], address: Address) -> Route | None:
    """Return the route the kernel picks for ``address``: the longest prefix, then the lowest metric."""
    matching = [route for route in routes if route.network.version == address.version]
    matching = [route for route in matching if address in route.network]
    if not matching:
        return None

    return max(matching, key=lambda route: (route.network.prefixlen, -route.metric))


# Consoles and displays -------------------------------------------------------


def virtual_terminal_consoles(proc_root: Path) -> list[str]:
    """Return the kernel consoles on a virtual terminal (tty0 to ttyN, not ttyS0)."""
    names = [line.split()[0] for line in read_text(proc_root / "consoles").splitlines() if line.split()]

    return [name for name in names if _VIRTUAL_TERMINAL.match(name)]


def display_entries(sysfs_root: Path, address: PciAddress) -> list[str]:
    """Return the framebuffers (fbN) and DRM cards (cardN) whose device is ``address``."""
    entries = []
    for class_name, pattern in (("graphics", r"^fb[0-9]+$"), ("drm", r"^card[0-9]+$")):
        class_dir = sysfs_root / "class" / class_name
        for name in sorted(_entries(class_dir)):
            if (
                re.match(pattern, name)
                and owning_function(sysfs_root, class_dir / name / "device") == address
            ):
                entries.append(name)

    return entries


# Files of a function ---------------------------------------------------------


def device_files(sysfs_root: Path, proc_root: Path, address: PciAddress) -> set[str]:
    """Return the /dev paths that open the function: its GPU, DRM, framebuffer and vfio nodes.

    /dev/nvidiaN is found through the Device Minor in the NVIDIA driver's
    /proc/driver/nvidia/gpus/<address>/information.
    """
    device_dir = sysfs_root / "bus" / "pci" / "devices" / str(address)
    paths = set()

    information = read_text(proc_root / "driver" / "nvidia" / "gpus" / str(address) / "information")
    minor = _NVIDIA_MINOR.search(information)
    if minor is not None:
        paths.add(f"/dev/nvidia{minor[1]}")

    paths.update(f"/dev/dri/{name}" for name in _entries(device_dir / "drm") if _is_drm_node(name))
    paths.update(f"/dev/{name}" for name in _entries(device_dir / "graphics") if name.startswith("fb"))
    paths.update(f"/dev/vfio/devices/{name}" for name in _entries(device_dir / "vfio-dev"))
    group = device_dir / "iommu_group"
    if group.is_symlink():
        paths.add(f"/dev/vfio/{Path(os.readlink(group)).name}")

    return paths


def _is_drm_node(name: str) -> bool:
    return re.match(r"^(card|renderD)[0-9]+$", name) is not None


def sysfs_directory(sysfs_root: Path, address: PciAddress) -> str:
    """Return the function's resolved sysfs directory as a host path (/sys/devices/...)."""
    device_dir = Path(os.path.realpath(sysfs_root / "bus" / "pci" / "devices" / str(address)))

    return str(PurePosixPath("/sys") / device_dir.relative_to(os.path.realpath(sysfs_root)))


def is_mappable_attribute(name: str) -> bool:
    """Whether a sysfs file of a function gives access to the device: its BARs or config space."""
    return name.startswith("resource") or name == "config"


def _entries(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


# Processes -------------------------------------------------------------------


@dataclass
class ProcessScan:
    """The files every readable process has open, as host paths, and the processes left out."""

    open_files: dict[int, set[str]]
    # Processes whose descriptors the reader may not list (not root, or another user namespace).
    denied: int = 0
    # Processes that exited while they were read.
    vanished: int = 0


def scan_processes(proc_root: Path, dev_root: Path, sysfs_root: Path) -> ProcessScan:
    """Read the descriptor links of every process but the reader itself.

    A link target under ``dev_root`` or ``sysfs_root`` is rewritten to its host path
    (/dev/..., /sys/...), so paths from a simulated tree compare like real ones.
    """
    roots = [(Path(os.path.realpath(dev_root)), "/dev"), (Path(os.path.realpath(sysfs_root)), "/sys")]
    scan = ProcessScan(open_files={})
    own_pid = _own_pid(proc_root)
    for entry in _entries(proc_root):
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        try:
            targets = _descriptor_targets(proc_root / entry / "fd")
        except PermissionError:
            scan.denied += 1
            continue
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            scan.vanished += 1
            continue
        scan.open_files[int(entry)] = {_host_path(target, roots) for target in targets}

    return scan


def _own_pid(proc_root: Path) -> int | None:
    """Return the reader's pid from ``<proc>/self``, which only the real procfs has."""
    try:
        return int(os.readlink(proc_root / "self"))
    except (OSError, ValueError):
        return None


def _descriptor_targets(fd_dir: Path) -> list[str]:
    targets = []
    for name in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / name))
        except FileNotFoundError:
            # The descriptor was closed between the listing and the read.
            continue

    return targets


def _host_path(target: str, roots: list[tuple[Path, str]]) -> str:
    path = Path(target)
    for root, host_root in roots:
        if path.is_relative_to(root):
            return str(PurePosixPath(host_root) / path.relative_to(root))

    return target


def command_name(proc_root: Path, pid: int) -> str | None:
    """Return the process's command name, or None when it exited.

    ``comm`` keeps at most 15 characters (TASK_COMM_LEN - 1), so a name of that length
    is completed from the base name of argv[0] when that starts with it.
    """
    try:
        comm = (proc_root / str(pid) / "comm").read_text(errors="replace").rstrip("\n")
        if len(comm) < 15:
            return comm
        argv0 = (proc_root / str(pid) / "cmdline").read_bytes().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError):
        return None

    name = PurePosixPath(argv0.decode(errors="replace")).name
    return name if name.startswith(comm) else comm
