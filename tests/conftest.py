"""Fixtures that run devpass as real processes talking over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from devpass.v1 import devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc
from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
HOSTS_DIR = ROOT / "tests" / "hosts"
START_TIMEOUT = 30.0
# Short heartbeats keep the tests fast; the unavailability limit is three of them.
HEARTBEAT_INTERVAL = 0.3


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ready_file: Path
    info: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.info["address"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Processes:
    """Start servers as child processes and stop every one of them at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ServerProcess] = []

    def start(self, name: str, module: str, *arguments: str) -> ServerProcess:
        ready_file = self.workdir / f"{name}.ready.json"
        ready_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *arguments, "--ready-file", str(ready_file), "--log-json"],
                stdout=log_file,
                stderr=log_file,
                env=env,
                cwd=self.workdir,
            )
        server = ServerProcess(name, process, log_path, ready_file)
        self.started.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready_file.exists():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start:\n{server.log()}")
            time.sleep(0.02)
        server.info = json.loads(ready_file.read_text())

        return server

    def controller(self, state_dir: Path, *arguments: str, name: str = "controller") -> ServerProcess:
        return self.start(
            name,
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state_dir),
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
            *arguments,
        )

    def simulated_agent(self, controller: str, description: str, *arguments: str) -> ServerProcess:
        name = f"agent-{Path(description).stem}"
        tree = self.workdir / "sim" / name
        tree.mkdir(parents=True, exist_ok=True)

        return self.start(
            name,
            "agent",
            "--controller",
            controller,
            "--simulate",
            str(HOSTS_DIR / description),
            "--simulate-dir",
            str(tree),
            *arguments,
        )

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, for servers that must keep their address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_hosts(
    channel: grpc.Channel, names: set[str], *, available: bool = True, timeout: float = 15.0
) -> None:
    """Wait until each host in `names` is listed with the given availability."""
    stub = hosts_pb2_grpc.HostServiceStub(channel)
    deadline = time.monotonic() + timeout
    listed: dict[str, bool] = {}
    while time.monotonic() < deadline:
        try:
            # wait_for_ready: a just-restarted controller may still be in the channel's
            # reconnect backoff, which grpc shares between channels to the same address.
            response = stub.ListHosts(hosts_pb2.ListHostsRequest(), timeout=5, wait_for_ready=True)
        except grpc.RpcError:
            time.sleep(0.1)
            continue
        listed = {h.name: h.available for h in response.hosts}
        if all(listed.get(name) is available for name in names):
            return
        time.sleep(0.05)

    raise AssertionError(f"hosts {sorted(names)} not {'available' if available else 'unavailable'}: {listed}")


@dataclass
class Fleet:
    """A controller and its agents, with stubs for callers."""

    controller: ServerProcess
    agents: dict[str, ServerProcess]
    channel: grpc.Channel
    devices: devices_pb2_grpc.DeviceServiceStub
    hosts: hosts_pb2_grpc.HostServiceStub


def start_fleet(processes: Processes, state_dir: Path, descriptions: dict[str, str]) -> Fleet:
    """Start a controller and one simulated agent per host description, and wait for their heartbeats."""
    controller = processes.controller(state_dir)
    agents = {
        host: processes.simulated_agent(controller.address, file) for host, file in descriptions.items()
    }
    channel = grpc.insecure_channel(controller.address)
    wait_for_hosts(channel, set(descriptions))

    return Fleet(
        controller=controller,
        agents=agents,
        channel=channel,
        devices=devices_pb2_grpc.DeviceServiceStub(channel),
        hosts=hosts_pb2_grpc.HostServiceStub(channel),
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL cluster for the session (as the postgres user when root)."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.destroy()
