"""Host uses of a PCI function (file systems, routes, consoles, open files) and their scanner."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import structlog

from agent import usage_scan
from agent.usage_scan import Address
from devpass.pci import PciAddress

log = structlog.get_logger()


@dataclass(frozen=True)
class CriticalUse:
    """One way the host depends on a function, so moving it off its driver would harm the host."""

    # "mounted_filesystem", "swap", "default_route", "agent_traffic" or "boot_console".
    kind: str
    # For an operator, for example "/ is mounted from /dev/nvme0n1p2".
    detail: str


@dataclass(frozen=True)
class Holder:
    """A process with a file of the function open."""

    pid: int
    command: str
    path: str


class HostUsage(Protocol):
    """Source of the facts the bind safety checks need; read-only."""

    def critical_uses(self, address: PciAddress) -> list[CriticalUse]: ...

    def holders(self, address: PciAddress) -> list[Holder]: ...


class HostUsageScanner:
    """HostUsage read from sysfs and procfs, of the real host or of a simulated tree.

    Every call reads the files again, so its result follows the kernel's current state.
    The roots are /sys, /proc and /dev on a real host.

    NOTE: /proc/mounts and /proc/net/route show the namespaces of the reading process,
    so the agent must run in the host's mount and network namespaces and see the host's
    processes in its /proc. Only the main routing table is read, so a route chosen by a
    policy rule (ip rule) is not seen.
    """

    def __init__(
        self, sysfs_root: Path, proc_root: Path, dev_root: Path, *, controller_host: str | None = None
    ) -> None:
        """Create a scanner. ``controller_host`` is the controller's IP address or DNS name."""
        self._sysfs_root = Path(sysfs_root)
        self._proc_root = Path(proc_root)
        self._dev_root = Path(dev_root)
        self._controller_host = _strip_brackets(controller_host) if controller_host else None
        self._resolved: tuple[float, list[Address]] | None = None
        self._warned: set[str] = set()

    def critical_uses(self, address: PciAddress) -> list[CriticalUse]:
        """Return every way the host depends on the function, in the order of the kinds, without repeats."""
        uses = [
            *self._mounted_filesystems(address),
            *self._swaps(address),
            *self._default_routes(address),
            *self._agent_traffic(address),
            *self._boot_console(address),
        ]

        return list(dict.fromkeys(uses))

    def holders(self, address: PciAddress) -> list[Holder]:
        """Return the processes with a device node or BAR/config file of the function open, by pid.

        Processes that exit or deny access during the scan are left out.
        """
        device_files = usage_scan.device_files(self._sysfs_root, self._proc_root, address)
        directory = PurePosixPath(usage_scan.sysfs_directory(self._sysfs_root, address))
        scan = usage_scan.scan_processes(self._proc_root, self._dev_root, self._sysfs_root)
        if scan.denied:
            self._warn_once("holders_scan_incomplete", denied_processes=scan.denied)

        holders: list[Holder] = []
        for pid, paths in sorted(scan.open_files.items()):
            open_paths = sorted(path for path in paths if _is_function_file(path, device_files, directory))
            command = usage_scan.command_name(self._proc_root, pid) if open_paths else None
            if command is not None:
                holders.extend(Holder(pid=pid, command=command, path=path) for path in open_paths)

        return holders

    # Kinds of critical use ----------------------------------------------------

    def _mounted_filesystems(self, address: PciAddress) -> Iterator[CriticalUse]:
        for mount in usage_scan.read_mounts(self._proc_root):
            source = self._device_path(mount.source)
            if source is None:
                continue
            if address in self._block_functions(source):
                source_text = mount.source if source == mount.source else f"{mount.source} ({source})"
                yield CriticalUse("mounted_filesystem", f"{mount.mount_point} is mounted from {source_text}")

    def _swaps(self, address: PciAddress) -> Iterator[CriticalUse]:
        for path in usage_scan.read_swap_partitions(self._proc_root):
            if address in self._block_functions(path):
                yield CriticalUse("swap", f"{path} is an active swap partition")

    def _default_routes(self, address: PciAddress) -> Iterator[CriticalUse]:
        for route in usage_scan.read_routes(self._proc_root):
            if route.network.prefixlen != 0:
                continue
            lower = usage_scan.interface_functions(self._sysfs_root, route.interface).get(address)
            if lower is not None:
                family = f"IPv{route.network.version}"
                yield CriticalUse(
                    "default_route", f"the {family} default route goes through {_on(route, lower)}"
                )

    def _agent_traffic(self, address: PciAddress) -> Iterator[CriticalUse]:
        routes = usage_scan.read_routes(self._proc_root)
        for destination in self._controller_addresses():
            route = usage_scan.route_to(routes, destination)
            if route is None:
                continue
            lower = usage_scan.interface_functions(self._sysfs_root, route.interface).get(address)
            if lower is not None:
                controller = self._controller_host
                if controller != str(destination):
                    controller = f"{controller} ({destination})"
                detail = f"traffic to the controller {controller} goes through {_on(route, lower)}"
                yield CriticalUse("agent_traffic", detail)

    def _boot_console(self, address: PciAddress) -> Iterator[CriticalUse]:
        boot_vga = usage_scan.read_text(
            self._sysfs_root / "bus" / "pci" / "devices" / str(address) / "boot_vga"
        )
        if boot_vga.strip() != "1":
            return
        terminals = usage_scan.virtual_terminal_consoles(self._proc_root)
        displays = usage_scan.display_entries(self._sysfs_root, address) if terminals else []
        if displays:
            yield CriticalUse(
                "boot_console",
                f"the kernel console on {', '.join(terminals)} is shown on this boot VGA device "
                f"({', '.join(displays)})",
            )

    # Helpers -----------------------------------------------------------------

    def _device_path(self, source: str) -> str | None:
        """Return the /dev path of a mount source, with /dev/root resolved through root=."""
        if source != "/dev/root":
            return source if source.startswith("/dev/") else None

        root = usage_scan.root_parameter(self._proc_root)
        path = usage_scan.root_device_path(root) if root is not None else None
        if path is None:
            self._warn_once("root_device_unresolved", root_parameter=root or "")
        return path

    def _block_functions(self, device_path: str) -> set[PciAddress]:
        name = usage_scan.block_name(self._sysfs_root, self._dev_root, device_path)
        if name is None:
            return set()

        return usage_scan.block_functions(self._sysfs_root, name)

    def _controller_addresses(self) -> list[Address]:
        """Return the controller's non-loopback addresses, resolved at most once a minute."""
        if self._controller_host is None:
            return []

        now = time.monotonic()
        if self._resolved is None or now - self._resolved[0] > _RESOLVE_INTERVAL:
            self._resolved = (now, self._resolve(self._controller_host))

        return [address for address in self._resolved[1] if not address.is_loopback]

    def _resolve(self, host: str) -> list[Address]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass

        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as err:
            log.warning("controller_host_unresolved", controller_host=host, error=str(err))
            return []

        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        return list(dict.fromkeys(addresses))

    def _warn_once(self, event: str, **fields: object) -> None:
        if event not in self._warned:
            self._warned.add(event)
            log.warning(event, **fields)


# How long a resolved controller name is used before it is resolved again, in seconds.
_RESOLVE_INTERVAL = 60.0


def _strip_brackets(host: str) -> str:
    """Return an IPv6 literal without the brackets of a host:port form ([2001:db8::1])."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _on(route: usage_scan.Route, lower: str) -> str:
    """Name the route's interface and, for a bridge, bond or VLAN, the function's interface under it."""
    return route.interface if lower == route.interface else f"{route.interface} on {lower}"


def _is_function_file(path: str, device_files: set[str], directory: PurePosixPath) -> bool:
    if path in device_files:
        return True

    host_path = PurePosixPath(path)
    return host_path.parent == directory and usage_scan.is_mappable_attribute(host_path.name)
