"""Moving PCI functions to vfio-pci and back: the only code that writes to the kernel.

A bind is a plain sequence: journal the intent, write `vfio-pci` to driver_override,
unbind the current driver, write the address to drivers_probe, confirm the driver link
and the /dev/vfio/<group> node. A restore clears driver_override, unbinds vfio-pci,
probes, and confirms the original driver. `new_id` is never written, because it makes
vfio-pci claim every device with the same vendor and device ids.

Any failed step rolls the function back to where it was before the call. A write that
does not return within its deadline ends the call with WRITE_TIMED_OUT and leaves the
function in the journal; when the write finally returns, or at the agent's next start,
the function is repaired from the journal.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent import safety
from agent.journal import Journal, Phase
from agent.kernel import KernelWriter
from agent.sysfs import VFIO_DRIVER, Identity, PciFunctionInfo, Sysfs
from agent.usage import HostUsage
from devpass.errors import (
    BindFailed,
    DevpassError,
    WritePending,
    WriteTimedOut,
)
from devpass.pci import PciAddress

log = structlog.get_logger()

DEFAULT_WRITE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Move:
    """One function's driver change: where it came from and where it is now."""

    address: PciAddress
    from_driver: str | None
    driver: str | None


class _StepFailed(Exception):
    """A bind or restore step failed; `step` names it and `cause` is the kernel's error."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


class Binder:
    """Bind functions to vfio-pci and restore them, one operation at a time per host.

    Invariant: a function that devpass moved is in the journal until it is back on its
    original driver, so a crash at any point leaves a record to repair from.
    """

    def __init__(
        self,
        sysfs: Sysfs,
        writer: KernelWriter,
        journal: Journal,
        usage: HostUsage,
        *,
        dev_root: Path,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    ) -> None:
        self._sysfs = sysfs
        self._writer = writer
        self._journal = journal
        self._usage = usage
        self._dev_root = dev_root
        self._write_timeout = write_timeout
        # One operation at a time: binds of group siblings must not interleave.
        self._lock = threading.Lock()
        # Addresses whose last write has not returned, by the attribute it went to.
        self._pending: dict[str, str] = {}
        self._pending_lock = threading.Lock()

    def bind(
        self,
        address: PciAddress,
        *,
        expected: Identity | None = None,
        include_group: bool = False,
        force: bool = False,
    ) -> list[Move]:
        """Bind the function, and with `include_group` its group siblings, to vfio-pci.

        Returns the moves made; a function already on vfio-pci is a move to itself.

        Raises:
            PciDeviceNotFound, IdentityMismatch, VfioUnavailable, IommuUnavailable,
            SriovPfHasVfs, IommuGroupNotViable, HostCriticalDevice, DeviceBusy: checked
                before any write, so nothing was written.
            WritePending: an earlier write to one of the functions has not returned.
            WriteTimedOut: a write hung; the function stays journalled for repair.
            BindFailed: a step failed and the functions were rolled back; metadata records
                whether the rollback succeeded and what state the function is in.
        """
        with self._lock:
            function = self._sysfs.read_function(address)
            safety.check_identity(function, expected)
            if function.bound_to_vfio:
                entry = self._journal.get(str(address))
                return [Move(address, entry.original_driver if entry else VFIO_DRIVER, VFIO_DRIVER)]

            members = safety.check_bind(
                self._sysfs, self._usage, function, include_group=include_group, force=force
            )
            for member in members:
                self._require_no_pending(member.address)

            moved: list[PciFunctionInfo] = []
            for member in members:
                try:
                    self._bind_one(member)
                except _StepFailed as failure:
                    raise self._rolled_back(member, moved, failure) from None
                moved.append(member)

        return [Move(m.address, m.driver, VFIO_DRIVER) for m in members]

    def restore(self, address: PciAddress, *, expected: Identity | None = None) -> Move:
        """Give the function back to the driver it had before devpass bound it.

        Without a journal entry (the bind happened elsewhere, or the journal was lost),
        the kernel picks the driver by probing.

        Raises:
            PciDeviceNotFound, IdentityMismatch: checked before any write.
            WritePending, WriteTimedOut: as for `bind`.
            BindFailed: a step failed; the function was put back on vfio-pci, or the
                metadata records that it could not be.
        """
        with self._lock:
            function = self._sysfs.read_function(address)
            safety.check_identity(function, expected)
            self._require_no_pending(address)
            entry = self._journal.get(str(address))
            original = entry.original_driver if entry is not None else None
            probe = entry is None or original is not None

            if not function.bound_to_vfio and function.driver_override is None:
                self._journal.remove(str(address))
                return Move(address, function.driver, function.driver)

            try:
                self._restore_one(function, original, probe=probe)
            except _StepFailed as failure:
                raise self._restore_failed(function, failure) from None

            now = self._sysfs.read_function(address)

        return Move(address, function.driver, now.driver)

    def restore_group(self, address: PciAddress, *, expected: Identity | None = None) -> list[Move]:
        """Restore the function, then the IOMMU group siblings that devpass bound with it.

        A group passes through as a unit, so siblings that an include_group bind moved
        go back with the function. Returns the function's move first.

        Raises:
            The errors of `restore` for the function itself. A sibling that fails to
            restore is logged and reported with the driver it is left on.
        """
        moves = [self.restore(address, expected=expected)]
        function = self._sysfs.read_function(address)
        if function.iommu_group is None:
            return moves

        for sibling in self._sysfs.group_members(function.iommu_group):
            if sibling == address or not self.bound_by_devpass(sibling):
                continue
            try:
                moves.append(self.restore(sibling))
            except DevpassError as err:
                log.error("group_sibling_restore_failed", pci_address=str(sibling), error=err.message)
                now = self._sysfs.read_function(sibling)
                moves.append(Move(sibling, now.driver, now.driver))

        return moves

    def repair(self) -> list[Move]:
        """Finish or undo every journalled operation that a crash or a hung write interrupted.

        Functions caught while binding go back to their original driver; functions caught
        while restoring are restored. Functions that devpass bound stay bound.
        """
        repaired = []
        with self._lock:
            for entry in self._journal.entries():
                if entry.phase == Phase.BOUND:
                    continue
                address = PciAddress.parse(entry.pci_address)
                move = self._repair_one(address, entry.original_driver, entry.phase)
                if move is not None:
                    repaired.append(move)

        return repaired

    def bound_by_devpass(self, address: PciAddress) -> bool:
        entry = self._journal.get(str(address))

        return entry is not None and entry.phase == Phase.BOUND

    # The steps ---------------------------------------------------------------

    def _bind_one(self, function: PciFunctionInfo) -> None:
        address = str(function.address)
        self._journal.put(address, function.driver, Phase.BINDING)

        self._write(
            function.address, "driver_override", self._device_attr(function, "driver_override"), VFIO_DRIVER
        )
        if function.driver is not None:
            self._write(function.address, "unbind", self._driver_attr(function.driver, "unbind"), address)
        self._write(function.address, "drivers_probe", self._bus_attr("drivers_probe"), address)
        self._confirm_bound(function)

        self._journal.put(address, function.driver, Phase.BOUND)
        log.info("device_bound", pci_address=address, from_driver=function.driver, driver=VFIO_DRIVER)

    def _restore_one(self, function: PciFunctionInfo, original: str | None, *, probe: bool) -> None:
        address = str(function.address)
        self._journal.put(address, original, Phase.RESTORING)

        # Writing a newline clears driver_override, so the next probe matches by ids again.
        self._write(function.address, "driver_override", self._device_attr(function, "driver_override"), "\n")
        if function.driver is not None:
            self._write(function.address, "unbind", self._driver_attr(function.driver, "unbind"), address)
        if probe:
            self._write(function.address, "drivers_probe", self._bus_attr("drivers_probe"), address)
        self._confirm_restored(function.address, original, probe=probe)

        self._journal.remove(address)
        now = self._sysfs.read_function(function.address).driver
        log.info("device_restored", pci_address=address, from_driver=function.driver, driver=now)

    def _confirm_bound(self, function: PciFunctionInfo) -> None:
        now = self._sysfs.read_function(function.address)
        if now.driver != VFIO_DRIVER:
            raise _StepFailed(
                "confirm", f"driver is {now.driver or 'none'} after the probe, expected {VFIO_DRIVER}"
            )
        node = self._dev_root / "vfio" / str(function.iommu_group)
        if not node.exists():
            raise _StepFailed("confirm", f"{node} does not exist after the bind")

    def _confirm_restored(self, address: PciAddress, original: str | None, *, probe: bool) -> None:
        now = self._sysfs.read_function(address)
        if now.driver == VFIO_DRIVER:
            raise _StepFailed("confirm", f"driver is still {VFIO_DRIVER} after the restore")
        if probe and original is not None and now.driver != original:
            raise _StepFailed(
                "confirm", f"driver is {now.driver or 'none'} after the probe, expected {original}"
            )

    # Rollback ----------------------------------------------------------------

    def _rolled_back(
        self, failed: PciFunctionInfo, moved: list[PciFunctionInfo], failure: _StepFailed
    ) -> DevpassError:
        """Undo a failed bind of `failed` and of the group members moved before it."""
        if failure.step == "timeout":
            return self._timed_out(failed, failure)

        rollback_errors = []
        for function in [failed, *reversed(moved)]:
            try:
                self._return_to(function.address, function.driver)
                self._journal.remove(str(function.address))
            except _StepFailed as err:
                rollback_errors.append(f"{function.address}: {err}")

        state = self._sysfs.read_function(failed.address)
        rollback = "failed" if rollback_errors else "succeeded"
        log.warning(
            "device_bind_failed",
            pci_address=str(failed.address),
            step=failure.step,
            error=failure.cause,
            rollback=rollback,
            driver=state.driver,
        )
        detail = (
            f"rollback failed ({'; '.join(rollback_errors)}), so {failed.address} is now on "
            f"{state.driver or 'no driver'}; check `dmesg` and restore it by hand or retry"
            if rollback_errors
            else f"rolled back: {failed.address} is on {state.driver or 'no driver'} again"
        )

        return BindFailed(
            f"binding {failed.address} to {VFIO_DRIVER} failed at {failure.step}: {failure.cause}; {detail}",
            pci_address=str(failed.address),
            step=failure.step,
            error=failure.cause,
            rollback=rollback,
            driver=state.driver or "",
            driver_override=state.driver_override or "",
        )

    def _restore_failed(self, function: PciFunctionInfo, failure: _StepFailed) -> DevpassError:
        """Put a function whose restore failed back on vfio-pci, where it was before the call."""
        if failure.step == "timeout":
            return self._timed_out(function, failure)

        try:
            self._return_to(function.address, VFIO_DRIVER)
            entry = self._journal.get(str(function.address))
            self._journal.put(str(function.address), entry.original_driver if entry else None, Phase.BOUND)
            rollback, rollback_error = "succeeded", ""
        except _StepFailed as err:
            rollback, rollback_error = "failed", str(err)

        state = self._sysfs.read_function(function.address)
        log.warning(
            "device_restore_failed",
            pci_address=str(function.address),
            step=failure.step,
            error=failure.cause,
            rollback=rollback,
            driver=state.driver,
        )

        return BindFailed(
            f"restoring {function.address} failed at {failure.step}: {failure.cause}; "
            + (
                f"it is back on {VFIO_DRIVER}"
                if rollback == "succeeded"
                else f"putting it back on {VFIO_DRIVER} failed too ({rollback_error}), so it is on "
                f"{state.driver or 'no driver'}"
            ),
            pci_address=str(function.address),
            step=failure.step,
            error=failure.cause,
            rollback=rollback,
            driver=state.driver or "",
            driver_override=state.driver_override or "",
        )

    def _timed_out(self, function: PciFunctionInfo, failure: _StepFailed) -> WriteTimedOut:
        state = self._sysfs.read_function(function.address)
        log.error(
            "device_write_timed_out",
            pci_address=str(function.address),
            attribute=failure.cause,
            driver=state.driver,
            check="the kernel did not return from a sysfs write; see `dmesg` for the driver's messages",
        )

        return WriteTimedOut(
            f"the write to {failure.cause} for {function.address} did not return within "
            f"{self._write_timeout:.1f} s; the device is on {state.driver or 'no driver'} now, and "
            "the agent repairs it when the write returns or at its next start",
            pci_address=str(function.address),
            attribute=failure.cause,
            driver=state.driver or "",
            driver_override=state.driver_override or "",
        )

    def _return_to(self, address: PciAddress, driver: str | None) -> None:
        """Move a function to `driver` (vfio-pci through driver_override, others by probing)."""
        current = self._sysfs.read_function(address)
        override = VFIO_DRIVER if driver == VFIO_DRIVER else "\n"
        self._write(address, "driver_override", self._device_attr(current, "driver_override"), override)
        if current.driver is not None and current.driver != driver:
            self._write(address, "unbind", self._driver_attr(current.driver, "unbind"), str(address))
        if driver is not None:
            self._write(address, "drivers_probe", self._bus_attr("drivers_probe"), str(address))

        now = self._sysfs.read_function(address)
        if now.driver != driver:
            raise _StepFailed("rollback", f"driver is {now.driver or 'none'}, expected {driver or 'none'}")

    def _repair_one(self, address: PciAddress, original: str | None, phase: Phase) -> Move | None:
        try:
            before = self._sysfs.read_function(address)
        except DevpassError:
            log.warning("journal_device_missing", pci_address=str(address), phase=str(phase))
            self._journal.remove(str(address))
            return None

        try:
            if phase == Phase.BINDING:
                self._return_to(address, original)
                self._journal.remove(str(address))
            else:
                self._restore_one(before, original, probe=original is not None)
        except _StepFailed as err:
            log.error("device_repair_failed", pci_address=str(address), phase=str(phase), error=str(err))
            return None

        after = self._sysfs.read_function(address)
        log.info(
            "device_repaired",
            pci_address=str(address),
            phase=str(phase),
            from_driver=before.driver,
            driver=after.driver,
        )

        return Move(address, before.driver, after.driver)

    # Writes ------------------------------------------------------------------

    def _require_no_pending(self, address: PciAddress) -> None:
        with self._pending_lock:
            attribute = self._pending.get(str(address))
        if attribute is not None:
            raise WritePending(
                f"an earlier write to {attribute} for {address} has not returned; wait for the "
                "agent to repair the device (its log says device_repaired), then retry",
                pci_address=str(address),
                attribute=attribute,
            )

    def _write(self, address: PciAddress, step: str, path: Path, value: str) -> None:
        """Write through the kernel writer in a worker thread, waiting at most the write timeout.

        A write that does not return in time keeps running in its daemon thread: a sysfs
        write cannot be cancelled. When it returns, the function is repaired.
        """
        finished = threading.Event()
        outcome: dict[str, BaseException] = {}
        state = {"abandoned": False}

        def run() -> None:
            try:
                self._writer.write(path, value)
            except BaseException as err:
                outcome["error"] = err
            finally:
                with self._pending_lock:
                    finished.set()
                    abandoned = state["abandoned"]
                    if abandoned:
                        self._pending.pop(str(address), None)
                if abandoned:
                    self._repair_after_late_write(address)

        worker = threading.Thread(target=run, name=f"sysfs-write-{address}", daemon=True)
        worker.start()
        finished.wait(self._write_timeout)
        with self._pending_lock:
            if not finished.is_set():
                state["abandoned"] = True
                self._pending[str(address)] = path.name
                raise _StepFailed("timeout", str(self._relative(path)))

        error = outcome.get("error")
        if isinstance(error, OSError):
            name = errno.errorcode.get(error.errno or 0, "EIO")
            raise _StepFailed(step, f"{name} writing {self._relative(path)}")
        if error is not None:
            raise error

    def _repair_after_late_write(self, address: PciAddress) -> None:
        entry = self._journal.get(str(address))
        log.info("late_write_returned", pci_address=str(address), phase=str(entry.phase) if entry else None)
        if entry is None or entry.phase == Phase.BOUND:
            return
        with self._lock:
            self._repair_one(address, entry.original_driver, entry.phase)

    def _relative(self, path: Path) -> Path:
        try:
            return path.relative_to(self._sysfs.root)
        except ValueError:
            return path

    def _device_attr(self, function: PciFunctionInfo, name: str) -> Path:
        return self._sysfs.device_dir(function.address) / name

    def _driver_attr(self, driver: str, name: str) -> Path:
        return self._sysfs.root / "bus" / "pci" / "drivers" / driver / name

    def _bus_attr(self, name: str) -> Path:
        return self._sysfs.root / "bus" / "pci" / name
