"""The agent's reads on simulated trees built from the host descriptions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import safety
from agent.pciids import PciIds
from agent.simulate import HostDescription, SimulatedHost
from agent.sysfs import Sysfs
from agent.usage import HostUsageScanner
from devpass.errors import PciDeviceNotFound
from devpass.pci import PciAddress
from tests.conftest import HOSTS_DIR

PCI_IDS = PciIds.parse(
    "# test database\n"
    "10de  NVIDIA Corporation\n"
    "\t2330  GH100 [H100 SXM5 80GB]\n"
    "\t\t10de 16c1  H100 SXM5 80GB\n"
    "15b3  Mellanox Technologies\n"
    "C 03  Display controller\n"
    "\t00  VGA compatible controller\n"
)


def _host(tmp_path: Path, description: str) -> tuple[SimulatedHost, Sysfs]:
    host = SimulatedHost.build(HostDescription.from_yaml(HOSTS_DIR / description), tmp_path / "host")
    return host, Sysfs(host.sysfs_root, PCI_IDS)


def test_hgx_gpus(tmp_path: Path) -> None:
    _, sysfs = _host(tmp_path, "hgx-h100.yaml")
    functions = sysfs.list_functions()
    gpus = [f for f in functions if f.type == "gpu"]

    assert len(gpus) == 8
    assert {(f.vendor_id, f.device_id, f.class_code) for f in gpus} == {("10de", "2330", 0x030200)}
    assert len({f.iommu_group for f in gpus}) == 8
    assert {f.driver for f in gpus} == {"nvidia"}
    assert {f.numa_node for f in gpus} == {0, 1}
    assert gpus[0].vendor_name == "NVIDIA Corporation"
    assert gpus[0].device_name == "GH100 [H100 SXM5 80GB]"
    assert not sysfs.uses_udev
    assert sysfs.iommu_enabled()
    assert sysfs.vfio_available()
    switches = [f for f in functions if (f.vendor_id, f.device_id) == ("10de", "22a3")]
    assert len(switches) == 4
    assert all(f.type == "pci" for f in switches)


def test_read_function_fields(tmp_path: Path) -> None:
    _, sysfs = _host(tmp_path, "l4.yaml")

    l4 = sysfs.read_function(PciAddress.parse("0000:a2:00.0"))
    vmd = sysfs.read_function(PciAddress.parse("10001:8a:00.0"))

    assert (l4.vendor_id, l4.device_id, l4.class_code) == ("10de", "27b8", 0x030200)
    assert l4.iommu_group == 82
    assert l4.driver == "nvidia"
    assert l4.driver_override is None
    assert l4.revision == "a1"
    assert l4.numa_node == 1
    assert l4.bound_to_vfio is False
    assert l4.physfn is None
    assert vmd.iommu_group == 90
    assert vmd.driver == "nvme"


def test_missing_function(tmp_path: Path) -> None:
    _, sysfs = _host(tmp_path, "l4.yaml")

    with pytest.raises(PciDeviceNotFound) as caught:
        sysfs.read_function(PciAddress.parse("0000:ee:00.0"))

    assert caught.value.metadata == {"pci_address": "0000:ee:00.0"}


def test_link_escaping_root_is_rejected(tmp_path: Path) -> None:
    _, sysfs = _host(tmp_path, "l4.yaml")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, sysfs.root / "bus" / "pci" / "devices" / "0000:ff:00.0")

    with pytest.raises(ValueError, match="outside the sysfs root"):
        sysfs.read_function(PciAddress.parse("0000:ff:00.0"))


def _usage(host: SimulatedHost) -> HostUsageScanner:
    return HostUsageScanner(host.sysfs_root, host.proc_root, host.dev_root)


def test_no_iommu(tmp_path: Path) -> None:
    host, sysfs = _host(tmp_path, "no-iommu.yaml")
    gpu = sysfs.read_function(PciAddress.parse("0000:a2:00.0"))

    assert not sysfs.iommu_enabled()
    assert not sysfs.vfio_available()
    assert gpu.iommu_group is None
    assert [b.reason for b in safety.blockers(sysfs, _usage(host), gpu)] == [
        "IOMMU_UNAVAILABLE",
        "VFIO_UNAVAILABLE",
    ]


def test_gpu_audio_group_blocker(tmp_path: Path) -> None:
    host, sysfs = _host(tmp_path, "workstation.yaml")
    gpu = sysfs.read_function(PciAddress.parse("0000:01:00.0"))

    blockers = safety.blockers(sysfs, _usage(host), gpu)

    assert [b.reason for b in blockers] == ["IOMMU_GROUP_NOT_VIABLE"]
    # The root port shares the group but is a bridge, so only the audio function blocks.
    assert blockers[0].pci_addresses == (PciAddress.parse("0000:01:00.1"),)
    assert "0000:01:00.1 (snd_hda_intel)" in blockers[0].message
    assert "0000:00:01.0" not in blockers[0].message


def test_sibling_on_vfio_does_not_block(tmp_path: Path) -> None:
    host, sysfs = _host(tmp_path, "workstation.yaml")
    audio = host.device_path("0000:01:00.1")
    host.kernel.write(audio / "driver_override", "vfio-pci")
    host.kernel.write(sysfs.root / "bus" / "pci" / "drivers" / "snd_hda_intel" / "unbind", "0000:01:00.1")
    host.kernel.write(sysfs.root / "bus" / "pci" / "drivers_probe", "0000:01:00.1")

    gpu = sysfs.read_function(PciAddress.parse("0000:01:00.0"))
    moved = sysfs.read_function(PciAddress.parse("0000:01:00.1"))

    assert moved.bound_to_vfio
    assert moved.driver_override == "vfio-pci"
    assert safety.blockers(sysfs, _usage(host), gpu) == []


def test_late_vfs_name_their_pf(tmp_path: Path) -> None:
    host, sysfs = _host(tmp_path, "hgx-h100.yaml")
    pf_address = PciAddress.parse("0000:19:00.0")
    before = len(sysfs.list_addresses())

    host.kernel.write(host.device_path(str(pf_address)) / "sriov_numvfs", "4")

    pf = sysfs.read_function(pf_address)
    assert len(sysfs.list_addresses()) == before + 4
    assert len(pf.virtfns) == 4
    for vf_address in pf.virtfns:
        vf = sysfs.read_function(vf_address)
        assert vf.physfn == pf_address
        assert vf.device_id == "101e"
        assert vf.iommu_group in {90, 91, 92, 93}


def test_serial_number_from_config_space(tmp_path: Path) -> None:
    host, sysfs = _host(tmp_path, "hgx-h100.yaml")
    with_serial = [d for d in host.description.devices if d.serial]
    if not with_serial:
        pytest.skip("no description sets a serial number")

    function = sysfs.read_function(PciAddress.parse(with_serial[0].address))

    assert function.serial_number == with_serial[0].serial.replace("-", "").lower()


def test_pci_ids_parse() -> None:
    assert PCI_IDS.vendor_name("15b3") == "Mellanox Technologies"
    assert PCI_IDS.device_name("10de", "2330") == "GH100 [H100 SXM5 80GB]"
    assert PCI_IDS.device_name("10de", "0000") == ""
    assert PCI_IDS.vendor_name("ffff") == ""
    assert ("03", "00") not in PCI_IDS.devices
