"""The simulated host: its sysfs, /dev and /proc trees under one base directory."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from agent.simulate.description import HostDescription
from agent.simulate.files import _consoles, _swaps
from agent.simulate.kernel import SimulatedKernel

# The kernel keeps at most 15 characters of a command name (TASK_COMM_LEN - 1).
_COMM_LENGTH = 15


class SimulatedHost:
    """A host's sysfs, /dev and /proc trees under one base directory.

    The tree is written once by ``build``. After that only ``kernel`` changes it,
    so every change goes through the same checks a real kernel makes. A later process
    attaches to the same tree with ``reopen``.
    """

    def __init__(self, description: HostDescription, base: Path, *, reopen: bool = False) -> None:
        """Boot a kernel on ``base``, or with ``reopen`` take over the kernel state the tree records.

        Create hosts through ``build`` or ``reopen``, which prepare ``base`` first.
        """
        self._description = description
        self._base = base
        self._kernel = SimulatedKernel(self, reopen=reopen)

    @classmethod
    def build(cls, description: HostDescription, base: Path) -> SimulatedHost:
        """Create ``base/sys``, ``base/dev`` and ``base/proc`` for ``description``.

        Raises:
            ValueError: ``base`` exists and is not an empty directory.
        """
        base = Path(base)
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise ValueError(f"cannot build a simulated host in {base}: it is not an empty directory")

        base.mkdir(parents=True, exist_ok=True)
        base = Path(os.path.realpath(base))
        for name in ("sys", "dev", "proc"):
            (base / name).mkdir()
        _write_dev_nodes(description, base / "dev")
        _write_mounts(description, base / "proc")
        _write_kernel_files(description, base / "proc")
        host = cls(description, base)
        # Processes come last, because a descriptor of a sysfs file resolves through the booted tree.
        _write_processes(description, base / "proc", base / "dev", base / "sys")

        return host

    @classmethod
    def reopen(cls, description: HostDescription, base: Path) -> SimulatedHost:
        """Attach to the tree that ``build`` created in ``base`` in this or an earlier process.

        The kernel state comes from the tree as the last process left it: the present
        functions (a removed one stays removed until a rescan), each function's driver
        link and driver_override, and the enabled VFs. The /dev/vfio nodes and the other
        entries that follow from a driver are brought in step with the driver links,
        which finishes a bind or unbind that a kill interrupted. Writes then behave as on
        a built host. Injected faults, hangs and the ``writes`` record start empty.

        NOTE: a kill while a function is being added or removed (remove, rescan,
        sriov_numvfs writes) can leave a partial directory. A VF count that disagrees
        with the present VFs raises, but other partial entries go undetected.

        Raises:
            ValueError: ``base`` contains no simulated tree, or one built from another
                description, or a VF count that disagrees with the present VFs.
        """
        base = Path(os.path.realpath(base))
        missing = [name for name in ("sys", "dev", "proc") if not (base / name).is_dir()]
        if missing:
            raise ValueError(
                f"cannot reopen a simulated host in {base}: missing directories {', '.join(missing)}. "
                "Build the host in an empty directory instead"
            )

        try:
            return cls(description, base, reopen=True)
        except ValueError as err:
            raise ValueError(f"cannot reopen the simulated host in {base}: {err}") from err

    @property
    def description(self) -> HostDescription:
        return self._description

    @property
    def base(self) -> Path:
        return self._base

    @property
    def sysfs_root(self) -> Path:
        return self._base / "sys"

    @property
    def dev_root(self) -> Path:
        return self._base / "dev"

    @property
    def proc_root(self) -> Path:
        return self._base / "proc"

    @property
    def kernel(self) -> SimulatedKernel:
        return self._kernel

    def device_path(self, address: str) -> Path:
        """Return ``sys/bus/pci/devices/<address>``, the link to the function's directory."""
        return self.sysfs_root / "bus" / "pci" / "devices" / address


