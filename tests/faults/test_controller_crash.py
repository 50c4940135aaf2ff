"""Kill -9 a controller while registrations are in flight, restart it, and retry with the same ids."""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from pathlib import Path

import grpc

from devpass import client, errors
from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, free_port, wait_for_hosts
from tests.faults.conftest import many_gpus_host, report

HOSTS = 5
PER_HOST = 200  # 5 hosts x 200 functions = 1,000 registrations


def test_controller_killed_mid_traffic(processes: Processes, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"

    def start_controller(name: str) -> None:
        processes.start(
            name,
            "controller",
            "--listen",
            address,
            "--state-dir",
            str(state_dir),
            "--heartbeat-interval",
            "1",
        )

    start_controller("controller-1")
    hosts = [f"crash-{i}" for i in range(HOSTS)]
    for host in hosts:
        description = many_gpus_host(tmp_path / f"{host}.yaml", host, PER_HOST)
        tree = tmp_path / "sim" / host
        tree.mkdir(parents=True)
        processes.start(
            f"agent-{host}",
            "agent",
            "--controller",
            address,
            "--simulate",
            str(description),
            "--simulate-dir",
            str(tree),
        )
    channel = grpc.insecure_channel(address)
    wait_for_hosts(channel, set(hosts))
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    requests = [
        devices_pb2.RegisterDeviceRequest(
            host=host, pci_address=f"0000:{0x10 + index:02x}:00.0", request_id=f"{host}-{index}"
        )
        for host in hosts
        for index in range(PER_HOST)
    ]
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()

    def first_attempt(request: devices_pb2.RegisterDeviceRequest) -> None:
        try:
            device = stub.RegisterDevice(request, timeout=30)
        except grpc.RpcError:
            return
        with lock:
            acknowledged[request.request_id] = device.id

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(first_attempt, request) for request in requests]
        # Kill the controller once part of the traffic was acknowledged.
        deadline = time.monotonic() + 30
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        processes.started[0].stop(signal.SIGKILL)
        killed_at = len(acknowledged)
        for future in futures:
            future.result()
    before_restart = dict(acknowledged)

    start_controller("controller-2")
    # A new channel with the CLI's service config, which retries UNAVAILABLE as any devpass
    # client does; the old channel backs off after the kill and would fail the first calls.
    channel = client.connect(address)
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    wait_for_hosts(channel, set(hosts))
    retried: dict[str, str] = {}
    retry_errors: list[str] = []

    def retry(request: devices_pb2.RegisterDeviceRequest) -> None:
        try:
            device = stub.RegisterDevice(request, timeout=30, wait_for_ready=True)
        except grpc.RpcError as err:
            error = errors.from_rpc_error(err)
            with lock:
                retry_errors.append(f"{request.request_id}: {error.reason if error else err.code().name}")
            return
        with lock:
            retried[request.request_id] = device.id

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(retry, requests))

    listed = []
    token = ""
    while True:
        page = stub.ListDevices(devices_pb2.ListDevicesRequest(page_size=500, page_token=token))
        listed.extend(page.devices)
        token = page.next_page_token
        if not token:
            break
    stored_ids = [d.id for d in listed]
    lost = [rid for rid, device_id in before_restart.items() if device_id not in stored_ids]
    changed = [rid for rid, device_id in before_restart.items() if retried.get(rid) != device_id]
    duplicates = len(stored_ids) - len({(d.host, d.pci_address) for d in listed})

    assert 0 < killed_at < len(requests), "the kill should land while registrations are in flight"
    assert retry_errors == []
    assert lost == []
    assert changed == []
    assert duplicates == 0
    assert len(listed) == len(requests)
    assert set(retried.values()) == set(stored_ids)
    report(
        "controller kill -9",
        operations=len(requests),
        acknowledged_before_kill=len(before_restart),
        losses=len(lost),
        duplicates=duplicates,
        retries_converged=len(retried),
    )
