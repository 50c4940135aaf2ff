"""The simulated kernel: Linux's sysfs write semantics, errno values and injected faults."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, cast

from agent.simulate.bus import _LiveDevice, _PciBus
from agent.simulate.devices import VFIO_DRIVER, SriovDescription
from agent.simulate.reopen import _read_live_devices
from devpass.pci import PciAddress

if TYPE_CHECKING:
    from agent.simulate.tree import SimulatedHost

FaultAttribute = Literal["driver_override", "unbind", "bind", "drivers_probe", "sriov_numvfs", "remove"]
FaultError = Literal["EBUSY", "ENODEV", "HANG"]

_FAULT_ATTRIBUTES: frozenset[str] = frozenset(
    {"driver_override", "unbind", "bind", "drivers_probe", "sriov_numvfs", "remove"}
)
_FAULT_ERRNOS = {"EBUSY": errno.EBUSY, "ENODEV": errno.ENODEV}
# Only writes to these attributes name a driver.
_DRIVER_ATTRIBUTES = frozenset({"bind", "unbind"})
# A sysfs store function receives at most one page.
_PAGE_SIZE = 4096


@dataclass(frozen=True)
class _Operation:
    """A write resolved to the kernel attribute it reaches."""

    attribute: str
    address: str | None = None
    driver: str | None = None


@dataclass
class _Fault:
    attribute: str
    error: FaultError
    address: str | None
    driver: str | None
    remaining: int

    def matches(self, operation: _Operation) -> bool:
        return (
            self.attribute == operation.attribute
            and self.address in (None, operation.address)
            and self.driver in (None, operation.driver)
        )


class SimulatedKernel(_PciBus):
    """KernelWriter that applies Linux's sysfs write semantics to a simulated tree.

    The kernel owns all state that writes change (drivers, driver_override, present
    functions, VFs) and keeps the tree in step with it under one lock. Writes may come
    from several threads. A write that hangs through fault injection waits without the
    lock, so other writes and ``release_hangs`` still go through.
    """

    def __init__(self, host: SimulatedHost, *, hang_timeout: float = 30.0, reopen: bool = False) -> None:
        """Boot the kernel: lay out the host's sysfs tree as the description gives it.

        With ``reopen``, take over the sysfs tree that an earlier kernel left instead,
        with the drivers, overrides, VFs and removals it recorded there.
        ``hang_timeout`` bounds in seconds how long an injected HANG blocks when no
        test releases it, so a forgotten hang cannot keep the test process alive.

        Raises:
            ValueError: with ``reopen``, the tree cannot be read back; see
                ``_read_live_devices``.
        """
        super().__init__(host)
        self._lock = threading.Lock()
        self._hang_changed = threading.Condition(self._lock)
        self.hang_timeout = hang_timeout
        self._writes: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._hangs: list[threading.Event] = []
        if reopen:
            self._adopt(_read_live_devices(self._root, host.description))
        else:
            self._boot()

    # Public interface -------------------------------------------------------

    @property
    def writes(self) -> list[tuple[str, str]]:
        """Every write attempted under the sysfs root, as (path relative to the root, value).

        The path is the one the writer gave, so a write through
        ``bus/pci/devices/<address>/driver_override`` is recorded under that name.
        """
        with self._lock:
            return list(self._writes)

    @property
    def hanging_writes(self) -> int:
        """Number of writes blocked by an injected HANG right now."""
        with self._lock:
            return len(self._hangs)

    def write(self, path: Path, value: str) -> None:
        """Apply a write of ``value`` to the attribute at ``path``.

        Raises:
            ValueError: ``path`` resolves outside the simulated sysfs root.
            OSError: the kernel rejected the write, and ``errno`` is the kernel's code.
                An injected fault raises its errno, and a released HANG raises EINTR.
        """
        relative, target = self._locate(Path(path))
        with self._lock:
            self._writes.append((relative, value))
            operation = self._classify(target, value)
            fault = self._take_fault(operation)
            if fault is None:
                self._apply(operation, value)
                return
            if fault.error != "HANG":
                raise _kernel_error(_FAULT_ERRNOS[fault.error], f"injected fault on {relative}")

            release = threading.Event()
            self._hangs.append(release)
            self._hang_changed.notify_all()

        released = release.wait(self.hang_timeout)
        with self._lock:
            if release in self._hangs:
                self._hangs.remove(release)
                self._hang_changed.notify_all()

        reason = "released" if released else f"not released within {self.hang_timeout} s"
        raise _kernel_error(errno.EINTR, f"injected hang on {relative} {reason}")

    def inject_fault(
        self,
        attribute: FaultAttribute,
        error: FaultError,
        *,
        address: str | None = None,
        driver: str | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` matching writes fail with ``error``.

        EBUSY and ENODEV raise that errno without changing any state. HANG blocks
        the writing thread until ``release_hangs`` and then raises EINTR, also
        without changing state. ``address`` limits the fault to one function, and
        ``driver`` (for bind and unbind only) to one driver.

        Raises:
            ValueError: unknown attribute or error, ``times`` below 1, or a driver
                given for an attribute that names none.
        """
        if attribute not in _FAULT_ATTRIBUTES:
            raise ValueError(
                f"cannot inject a fault on {attribute!r}: use one of {sorted(_FAULT_ATTRIBUTES)}"
            )
        if error not in ("EBUSY", "ENODEV", "HANG"):
            raise ValueError(f"unknown fault {error!r}: use EBUSY, ENODEV or HANG")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        if driver is not None and attribute not in _DRIVER_ATTRIBUTES:
            raise ValueError(f"a {attribute} write names no driver, so driver={driver!r} can never match")

        with self._lock:
            self._faults.append(_Fault(attribute, error, address, driver, times))

    def clear_faults(self) -> None:
        """Remove every injected fault that has not fired yet."""
        with self._lock:
            self._faults.clear()

    def release_hangs(self) -> None:
        """Unblock every write that an injected HANG is blocking, so each raises EINTR."""
        with self._lock:
            for event in self._hangs:
                event.set()
            self._hangs.clear()
            self._hang_changed.notify_all()

    def wait_for_hangs(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` writes hang, and return False after ``timeout`` seconds."""
        with self._hang_changed:
            return self._hang_changed.wait_for(lambda: len(self._hangs) >= count, timeout)

    # Resolving a write ------------------------------------------------------

    def _locate(self, path: Path) -> tuple[str, Path]:
        """Return the write's path relative to the root, as given, and its resolved target."""
        parent = Path(os.path.realpath(path.parent))
        if parent != self._root and self._root not in parent.parents:
            raise ValueError(
                f"cannot write {path}: it resolves to {parent / path.name}, "
                f"outside the simulated sysfs root {self._root}"
            )

        target = parent / path.name
        try:
            relative = path.relative_to(self._root)
        except ValueError:
            relative = target.relative_to(self._root)

        return relative.as_posix(), target

    def _classify(self, target: Path, value: str) -> _Operation:
        """Name the attribute a write reaches, or raise the open(2) error it would get."""
        if not target.exists():
            raise _kernel_error(errno.ENOENT, f"no such attribute {target.relative_to(self._root)}")
        if target.is_dir():
            raise _kernel_error(errno.EISDIR, f"{target.relative_to(self._root)} is a directory")

        parent = PurePosixPath(target.parent.relative_to(self._root).as_posix())
        name = target.name
        written_address = _strip_newline(value)
        if parent == PurePosixPath("bus/pci") and name in ("drivers_probe", "rescan"):
            return _Operation(name, address=written_address if name == "drivers_probe" else None)
        if parent.parent == PurePosixPath("bus/pci/drivers") and name in (
            "bind",
            "unbind",
            "new_id",
            "remove_id",
        ):
            return _Operation(name, address=written_address, driver=parent.name)

        address = self._directories.get(parent)
        if address is not None and name in ("driver_override", "remove", "rescan", "sriov_numvfs"):
            return _Operation(name, address=address)

        raise _kernel_error(errno.EACCES, f"{target.relative_to(self._root)} is not writable")

    def _take_fault(self, operation: _Operation) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(operation):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault

        return None

    def _apply(self, operation: _Operation, value: str) -> None:
        handlers: dict[str, Callable[[_Operation, str], None]] = {
            "driver_override": self._store_driver_override,
            "bind": self._store_bind,
            "unbind": self._store_unbind,
            "drivers_probe": self._store_drivers_probe,
            "new_id": self._store_dynamic_id,
            "remove_id": self._store_dynamic_id,
            "sriov_numvfs": self._store_sriov_numvfs,
            "remove": self._store_remove,
            "rescan": self._store_rescan,
        }
        handlers[operation.attribute](operation, value)

    # Attribute stores -------------------------------------------------------

    def _store_driver_override(self, operation: _Operation, value: str) -> None:
        if len(value.encode()) >= _PAGE_SIZE - 1:
            raise _kernel_error(errno.EINVAL, "driver_override value is longer than a page")

        # The kernel keeps the text before the first newline, and empty text clears it.
        override = value.split("\n", 1)[0]
        device = self._device(operation)
        device.driver_override = override or None
        self._write_attribute(device, "driver_override", f"{override or '(null)'}\n")

    def _store_bind(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        driver = cast(str, operation.driver)
        if device is None or not self._driver_matches(device, driver):
            raise _kernel_error(errno.ENODEV, f"bind: {value.strip()!r} does not match driver {driver}")
        if device.driver is not None:
            raise _kernel_error(
                errno.EBUSY, f"bind: {device.spec.address} is already bound to {device.driver}"
            )

        error = self._probe_error(device, driver)
        if error is not None:
            raise error

        self._attach(device, driver)

    def _store_unbind(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        if device is None or device.driver != operation.driver:
            raise _kernel_error(errno.ENODEV, f"unbind: {value.strip()!r} is not bound to {operation.driver}")

        self._detach(device)

    def _store_drivers_probe(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        if device is None:
            raise _kernel_error(errno.ENODEV, f"drivers_probe: no PCI function {value.strip()!r}")
        if device.driver is not None:
            return

        driver = device.driver_override or device.spec.driver
        if driver is None or driver not in self._host.description.drivers:
            return
        # A failed probe leaves the function unbound, and drivers_probe still succeeds.
        if self._probe_error(device, driver) is None:
            self._attach(device, driver)

    def _store_dynamic_id(self, operation: _Operation, value: str) -> None:
        raise _kernel_error(
            errno.EPERM,
            f"{operation.attribute} of {operation.driver} written with {value.strip()!r}: devpass "
            "never uses new_id or remove_id, because a new id captures every function with those "
            "ids. Bind through driver_override",
        )

    def _store_sriov_numvfs(self, operation: _Operation, value: str) -> None:
        device = self._device(operation)
        sriov = cast(SriovDescription, device.spec.sriov)
        numvfs = _parse_unsigned(value, maximum=0xFFFF)
        if numvfs > sriov.totalvfs:
            raise _kernel_error(
                errno.ERANGE, f"sriov_numvfs {numvfs} is above sriov_totalvfs {sriov.totalvfs}"
            )
        if numvfs == device.numvfs:
            return
        if device.driver is None:
            raise _kernel_error(errno.ENOENT, f"{device.spec.address} has no driver to configure SR-IOV")
        if numvfs == 0:
            self._disable_vfs(device)
            return
        if device.numvfs > 0:
            raise _kernel_error(
                errno.EBUSY,
                f"{device.numvfs} VFs already enabled. Write 0 before enabling {numvfs}",
            )

        self._enable_vfs(device, numvfs)

    def _store_remove(self, operation: _Operation, value: str) -> None:
        if _parse_unsigned(value, maximum=2**64 - 1) != 0:
            self._remove_device(self._device(operation))

    def _store_rescan(self, operation: _Operation, value: str) -> None:
        if _parse_unsigned(value, maximum=2**64 - 1) == 0:
            return

        if operation.address is None:
            self._rescan(lambda spec: True)
            return

        # A function's own rescan attribute rescans the bus the function sits on.
        bus = _bus_of(operation.address)
        self._rescan(lambda spec: _bus_of(spec.address) == bus)

    # Driver binding ---------------------------------------------------------

    def _driver_matches(self, device: _LiveDevice, driver: str) -> bool:
        """Apply pci_bus_match: an override matches only its driver, else the native one."""
        if device.driver_override is not None:
            return device.driver_override == driver

        return device.spec.driver == driver

    def _probe_error(self, device: _LiveDevice, driver: str) -> OSError | None:
        """Return the error the driver's probe function fails with, or None when it binds.

        vfio-pci's probe rejects bridges and functions without an IOMMU group
        (EINVAL) and a PF whose VFs are enabled (EBUSY). Other drivers always bind.
        """
        if driver != VFIO_DRIVER:
            return None

        address = device.spec.address
        if device.numvfs > 0:
            return _kernel_error(errno.EBUSY, f"vfio-pci does not take PF {address} with VFs enabled")
        if device.spec.header_type != 0:
            return _kernel_error(errno.EINVAL, f"vfio-pci does not take bridge {address}")
        if device.spec.iommu_group is None:
            return _kernel_error(errno.EINVAL, f"{address} has no IOMMU group")

        return None

    def _device(self, operation: _Operation) -> _LiveDevice:
        return self._devices[cast(str, operation.address)]


def _bus_of(address: str) -> tuple[int, int]:
    parsed = PciAddress.parse(address)

    return parsed.domain, parsed.bus


def _strip_newline(value: str) -> str:
    """Drop one trailing newline, as sysfs_streq does when it compares a written name."""
    return value.removesuffix("\n")


def _parse_unsigned(value: str, maximum: int) -> int:
    """Parse a number the way kstrtoul with base 0 does: decimal, 0x hex or 0 octal."""
    text = _strip_newline(value)
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            number = int(text, 16)
        elif re.fullmatch(r"0[0-7]*", text):
            number = int(text, 8)
        elif re.fullmatch(r"[1-9][0-9]*", text):
            number = int(text)
        else:
            raise ValueError(text)
    except ValueError:
        raise _kernel_error(errno.EINVAL, f"{value!r} is not a number") from None

    if number > maximum:
        raise _kernel_error(errno.ERANGE, f"{number} is above {maximum}")

    return number


def _kernel_error(code: int, detail: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} (simulated kernel: {detail})")
