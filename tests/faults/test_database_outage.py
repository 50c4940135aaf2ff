"""PostgreSQL stops during traffic: calls fail with UNAVAILABLE, and service resumes by itself."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, wait_for_hosts
from tests.faults.conftest import many_gpus_host, report
from tests.postgres import PostgresServer

DEVICES = 200


def test_postgres_outage(processes: Processes, tmp_path: Path, postgres: PostgresServer) -> None:
    database = postgres.new_database("outage")
    controller = processes.controller(tmp_path / "state", "--database", database, "--heartbeat-interval", "1")
    description = many_gpus_host(tmp_path / "outage.yaml", "outage-01", DEVICES)
    (tmp_path / "sim").mkdir()
    processes.start(
        "agent",
        "agent",
        "--controller",
        controller.address,
        "--simulate",
        str(description),
        "--simulate-dir",
        str(tmp_path / "sim"),
    )
    channel = grpc.insecure_channel(controller.address)
    wait_for_hosts(channel, {"outage-01"})
    stub = devices_pb2_grpc.DeviceServiceStub(channel)

    acknowledged: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    next_index = iter(range(DEVICES))

    def traffic() -> None:
        while not stop.is_set():
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            name = f"gpu-{index}"
            request = devices_pb2.RegisterDeviceRequest(
                host="outage-01",
                pci_address=f"0000:{0x10 + index:02x}:00.0",
                name=name,
                request_id=f"r-{index}",
            )
            while not stop.is_set():
                try:
                    device = stub.RegisterDevice(request, timeout=20)
                except grpc.RpcError as err:
                    error = errors.from_rpc_error(err)
                    with lock:
                        outcomes[f"{err.code().name}:{error.reason if error else '-'}"] += 1
                    time.sleep(0.1)
                    continue
                with lock:
                    acknowledged[name] = device.id
                    outcomes["OK"] += 1
                break
            time.sleep(0.05)

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    postgres.stop("fast")
    outage_started = time.monotonic()
    # Longer than the registry's 5 s wait for a pooled connection, so calls do fail.
    time.sleep(8.0)
    postgres.start()
    outage_seconds = time.monotonic() - outage_started
    for worker in workers:
        worker.join(120)
    stop.set()

    assert len(acknowledged) == DEVICES
    failures = {key: count for key, count in outcomes.items() if key != "OK"}
    assert failures, "the outage should have failed some calls"
    assert set(failures) <= {"UNAVAILABLE:REGISTRY_UNAVAILABLE"}, failures
    listed = stub.ListDevices(devices_pb2.ListDevicesRequest(page_size=500)).devices
    stored = {d.name: d.id for d in listed}
    lost = [name for name, device_id in acknowledged.items() if stored.get(name) != device_id]
    assert lost == []
    assert len(listed) == len(stored) == DEVICES
    report(
        "postgres outage",
        operations=sum(outcomes.values()),
        acknowledged=len(acknowledged),
        unavailable=sum(failures.values()),
        losses=len(lost),
        duplicates=len(listed) - len(stored),
        outage_seconds=round(outage_seconds, 1),
    )
