"""Cut an agent's host off the network with a link down, then bring it back.

The agent runs in a network namespace of the test's own, joined to the controller by a
veth pair. Setting the namespace side of the pair down drops every packet between them
without closing a socket, as a pulled cable or a dead switch would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc
from tests.conftest import HOSTS_DIR, Processes, wait_for_hosts
from tests.faults.conftest import report
from tests.faults.netns import VethNamespace, start_in_namespace, veth_namespace

HEARTBEAT_INTERVAL = 0.5
MISSED_HEARTBEATS = 3
UNAVAILABLE_AFTER = HEARTBEAT_INTERVAL * MISSED_HEARTBEATS
# No heartbeat arrives after the cut, so the host turns unavailable at most UNAVAILABLE_AFTER
# after it. The limit adds one interval and 1.5 s of slack for polling and a loaded CI machine.
DETECT_LIMIT_SECONDS = (MISSED_HEARTBEATS + 1) * HEARTBEAT_INTERVAL + 1.5
# A call for an unavailable host must not wait for the agent (10 s deadline by default).
FAIL_FAST_LIMIT_SECONDS = 1.0
# The agent keeps sending a heartbeat every interval during the outage, so the first one
# after the link comes back should get through within an interval, plus the same slack.
RECOVER_LIMIT_SECONDS = HEARTBEAT_INTERVAL + 1.5
# How long to poll before giving up, longer than the limits so that a slow transition is
# measured and reported rather than cut short.
POLL_TIMEOUT = 30.0
# Client deadline of calls to the controller: longer than the controller's 10 s agent
# deadline, so that a call which does wait for the agent shows up as a measured duration.
CALL_TIMEOUT = 15.0

HOST = "l4-01"
GPU = "0000:a2:00.0"
DATA_DRIVE = "10001:8a:00.0"
AGENT_PORT = 50052


@pytest.fixture
def network() -> Iterator[VethNamespace]:
    with veth_namespace() as namespace:
        yield namespace


def _listed_host(hosts: hosts_pb2_grpc.HostServiceStub, name: str) -> hosts_pb2.Host:
    listed = hosts.ListHosts(hosts_pb2.ListHostsRequest(), timeout=5).hosts
    for host in listed:
        if host.name == name:
            return host

    raise AssertionError(f"host {name} is not listed: {[h.name for h in listed]}")


def _wait_for_availability(
    hosts: hosts_pb2_grpc.HostServiceStub, *, available: bool, timeout: float
) -> tuple[float, hosts_pb2.Host]:
    """Poll ListHosts until HOST has the given availability, and return the seconds it took and the host."""
    started = time.monotonic()
    while True:
        host = _listed_host(hosts, HOST)
        elapsed = time.monotonic() - started
        if host.available is available:
            return elapsed, host
        if elapsed > timeout:
            raise AssertionError(
                f"{HOST} still has available={host.available} after {elapsed:.1f} s "
                f"(heartbeat age {host.heartbeat_age_seconds} s)"
            )
        time.sleep(0.02)


def _time_host_unavailable(name: str, call: Callable[[], object]) -> float:
    """Run `call`, check that it fails with HOST_UNAVAILABLE for HOST, and return its duration in seconds."""
    started = time.monotonic()
    try:
        result = call()
    except grpc.RpcError as err:
        elapsed = time.monotonic() - started
        error = errors.from_rpc_error(err)
        assert error is not None, f"{name}: {err.code()} without ErrorInfo: {err.details()}"
        assert error.code == grpc.StatusCode.UNAVAILABLE, f"{name}: {error.code} {error.message}"
        assert error.reason == "HOST_UNAVAILABLE", f"{name}: {error.reason} {error.message}"
        assert error.metadata.get("host") == HOST, f"{name}: {error.metadata}"
        return elapsed

    raise AssertionError(f"{name} succeeded for a host that was cut off: {result}")


def test_host_cutoff(network: VethNamespace, processes: Processes, tmp_path: Path) -> None:
    controller = processes.start(
        "controller",
        "controller",
        "--listen",
        f"{network.host_address}:0",
        "--insecure",
        "--state-dir",
        str(tmp_path / "state"),
        "--heartbeat-interval",
        str(HEARTBEAT_INTERVAL),
        "--missed-heartbeats",
        str(MISSED_HEARTBEATS),
    )
    tree = tmp_path / "sim" / HOST
    tree.mkdir(parents=True)
    agent = start_in_namespace(
        processes,
        network,
        "agent-l4",
        "agent",
        "--controller",
        controller.address,
        "--listen",
        f"{network.namespace_address}:{AGENT_PORT}",
        "--insecure",
        "--simulate",
        str(HOSTS_DIR / "l4.yaml"),
        "--simulate-dir",
        str(tree),
    )
    channel = grpc.insecure_channel(controller.address)
    devices = devices_pb2_grpc.DeviceServiceStub(channel)
    hosts = hosts_pb2_grpc.HostServiceStub(channel)
    wait_for_hosts(channel, {HOST})
    assert _listed_host(hosts, HOST).agent_address == f"{network.namespace_address}:{AGENT_PORT}"

    registered = devices.RegisterDevice(
        devices_pb2.RegisterDeviceRequest(host=HOST, pci_address=GPU, name="l4-gpu"), timeout=CALL_TIMEOUT
    )
    assert registered.driver == "nvidia"
    assert registered.host_available

    # Cut: from here on no heartbeat reaches the controller, and nothing reaches the agent.
    # The cut usually lands within 0.1 s after the agent's first heartbeat, because
    # wait_for_hosts returns on it, so the detection time is close to the full limit.
    assert _listed_host(hosts, HOST).available
    network.set_namespace_link(up=False)
    cut_at = datetime.now(UTC)
    detect_seconds, cut_off = _wait_for_availability(hosts, available=False, timeout=POLL_TIMEOUT)
    assert detect_seconds <= DETECT_LIMIT_SECONDS
    # Never unavailable before the limit: the controller must wait out every missed heartbeat.
    assert cut_off.heartbeat_age_seconds >= UNAVAILABLE_AFTER

    register_seconds = _time_host_unavailable(
        "RegisterDevice",
        lambda: devices.RegisterDevice(
            devices_pb2.RegisterDeviceRequest(host=HOST, pci_address=DATA_DRIVE), timeout=CALL_TIMEOUT
        ),
    )
    list_seconds = _time_host_unavailable(
        "ListAvailableDevices",
        lambda: devices.ListAvailableDevices(
            devices_pb2.ListAvailableDevicesRequest(host=HOST), timeout=CALL_TIMEOUT
        ),
    )
    assert register_seconds < FAIL_FAST_LIMIT_SECONDS
    assert list_seconds < FAIL_FAST_LIMIT_SECONDS

    fleet = devices.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest(), timeout=CALL_TIMEOUT)
    assert [d.function.pci_address for d in fleet.devices] == []
    assert [(h.host, h.reason) for h in fleet.unreachable_hosts] == [(HOST, "HOST_UNAVAILABLE")]

    last_known = devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name="l4-gpu"), timeout=CALL_TIMEOUT)
    assert not last_known.host_available
    assert last_known.driver == "nvidia"
    assert not last_known.bound_to_vfio
    assert last_known.present
    assert last_known.HasField("state_observed_at")
    assert last_known.state_observed_at == cut_off.last_heartbeat
    assert last_known.state_observed_at.ToDatetime(tzinfo=UTC) <= cut_at

    # Restore the link: the agent's next heartbeat that gets through makes the host available.
    network.set_namespace_link(up=True)
    restored_at = datetime.now(UTC)
    recover_seconds, _ = _wait_for_availability(hosts, available=True, timeout=POLL_TIMEOUT)
    assert recover_seconds <= RECOVER_LIMIT_SECONDS

    available = devices.ListAvailableDevices(
        devices_pb2.ListAvailableDevicesRequest(host=HOST), timeout=CALL_TIMEOUT
    )
    names = {d.function.pci_address: d.registered_name for d in available.devices}
    assert names.get(GPU) == "l4-gpu"
    assert list(available.unreachable_hosts) == []

    current = devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name="l4-gpu"), timeout=CALL_TIMEOUT)
    assert current.host_available
    assert current.driver == "nvidia"
    assert current.state_observed_at.ToDatetime(tzinfo=UTC) >= restored_at
    assert '"heartbeat_restored"' in agent.log()

    report(
        "host cutoff",
        detect_seconds=round(detect_seconds, 2),
        fail_fast_ms=round(1000 * max(register_seconds, list_seconds), 1),
        recover_seconds=round(recover_seconds, 2),
        heartbeat_interval=HEARTBEAT_INTERVAL,
        missed_heartbeats=MISSED_HEARTBEATS,
    )
