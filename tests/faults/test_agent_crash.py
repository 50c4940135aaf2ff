"""Kill -9 an agent while binds are in flight, restart it on the same tree, and check every device.

After the restart each device must be on vfio-pci with a journal entry in phase
"bound", or back on its original driver with no override and no journal entry.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc

from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc
from tests.conftest import Processes, ServerProcess, wait_for_hosts
from tests.faults.conftest import many_gpus_host, report

HOST = "agent-crash"
GPUS = 100
ORIGINAL_DRIVER = "nvidia"
# The agent is killed once this many binds were acknowledged, well before all of them.
KILL_AFTER = 20
# Failures expected from calls that reached the agent as it died or after.
KILL_FAILURES = {"HOST_UNAVAILABLE", "UNAVAILABLE"}


def gpu_address(index: int) -> str:
    return f"0000:{0x10 + index:02x}:00.0"


def start_agent(
    processes: Processes, name: str, controller: str, description: Path, tree: Path
) -> ServerProcess:
    return processes.start(
        name,
        "agent",
        "--controller",
        controller,
        "--host-name",
        HOST,
        "--simulate",
        str(description),
        "--simulate-dir",
        str(tree),
    )


def wait_for_agent(channel: grpc.Channel, agent_address: str, timeout: float = 15.0) -> None:
    """Wait until the controller lists HOST as available and served by the agent at `agent_address`."""
    stub = hosts_pb2_grpc.HostServiceStub(channel)
    deadline = time.monotonic() + timeout
    listed: list[hosts_pb2.Host] = []
    while time.monotonic() < deadline:
        listed = [h for h in stub.ListHosts(hosts_pb2.ListHostsRequest(), timeout=5).hosts if h.name == HOST]
        if listed and listed[0].available and listed[0].agent_address == agent_address:
            return
        time.sleep(0.05)

    raise AssertionError(f"host {HOST} is not available at {agent_address}: {listed}")


def read_driver(device_dir: Path) -> str | None:
    link = device_dir / "driver"
    if not link.is_symlink():
        return None

    return os.path.basename(os.readlink(link))


def read_journal(path: Path) -> dict[str, dict[str, str | None]]:
    """Return the agent's journal entries by PCI address, or none when the agent never wrote the file."""
    if not path.exists():
        return {}

    return {entry["pci_address"]: entry for entry in json.loads(path.read_text())["entries"]}


def log_events(server: ServerProcess) -> list[str]:
    lines = server.log().splitlines()

    return [json.loads(line)["event"] for line in lines if line.startswith("{")]


