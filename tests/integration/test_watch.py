"""WatchDevices across two controllers on one PostgreSQL database, with cursors and resync."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc

from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import HOSTS_DIR, Processes, wait_for_hosts
from tests.postgres import PostgresServer


def _collect(
    stub: devices_pb2_grpc.DeviceServiceStub, request: devices_pb2.WatchDevicesRequest
) -> tuple[queue.Queue[devices_pb2.DeviceEvent], grpc.Future]:
    events: queue.Queue[devices_pb2.DeviceEvent] = queue.Queue()
    call = stub.WatchDevices(request)

    def pump() -> None:
        try:
            for event in call:
                events.put(event)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return events, call


def _next(
    events: queue.Queue[devices_pb2.DeviceEvent], kind: str, timeout: float = 10.0
) -> devices_pb2.DeviceEvent:
    while True:
        event = events.get(timeout=timeout)
        if event.kind == kind:
            return event


def test_watch_across_controllers(processes: Processes, tmp_path: Path, postgres: PostgresServer) -> None:
    database = postgres.new_database("watch")
    a = processes.controller(tmp_path / "a", "--database", database, name="controller-a")
    b = processes.controller(tmp_path / "b", "--database", database, name="controller-b")
    processes.simulated_agent(a.address, "l4.yaml")
    channel_a, channel_b = grpc.insecure_channel(a.address), grpc.insecure_channel(b.address)
    wait_for_hosts(channel_a, {"l4-01"})
    stub_a, stub_b = (
        devices_pb2_grpc.DeviceServiceStub(channel_a),
        devices_pb2_grpc.DeviceServiceStub(channel_b),
    )
    events, call = _collect(stub_b, devices_pb2.WatchDevicesRequest(host="l4-01"))

    stub_a.RegisterDevice(devices_pb2.RegisterDeviceRequest(pci_address="a2:00.0", name="l4"))
    registered = _next(events, "registered")
    stub_a.BindDevice(devices_pb2.BindDeviceRequest(id_or_name="l4"))
    bound = _next(events, "bound")
    stub_a.AttachDevice(devices_pb2.AttachDeviceRequest(id_or_name="l4", instance_id="vm-1"))
    attached = _next(events, "attached")
    call.cancel()

    assert (registered.name, registered.pci_address, registered.host) == ("l4", "0000:a2:00.0", "l4-01")
    assert "from nvidia" in bound.detail
    assert attached.detail == "vm-1"
    assert registered.cursor < bound.cursor < attached.cursor

    # A watcher that reconnects with its last cursor gets what it missed.
    stub_a.DetachDevice(devices_pb2.DetachDeviceRequest(id_or_name="l4"))
    stub_a.UnregisterDevice(devices_pb2.UnregisterDeviceRequest(id_or_name="l4"))
    resumed, call = _collect(stub_b, devices_pb2.WatchDevicesRequest(after_cursor=attached.cursor))
    kinds = [resumed.get(timeout=10).kind for _ in range(3)]
    call.cancel()
    assert kinds == ["detached", "unbound", "removed"]


def test_watch_host_unavailable_and_resync(processes: Processes, tmp_path: Path) -> None:
    controller = processes.controller(tmp_path / "state")
    agent = processes.simulated_agent(controller.address, "l4.yaml")
    channel = grpc.insecure_channel(controller.address)
    wait_for_hosts(channel, {"l4-01"})
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    events, call = _collect(stub, devices_pb2.WatchDevicesRequest())

    agent.stop()
    unavailable = _next(events, "host_unavailable")
    tree = tmp_path / "second-agent"
    tree.mkdir()
    processes.start(
        "agent-again",
        "agent",
        "--controller",
        controller.address,
        "--simulate",
        str(HOSTS_DIR / "l4.yaml"),
        "--simulate-dir",
        str(tree),
    )
    available = _next(events, "host_available")
    call.cancel()

    assert unavailable.host == available.host == "l4-01"
    assert unavailable.cursor < available.cursor
    with grpc.insecure_channel(controller.address) as fresh:
        stale_watch, call = _collect(
            devices_pb2_grpc.DeviceServiceStub(fresh), devices_pb2.WatchDevicesRequest(after_cursor=1)
        )
        first = stale_watch.get(timeout=10)
        call.cancel()
    # Cursor 1 is still retained here, so the watcher gets events, not a resync.
    assert first.kind != "resync"
    assert first.cursor > 1
