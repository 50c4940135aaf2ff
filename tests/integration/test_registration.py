"""A controller and two agents as separate processes, each agent with its own simulated host."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import pytest

from devpass.v1 import devices_pb2
from tests.conftest import Fleet, Processes, start_fleet, wait_for_hosts
from tests.integration.helpers import rejected

Code = grpc.StatusCode
TWO_HOSTS = {"node-a": "two-hosts-a.yaml", "node-b": "two-hosts-b.yaml"}


@pytest.fixture
def fleet(processes: Processes, tmp_path: Path) -> Fleet:
    return start_fleet(processes, tmp_path / "state", TWO_HOSTS)


def _register(fleet: Fleet, pci_address: str, host: str = "", name: str = "") -> devices_pb2.Device:
    request = devices_pb2.RegisterDeviceRequest(host=host, pci_address=pci_address, name=name)
    return fleet.devices.RegisterDevice(request, timeout=20)


def _names(fleet: Fleet, **filters: str) -> list[str]:
    response = fleet.devices.ListDevices(devices_pb2.ListDevicesRequest(**filters), timeout=20)
    return [d.name for d in response.devices]


def test_register_on_each_host(fleet: Fleet) -> None:
    a = _register(fleet, "0000:a2:00.0", host="node-a", name="l4-a")
    b = _register(fleet, "a2:00.0", host="node-b", name="l4-b")

    assert (a.host, a.name, a.pci_address) == ("node-a", "l4-a", "0000:a2:00.0")
    assert (b.host, b.name, b.pci_address) == ("node-b", "l4-b", "0000:a2:00.0")
    assert a.type == "gpu"
    assert (a.vendor_id, a.device_id) == ("10de", "27b8")
    assert a.iommu_group == 82
    assert b.iommu_group == 83
    assert a.driver == "nvidia"
    assert a.bound_to_vfio is False
    assert a.attached_to == ""
    assert a.present is True
    assert a.simulated is True
    assert a.vendor_name == "NVIDIA Corporation"
    assert len(a.id) == 24
    assert a.id != b.id
    assert a.created_at.seconds > 0


def test_get_by_id_and_name(fleet: Fleet) -> None:
    registered = _register(fleet, "0000:a2:00.0", host="node-a", name="l4-a")

    by_id = fleet.devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name=registered.id))
    by_name = fleet.devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name="l4-a"))

    assert by_id == registered
    assert by_name.id == registered.id


def test_same_name_race_has_one_winner(fleet: Fleet) -> None:
    def attempt(host: str) -> devices_pb2.Device | grpc.RpcError:
        try:
            return _register(fleet, "0000:c1:00.0", host=host, name="contested")
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, ["node-a", "node-b"]))

    winners = [r for r in results if isinstance(r, devices_pb2.Device)]
    losers = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(winners) == 1
    assert len(losers) == 1
    loser_host = "node-b" if winners[0].host == "node-a" else "node-a"
    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host=loser_host, pci_address="0000:c1:00.0", name="contested"),
        Code.ALREADY_EXISTS,
        "NAME_TAKEN",
    )
    assert error.metadata["owner_host"] == winners[0].host
    assert error.metadata["owner_id"] == winners[0].id
    assert winners[0].host in error.message
    assert _names(fleet) == ["contested"]
    assert _names(fleet, host=loser_host) == []


def test_auto_names_for_same_address(fleet: Fleet) -> None:
    first = _register(fleet, "0000:a2:00.0", host="node-a")
    second = _register(fleet, "0000:a2:00.0", host="node-b")

    assert first.name == "pci-0000-a2-00-0"
    assert second.name == "pci-0000-a2-00-0.node-b"
    assert _names(fleet) == ["pci-0000-a2-00-0", "pci-0000-a2-00-0.node-b"]


def test_list_filters(fleet: Fleet) -> None:
    _register(fleet, "0000:a2:00.0", host="node-a", name="a-gpu")
    _register(fleet, "0000:a2:00.0", host="node-b", name="b-gpu")
    nic = _register(fleet, fleet_nic_address(fleet, "node-a"), host="node-a", name="a-nic")

    assert nic.type == "pci"
    assert _names(fleet, host="node-a") == ["a-gpu", "a-nic"]
    assert _names(fleet, type="gpu") == ["a-gpu", "b-gpu"]
    assert _names(fleet, host="node-a", type="pci") == ["a-nic"]
    assert _names(fleet, host="node-z") == []
    rejected(
        fleet.devices.ListDevices,
        devices_pb2.ListDevicesRequest(type="fpga"),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


def fleet_nic_address(fleet: Fleet, host: str) -> str:
    """Return the address of a network controller on `host` that is not a bridge."""
    response = fleet.devices.ListAvailableDevices(
        devices_pb2.ListAvailableDevicesRequest(host=host), timeout=20
    )
    nics = [d.function.pci_address for d in response.devices if d.function.class_code.startswith("02")]
    assert nics, f"{host} has no network controller"
    return nics[0]


def test_pagination(fleet: Fleet) -> None:
    _register(fleet, "0000:a2:00.0", host="node-a", name="d1")
    _register(fleet, "0000:c1:00.0", host="node-a", name="d2")
    _register(fleet, "0000:a2:00.0", host="node-b", name="d3")
    _register(fleet, "0000:c1:00.0", host="node-b", name="d4")
    _register(fleet, fleet_nic_address(fleet, "node-b"), host="node-b", name="d5")

    pages: list[list[str]] = []
    token = ""
    while True:
        response = fleet.devices.ListDevices(devices_pb2.ListDevicesRequest(page_size=2, page_token=token))
        pages.append([d.name for d in response.devices])
        token = response.next_page_token
        if not token:
            break

    assert pages == [["d1", "d2"], ["d3", "d4"], ["d5"]]
    first = fleet.devices.ListDevices(devices_pb2.ListDevicesRequest(page_size=2, host="node-b"))
    assert [d.name for d in first.devices] == ["d3", "d4"]
    second = fleet.devices.ListDevices(
        devices_pb2.ListDevicesRequest(page_size=2, host="node-b", page_token=first.next_page_token)
    )
    assert [d.name for d in second.devices] == ["d5"]
    assert second.next_page_token == ""
    rejected(
        fleet.devices.ListDevices,
        devices_pb2.ListDevicesRequest(page_size=2, page_token="not-a-token"),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    rejected(
        fleet.devices.ListDevices,
        devices_pb2.ListDevicesRequest(page_size=2, host="node-a", page_token=first.next_page_token),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


def test_unregister(fleet: Fleet) -> None:
    device = _register(fleet, "0000:a2:00.0", host="node-a", name="l4-a")

    response = fleet.devices.UnregisterDevice(devices_pb2.UnregisterDeviceRequest(id_or_name="l4-a"))

    assert response.device.id == device.id
    assert _names(fleet) == []
    rejected(
        fleet.devices.GetDevice,
        devices_pb2.GetDeviceRequest(id_or_name=device.id),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    rejected(
        fleet.devices.UnregisterDevice,
        devices_pb2.UnregisterDeviceRequest(id_or_name="l4-a"),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    again = _register(fleet, "0000:a2:00.0", host="node-a", name="l4-a")
    assert again.id != device.id


def test_invalid_address_reads_nothing(fleet: Fleet) -> None:
    for text in ["0000:82.0.0", "../../../../etc/passwd", "0000:a2:00.0/../.."]:
        error = rejected(
            fleet.devices.RegisterDevice,
            devices_pb2.RegisterDeviceRequest(host="node-a", pci_address=text),
            Code.INVALID_ARGUMENT,
            "INVALID_PCI_ADDRESS",
        )
        assert repr(text) in error.message

    assert "InspectFunction" not in fleet.agents["node-a"].log()
    assert _names(fleet) == []


def test_invalid_name(fleet: Fleet) -> None:
    for name in ["-bad", "has space", "x" * 64, "a"]:
        rejected(
            fleet.devices.RegisterDevice,
            devices_pb2.RegisterDeviceRequest(host="node-a", pci_address="0000:a2:00.0", name=name),
            Code.INVALID_ARGUMENT,
            "INVALID_NAME",
        )

    assert _names(fleet) == []


def test_pci_device_not_found(fleet: Fleet) -> None:
    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host="node-a", pci_address="0000:ee:1f.7"),
        Code.NOT_FOUND,
        "PCI_DEVICE_NOT_FOUND",
    )

    assert error.metadata["pci_address"] == "0000:ee:1f.7"
    assert error.metadata["host"] == "node-a"
    assert _names(fleet) == []


def test_device_not_found(fleet: Fleet) -> None:
    error = rejected(
        fleet.devices.GetDevice,
        devices_pb2.GetDeviceRequest(id_or_name="ghost"),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )

    assert "ghost" in error.message


def test_duplicate_registration(fleet: Fleet) -> None:
    first = _register(fleet, "0000:a2:00.0", host="node-a", name="l4-a")

    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host="node-a", pci_address="0000:A2:00.0", name="other"),
        Code.ALREADY_EXISTS,
        "DEVICE_ALREADY_REGISTERED",
    )

    assert error.metadata["owner_id"] == first.id
    assert _names(fleet) == ["l4-a"]


def test_name_taken_on_same_host(fleet: Fleet) -> None:
    owner = _register(fleet, "0000:a2:00.0", host="node-a", name="gpu")

    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host="node-a", pci_address="0000:c1:00.0", name="gpu"),
        Code.ALREADY_EXISTS,
        "NAME_TAKEN",
    )

    assert error.metadata["owner_pci_address"] == owner.pci_address
    assert _names(fleet) == ["gpu"]


def test_host_unknown(fleet: Fleet) -> None:
    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host="node-z", pci_address="0000:a2:00.0"),
        Code.NOT_FOUND,
        "HOST_UNKNOWN",
    )

    assert "node-a" in error.message
    assert _names(fleet) == []


def test_host_required_with_two_hosts(fleet: Fleet) -> None:
    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:a2:00.0"),
        Code.INVALID_ARGUMENT,
        "HOST_REQUIRED",
    )

    assert "node-a, node-b" in error.message


def test_host_unavailable(fleet: Fleet) -> None:
    device = _register(fleet, "0000:a2:00.0", host="node-b", name="b-gpu")
    fleet.agents["node-b"].stop()
    wait_for_hosts(fleet.channel, {"node-b"}, available=False)

    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host="node-b", pci_address="0000:c1:00.0"),
        Code.UNAVAILABLE,
        "HOST_UNAVAILABLE",
    )
    assert error.metadata["host"] == "node-b"
    last_known = fleet.devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name=device.id))
    assert last_known.host_available is False
    assert last_known.driver == "nvidia"
    assert last_known.state_observed_at.seconds > 0
    available = fleet.devices.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest())
    assert [h.host for h in available.unreachable_hosts] == ["node-b"]
    assert {d.host for d in available.devices} == {"node-a"}
    rejected(
        fleet.devices.ListAvailableDevices,
        devices_pb2.ListAvailableDevicesRequest(host="node-b"),
        Code.UNAVAILABLE,
        "HOST_UNAVAILABLE",
    )


def test_available_devices(fleet: Fleet) -> None:
    _register(fleet, "0000:a2:00.0", host="node-a", name="a-gpu")

    response = fleet.devices.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest(host="node-a"))
    by_address = {d.function.pci_address: d for d in response.devices}

    assert {d.host for d in response.devices} == {"node-a"}
    assert by_address["0000:a2:00.0"].registered_name == "a-gpu"
    assert by_address["0000:a2:00.0"].assignability.assignable is True
    assert by_address["0000:c1:00.0"].registered_name == ""
    assert all(not d.function.class_code.startswith("0604") for d in response.devices)
    assert all(d.simulated for d in response.devices)
    whole_fleet = fleet.devices.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest())
    assert {d.host for d in whole_fleet.devices} == {"node-a", "node-b"}
    assert list(whole_fleet.unreachable_hosts) == []
