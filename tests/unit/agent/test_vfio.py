"""The bind and restore sequences on a simulated kernel, including every injected fault."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.journal import Journal, Phase
from agent.simulate import HostDescription, SimulatedHost
from agent.sysfs import Identity, Sysfs
from agent.usage import CriticalUse, Holder
from agent.vfio import Binder
from devpass.errors import (
    BindFailed,
    HostCriticalDevice,
    IdentityMismatch,
    IommuGroupNotViable,
    WritePending,
    WriteTimedOut,
)
from devpass.pci import PciAddress
from tests.conftest import HOSTS_DIR

L4 = PciAddress.parse("0000:a2:00.0")
WRITE_TIMEOUT = 0.3


@dataclass
class StaticUsage:
    """HostUsage with fixed results, so these tests exercise the binder alone."""

    critical: dict[PciAddress, list[CriticalUse]] = field(default_factory=dict)
    held: dict[PciAddress, list[Holder]] = field(default_factory=dict)

    def critical_uses(self, address: PciAddress) -> list[CriticalUse]:
        return self.critical.get(address, [])

    def holders(self, address: PciAddress) -> list[Holder]:
        return self.held.get(address, [])


@dataclass
class Rig:
    host: SimulatedHost
    sysfs: Sysfs
    journal: Journal
    usage: StaticUsage
    binder: Binder

    def driver(self, address: PciAddress = L4) -> str | None:
        return self.sysfs.read_function(address).driver

    def override(self, address: PciAddress = L4) -> str | None:
        return self.sysfs.read_function(address).driver_override

    def restart(self) -> Binder:
        """Return a binder as a restarted agent builds it: same tree, journal read from disk."""
        journal = Journal(self.journal.path)
        return Binder(
            self.sysfs,
            self.host.kernel,
            journal,
            self.usage,
            dev_root=self.host.dev_root,
            write_timeout=WRITE_TIMEOUT,
        )


def build_rig(tmp_path: Path, description: str = "l4.yaml") -> Rig:
    host = SimulatedHost.build(HostDescription.from_yaml(HOSTS_DIR / description), tmp_path / "host")
    host.kernel.hang_timeout = 10.0
    sysfs = Sysfs(host.sysfs_root)
    journal = Journal(tmp_path / "state" / "journal.json")
    usage = StaticUsage()
    binder = Binder(sysfs, host.kernel, journal, usage, dev_root=host.dev_root, write_timeout=WRITE_TIMEOUT)
    return Rig(host, sysfs, journal, usage, binder)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    built = build_rig(tmp_path)
    yield built
    built.host.kernel.release_hangs()


def test_bind_and_restore(rig: Rig) -> None:
    moves = rig.binder.bind(L4)

    assert [(str(m.address), m.from_driver, m.driver) for m in moves] == [
        ("0000:a2:00.0", "nvidia", "vfio-pci")
    ]
    assert rig.driver() == "vfio-pci"
    assert (rig.host.dev_root / "vfio" / "82").exists()
    assert rig.journal.get("0000:a2:00.0") is not None
    assert rig.journal.get("0000:a2:00.0").phase == Phase.BOUND  # type: ignore[union-attr]
    assert not any("new_id" in path for path, _ in rig.host.kernel.writes)

    restored = rig.binder.restore(L4)

    assert (restored.from_driver, restored.driver) == ("vfio-pci", "nvidia")
    assert rig.driver() == "nvidia"
    assert rig.override() is None
    assert not (rig.host.dev_root / "vfio" / "82").exists()
    assert rig.journal.get("0000:a2:00.0") is None


def test_bind_writes_in_order(rig: Rig) -> None:
    rig.binder.bind(L4)

    attributes = [path.rsplit("/", 1)[-1] for path, _ in rig.host.kernel.writes]
    values = [value for _, value in rig.host.kernel.writes]
    assert attributes == ["driver_override", "unbind", "drivers_probe"]
    assert values == ["vfio-pci", "0000:a2:00.0", "0000:a2:00.0"]


def test_bind_twice_is_idempotent(rig: Rig) -> None:
    rig.binder.bind(L4)
    writes = len(rig.host.kernel.writes)

    again = rig.binder.bind(L4)

    assert [(m.from_driver, m.driver) for m in again] == [("nvidia", "vfio-pci")]
    assert len(rig.host.kernel.writes) == writes


def test_identity_mismatch_writes_nothing(rig: Rig) -> None:
    other = Identity("10de", "2330", "10de", "16c1")

    with pytest.raises(IdentityMismatch) as caught:
        rig.binder.bind(L4, expected=other)

    assert "device_id 2330 -> 27b8" in caught.value.message
    assert rig.host.kernel.writes == []
    assert rig.driver() == "nvidia"


def test_host_critical_needs_force(rig: Rig) -> None:
    rig.usage.critical[L4] = [CriticalUse("mounted_filesystem", "/ is mounted from /dev/nvme0n1p1")]

    with pytest.raises(HostCriticalDevice) as caught:
        rig.binder.bind(L4)
    assert "/ is mounted from /dev/nvme0n1p1" in caught.value.message
    assert rig.host.kernel.writes == []

    rig.binder.bind(L4, force=True)
    assert rig.driver() == "vfio-pci"


BIND_STEPS = ["driver_override", "unbind", "drivers_probe"]
RESTORE_STEPS = ["driver_override", "unbind", "drivers_probe"]
FAULTS = ["EBUSY", "ENODEV"]


@pytest.mark.parametrize(("step", "fault"), list(itertools.product(BIND_STEPS, FAULTS)))
def test_bind_fault_rolls_back(rig: Rig, step: str, fault: str) -> None:
    rig.host.kernel.inject_fault(step, fault)  # type: ignore[arg-type]

    with pytest.raises(BindFailed) as caught:
        rig.binder.bind(L4)

    assert caught.value.metadata["step"] == step
    assert caught.value.metadata["rollback"] == "succeeded"
    assert fault in caught.value.metadata["error"]
    assert rig.driver() == "nvidia"
    assert rig.override() is None
    assert rig.journal.get("0000:a2:00.0") is None


@pytest.mark.parametrize(("step", "fault"), list(itertools.product(RESTORE_STEPS, FAULTS)))
def test_restore_fault_returns_to_vfio(rig: Rig, step: str, fault: str) -> None:
    rig.binder.bind(L4)
    rig.host.kernel.inject_fault(step, fault)  # type: ignore[arg-type]

    with pytest.raises(BindFailed) as caught:
        rig.binder.restore(L4)

    assert caught.value.metadata["step"] == step
    assert caught.value.metadata["rollback"] == "succeeded"
    assert rig.driver() == "vfio-pci"
    assert rig.binder.bound_by_devpass(L4)
    # The device is still restorable once the fault is gone.
    assert rig.binder.restore(L4).driver == "nvidia"


@pytest.mark.parametrize("step", BIND_STEPS)
def test_bind_hang_times_out_then_repairs(rig: Rig, step: str) -> None:
    rig.host.kernel.inject_fault(step, "HANG")  # type: ignore[arg-type]

    with pytest.raises(WriteTimedOut) as caught:
        rig.binder.bind(L4)

    assert caught.value.metadata["attribute"].endswith(step)
    with pytest.raises(WritePending):
        rig.binder.bind(L4)
    assert rig.journal.get("0000:a2:00.0").phase == Phase.BINDING  # type: ignore[union-attr]

    rig.host.kernel.release_hangs()
    _wait_until(lambda: rig.journal.get("0000:a2:00.0") is None)
    assert rig.driver() == "nvidia"
    assert rig.override() is None


@pytest.mark.parametrize("step", RESTORE_STEPS)
def test_restore_hang_times_out_then_repairs(rig: Rig, step: str) -> None:
    rig.binder.bind(L4)
    rig.host.kernel.inject_fault(step, "HANG")  # type: ignore[arg-type]

    with pytest.raises(WriteTimedOut):
        rig.binder.restore(L4)

    rig.host.kernel.release_hangs()
    _wait_until(lambda: rig.journal.get("0000:a2:00.0") is None)
    assert rig.driver() == "nvidia"


def test_failed_rollback_reports_state(rig: Rig) -> None:
    # The probe to vfio-pci fails, and so does the probe that should bring nvidia back.
    rig.host.kernel.inject_fault("drivers_probe", "ENODEV", times=2)

    with pytest.raises(BindFailed) as caught:
        rig.binder.bind(L4)

    assert caught.value.metadata["rollback"] == "failed"
    assert caught.value.metadata["driver"] == ""
    assert "no driver" in caught.value.message
    assert rig.driver() is None
    # The journal keeps the entry, so a restart repairs the device.
    assert rig.journal.get("0000:a2:00.0").phase == Phase.BINDING  # type: ignore[union-attr]

    repaired = rig.restart().repair()

    assert [(m.from_driver, m.driver) for m in repaired] == [(None, "nvidia")]
    assert rig.driver() == "nvidia"


def test_crash_between_unbind_and_probe_is_repaired(rig: Rig) -> None:
    # What a killed agent leaves: intent journalled, override written, driver unbound.
    rig.journal.put("0000:a2:00.0", "nvidia", Phase.BINDING)
    device = rig.host.device_path("0000:a2:00.0")
    rig.host.kernel.write(device / "driver_override", "vfio-pci")
    rig.host.kernel.write(rig.sysfs.root / "bus/pci/drivers/nvidia/unbind", "0000:a2:00.0")
    assert rig.driver() is None

    repaired = rig.restart().repair()

    assert [(str(m.address), m.driver) for m in repaired] == [("0000:a2:00.0", "nvidia")]
    assert rig.driver() == "nvidia"
    assert rig.override() is None
    assert Journal(rig.journal.path).get("0000:a2:00.0") is None


def test_bound_device_survives_repair(rig: Rig) -> None:
    rig.binder.bind(L4)

    assert rig.restart().repair() == []
    assert rig.driver() == "vfio-pci"


def test_group_needs_include_group(tmp_path: Path) -> None:
    rig = build_rig(tmp_path, "workstation.yaml")
    gpu, audio = PciAddress.parse("0000:01:00.0"), PciAddress.parse("0000:01:00.1")

    with pytest.raises(IommuGroupNotViable) as caught:
        rig.binder.bind(gpu)
    assert "0000:01:00.1 (snd_hda_intel" in caught.value.message
    assert "include_group" in caught.value.message
    assert rig.host.kernel.writes == []

    moves = rig.binder.bind(gpu, include_group=True)

    assert sorted(str(m.address) for m in moves) == ["0000:01:00.0", "0000:01:00.1"]
    assert rig.driver(gpu) == "vfio-pci"
    assert rig.driver(audio) == "vfio-pci"
    assert rig.driver(PciAddress.parse("0000:00:01.0")) == "pcieport"
    rig.binder.restore(audio)
    assert rig.driver(audio) == "snd_hda_intel"


def test_group_rollback_undoes_siblings(tmp_path: Path) -> None:
    rig = build_rig(tmp_path, "workstation.yaml")
    gpu, audio = PciAddress.parse("0000:01:00.0"), PciAddress.parse("0000:01:00.1")
    rig.host.kernel.inject_fault("drivers_probe", "ENODEV", address="0000:01:00.1")

    with pytest.raises(BindFailed) as caught:
        rig.binder.bind(gpu, include_group=True)

    assert caught.value.metadata["rollback"] == "succeeded"
    assert rig.driver(gpu) == "nvidia"
    assert rig.driver(audio) == "snd_hda_intel"
    assert rig.journal.entries() == []


def _wait_until(condition: object, timeout: float = 5.0) -> None:
    done = threading.Event()
    deadline = 0.0
    while deadline < timeout:
        if condition():  # type: ignore[operator]
            return
        done.wait(0.02)
        deadline += 0.02
    raise AssertionError("condition not reached")