def test_agent_killed_mid_binds(processes: Processes, tmp_path: Path) -> None:
    controller = processes.controller(tmp_path / "controller")
    description = many_gpus_host(tmp_path / f"{HOST}.yaml", HOST, GPUS)
    tree = tmp_path / "sim" / HOST
    tree.mkdir(parents=True)
    first_agent = start_agent(processes, "agent-1", controller.address, description, tree)
    channel = grpc.insecure_channel(controller.address)
    wait_for_hosts(channel, {HOST})
    stub = devices_pb2_grpc.DeviceServiceStub(channel)

    addresses = [gpu_address(index) for index in range(GPUS)]
    device_ids = {}
    for address in addresses:
        request = devices_pb2.RegisterDeviceRequest(
            host=HOST, pci_address=address, request_id=f"register-{address}"
        )
        device_ids[address] = stub.RegisterDevice(request, timeout=30).id

    acknowledged: set[str] = set()
    acknowledged_at: list[float] = []
    failures: dict[str, str] = {}
    lock = threading.Lock()

    def bind(address: str) -> None:
        request = devices_pb2.BindDeviceRequest(id_or_name=device_ids[address], request_id=f"bind-{address}")
        try:
            stub.BindDevice(request, timeout=90)
        except grpc.RpcError as err:
            error = errors.from_rpc_error(err)
            with lock:
                failures[address] = error.reason if error is not None else err.code().name
            return
        with lock:
            acknowledged.add(address)
            acknowledged_at.append(time.monotonic())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(bind, address) for address in addresses]
        deadline = time.monotonic() + 60
        while len(acknowledged) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.005)
        # The agent binds one device at a time, so the gap between responses is one bind.
        # A random part of it lets repeated runs kill at different steps of a bind.
        with lock:
            bind_seconds = (acknowledged_at[-1] - acknowledged_at[0]) / max(len(acknowledged_at) - 1, 1)
        kill_delay = random.uniform(0, bind_seconds)
        time.sleep(kill_delay)
        first_agent.stop(signal.SIGKILL)
        acknowledged_before_kill = len(acknowledged)
        for future in futures:
            future.result()

    second_agent = start_agent(processes, "agent-2", controller.address, description, tree)
    wait_for_agent(channel, second_agent.address)

    # The tree and the journal as the restarted agent left them after its repair.
    devices_dir = tree / "host" / "sys" / "bus" / "pci" / "devices"
    journal = read_journal(tree / "state" / "journal.json")
    drivers = {address: read_driver(devices_dir / address) for address in addresses}
    overrides = {
        address: (devices_dir / address / "driver_override").read_text().strip() for address in addresses
    }

    bound = [
        address
        for address in addresses
        if drivers[address] == "vfio-pci"
        and address in journal
        and journal[address]["phase"] == "bound"
        and journal[address]["original_driver"] == ORIGINAL_DRIVER
    ]
    restored = [
        address
        for address in addresses
        if drivers[address] == ORIGINAL_DRIVER and overrides[address] == "(null)" and address not in journal
    ]
    without_driver = [address for address in addresses if drivers[address] is None]
    vfio_unrecorded = [
        address for address in addresses if drivers[address] == "vfio-pci" and address not in journal
    ]
    neither = sorted(
        (address, drivers[address], overrides[address], journal.get(address))
        for address in set(addresses) - set(bound) - set(restored)
    )
    acknowledged_not_bound = sorted(acknowledged - set(bound))
    stale_journal = sorted(set(journal) - set(bound))
    unexpected_failures = {
        address: reason for address, reason in failures.items() if reason not in KILL_FAILURES
    }

    def read_views() -> dict[str, devices_pb2.Device]:
        return {
            address: stub.GetDevice(devices_pb2.GetDeviceRequest(id_or_name=device_ids[address]), timeout=10)
            for address in addresses
        }

    # The controller adopts, from the agent's journal, binds whose responses the kill cut off;
    # it does so when the restarted agent's first heartbeat arrives.
    views = read_views()
    adopt_deadline = time.monotonic() + 10
    while any(not views[a].bound_by_devpass for a in bound) and time.monotonic() < adopt_deadline:
        time.sleep(0.2)
        views = read_views()
    api_not_bound = [address for address in sorted(acknowledged) if not views[address].bound_to_vfio]
    api_not_recorded = [address for address in sorted(acknowledged) if not views[address].bound_by_devpass]
    api_disagrees = [
        address for address in addresses if views[address].bound_to_vfio != (drivers[address] == "vfio-pci")
    ]
    controller_unaware = [address for address in bound if not views[address].bound_by_devpass]

    events = log_events(second_agent)
    # On the agent's return the controller binds again every device it recorded as bound
    # that the host shows on another driver. That would hide an acknowledged bind that
    # the restart undid, so no rebind may happen.
    rebound = sum(
        int(json.loads(line).get("rebound", 0))
        for line in controller.log().splitlines()
        if line.startswith("{") and '"host_reconciled"' in line
    )
    report(
        "agent kill -9",
        operations=GPUS,
        bind_ms=round(bind_seconds * 1000),
        kill_delay_ms=round(kill_delay * 1000),
        acknowledged_before_kill=acknowledged_before_kill,
        acknowledged=len(acknowledged),
        failed=len(failures),
        bound=len(bound),
        bound_unacknowledged=len(set(bound) - acknowledged),
        restored=len(restored),
        repaired_at_restart=events.count("device_repaired"),
        without_driver=len(without_driver),
        vfio_unrecorded=len(vfio_unrecorded),
        controller_unaware=len(controller_unaware),
        rebound_by_controller=rebound,
    )

    assert "simulated_host_reopened" in events
    assert acknowledged_before_kill > 0, "the kill should land after some binds were acknowledged"
    assert len(acknowledged) < GPUS, "the kill should land before every bind was acknowledged"
    assert len(acknowledged) + len(failures) == GPUS
    assert unexpected_failures == {}
    assert without_driver == []
    assert vfio_unrecorded == []
    assert neither == []
    assert stale_journal == []
    assert acknowledged_not_bound == []
    assert rebound == 0
    assert api_not_bound == []
    assert api_not_recorded == []
    assert api_disagrees == []
    assert controller_unaware == []
