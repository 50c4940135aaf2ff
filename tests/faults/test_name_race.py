"""Two controllers on one registry, and pairs of registrations racing for every name."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import grpc
import pytest

from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, wait_for_hosts
from tests.faults.conftest import many_gpus_host, report
from tests.postgres import PostgresServer

PAIRS = 200


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.new_database("race")

    return f"sqlite:///{tmp_path / 'shared' / 'registry.sqlite3'}"


def test_name_race_two_controllers(processes: Processes, tmp_path: Path, database: str) -> None:
    controllers = [
        # One-second heartbeats: 400 binds in a few seconds load both hosts' agents.
        processes.controller(
            tmp_path / f"state-{i}",
            "--database",
            database,
            "--heartbeat-interval",
            "1",
            name=f"controller-{i}",
        )
        for i in range(2)
    ]
    hosts = ["race-a", "race-b"]
    for controller, host in zip(controllers, hosts, strict=True):
        description = many_gpus_host(tmp_path / f"{host}.yaml", host, PAIRS)
        tree = tmp_path / "sim" / host
        tree.mkdir(parents=True)
        processes.start(
            f"agent-{host}",
            "agent",
            "--controller",
            controller.address,
            "--simulate",
            str(description),
            "--simulate-dir",
            str(tree),
        )
    channels = [grpc.insecure_channel(c.address) for c in controllers]
    for channel in channels:
        wait_for_hosts(channel, set(hosts))
    stubs = [devices_pb2_grpc.DeviceServiceStub(channel) for channel in channels]

    def register(index: int, side: int) -> tuple[int, int, devices_pb2.Device | errors.DevpassError]:
        request = devices_pb2.RegisterDeviceRequest(
            host=hosts[side],
            pci_address=f"0000:{0x10 + index:02x}:00.0",
            name=f"race-{index}",
            bind_vfio=True,
        )
        try:
            return index, side, stubs[side].RegisterDevice(request, timeout=60)
        except grpc.RpcError as err:
            error = errors.from_rpc_error(err)
            assert error is not None, f"{err.code()}: {err.details()}"
            return index, side, error

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        # Each pair's two calls go to different controllers for different hosts, back to back.
        futures = [pool.submit(register, index, side) for index in range(PAIRS) for side in (0, 1)]
        results = [future.result() for future in futures]
    elapsed = time.monotonic() - started

    winners: dict[int, devices_pb2.Device] = {}
    losers: dict[int, tuple[int, errors.DevpassError]] = {}
    for index, side, outcome in results:
        if isinstance(outcome, devices_pb2.Device):
            assert index not in winners, f"race-{index} won twice"
            winners[index] = outcome
        else:
            losers[index] = (side, outcome)
    unexpected = [
        (i, s, e.reason, e.message[:200]) for i, (s, e) in losers.items() if e.reason != "NAME_TAKEN"
    ]
    assert unexpected == []
    assert sorted(winners) == list(range(PAIRS))
    assert sorted(losers) == list(range(PAIRS))
    for index, (side, error) in losers.items():
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert error.reason == "NAME_TAKEN"
        assert error.metadata["owner_host"] == winners[index].host
        assert error.metadata["owner_id"] == winners[index].id
        assert winners[index].host != hosts[side]

    listed = stubs[0].ListDevices(devices_pb2.ListDevicesRequest(page_size=500)).devices
    names = [d.name for d in listed]
    assert len(names) == PAIRS
    assert len(set(names)) == PAIRS
    drivers = {}
    for host, stub in zip(hosts, stubs, strict=True):
        available = stub.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest(host=host)).devices
        drivers.update({(host, d.function.pci_address): d.function.driver for d in available})
    losers_bound = 0
    for index, (side, _) in losers.items():
        address = f"0000:{0x10 + index:02x}:00.0"
        if drivers[(hosts[side], address)] != "nvidia":
            losers_bound += 1
        assert drivers[(winners[index].host, address)] == "vfio-pci"
    assert losers_bound == 0
    report(
        f"name race on {database.split(':', 1)[0]}",
        registrations=2 * PAIRS,
        winners=len(winners),
        duplicates=len(names) - len(set(names)),
        losers_bound=losers_bound,
        seconds=round(elapsed, 1),
    )