def _write_dev_nodes(description: HostDescription, dev_root: Path) -> None:
    """Create the device nodes as plain files, since tests cannot call mknod."""
    nodes = ["/dev/null"]
    if description.vfio:
        nodes.append("/dev/vfio/vfio")
    for device in description.devices:
        nodes.extend(device.char_devices)
        if device.block is not None:
            nodes.append(f"/dev/{device.block.name}")
            nodes.extend(f"/dev/{partition}" for partition in device.block.partition_names())
    nodes.extend(f"/dev/{disk.name}" for disk in description.virtual_block_devices)

    for node in nodes:
        path = _under_dev_root(dev_root, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    # udev links /dev/mapper/<name> to the dm-N node.
    for disk in description.virtual_block_devices:
        if disk.dm_name is not None:
            link = _under_dev_root(dev_root, disk.mount_source)
            link.parent.mkdir(exist_ok=True)
            os.symlink(f"../{disk.name}", link)


def _under_dev_root(dev_root: Path, path: str) -> Path:
    return dev_root.joinpath(*PurePosixPath(path).parts[2:])


def _descriptor_target(path: str, dev_root: Path, sysfs_root: Path) -> str:
    """Return where a descriptor link of ``path`` points, as the kernel's d_path shows it.

    A /dev path maps to the simulated dev root, and a /sys path to the simulated sysfs
    root with its links resolved, so /sys/bus/pci/devices/<address>/resource0 becomes
    .../sys/devices/pci0000:00/<address>/resource0. Other paths stay as they are.
    """
    parts = PurePosixPath(path).parts
    if parts[:2] == ("/", "dev"):
        return str(_under_dev_root(dev_root, path))
    if parts[:2] == ("/", "sys"):
        return os.path.realpath(sysfs_root.joinpath(*parts[2:]))

    return path


def _write_processes(description: HostDescription, proc_root: Path, dev_root: Path, sysfs_root: Path) -> None:
    for process in description.processes:
        process_dir = proc_root / str(process.pid)
        (process_dir / "fd").mkdir(parents=True)
        (process_dir / "comm").write_text(process.comm[:_COMM_LENGTH] + "\n")
        (process_dir / "cmdline").write_text(process.comm + "\0")

        # Descriptors 0 to 2 are the standard streams, as for a daemon started by init.
        targets = [str(dev_root / "null")] * 3 + [
            _descriptor_target(path, dev_root, sysfs_root) for path in process.open_files
        ]
        for number, target in enumerate(targets):
            os.symlink(target, process_dir / "fd" / str(number))


def _write_mounts(description: HostDescription, proc_root: Path) -> None:
    lines = [
        "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
        "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
        "devtmpfs /dev devtmpfs rw,nosuid,relatime,mode=755 0 0",
        "tmpfs /run tmpfs rw,nosuid,nodev,noexec,relatime,mode=755 0 0",
    ]
    for device in description.devices:
        if device.block is None:
            continue
        for number, mount in enumerate(device.block.mounts, start=1):
            source = f"/dev/{device.block.partition_name(number)}"
            lines.append(_mount_line(description, source, mount))
    for disk in description.virtual_block_devices:
        lines.extend(_mount_line(description, disk.mount_source, mount) for mount in disk.mounts)

    (proc_root / "mounts").write_text("".join(line + "\n" for line in lines))


def _mount_line(description: HostDescription, source: str, mount: str) -> str:
    fstype = "vfat" if mount == "/boot/efi" else "ext4"
    if mount == "/" and description.root_mount_source is not None:
        source = description.root_mount_source

    return f"{source} {mount} {fstype} rw,relatime 0 0"


def _write_kernel_files(description: HostDescription, proc_root: Path) -> None:
    """Write /proc/cmdline, /proc/consoles and /proc/swaps."""
    (proc_root / "cmdline").write_text(description.cmdline + "\n")
    (proc_root / "consoles").write_text(_consoles(description.consoles))
    (proc_root / "swaps").write_text(_swaps(description.swaps))
