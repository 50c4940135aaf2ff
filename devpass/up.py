"""`devpass up`: a controller and its agents as child processes on this machine."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from devpass import client
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc

START_TIMEOUT_SECONDS = 30.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class StartFailed(Exception):
    pass


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")

    return Path(base) / "devpass"


def run_local_fleet(args: argparse.Namespace) -> None:
    """Start the controller and agents, print how to reach them, and stop all on Ctrl-C."""
    state_dir: Path = (args.state_dir or default_state_dir()).resolve()
    log_dir = state_dir / "logs"
    run_dir = state_dir / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    children: list[Child] = []
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        controller = _start(
            children,
            "controller",
            ["-m", "controller", "--listen", args.listen, "--state-dir", str(state_dir)],
            log_dir,
            run_dir,
        )
        address = _wait_ready(controller, run_dir)["address"]
        hosts = _start_agents(children, args, address, state_dir, log_dir, run_dir)
        _wait_for_hosts(address, hosts, children)
    except StartFailed as err:
        _stop_all(children)
        raise SystemExit(f"devpass up: {err}") from None

    try:
        _print_summary(address, hosts, state_dir, _example_address(address, hosts[0]))
        while not stop_requested:
            exited = [c for c in children if c.process.poll() is not None]
            if exited:
                for child in exited:
                    print(
                        f"devpass up: {child.name} exited with status {child.process.returncode}; "
                        f"see {child.log_path}",
                        file=sys.stderr,
                    )
                break
            time.sleep(0.5)
        print("stopping ...", flush=True)
    except BrokenPipeError:
        # The reader of our output went away (a pipe closed by Ctrl-C); stopping matters more.
        pass
    finally:
        _stop_all(children)


def _example_address(controller: str, host: str) -> str:
    """Return an assignable PCI address of `host` for the printed examples, GPUs first."""
    stub = devices_pb2_grpc.DeviceServiceStub(client.connect(controller))
    try:
        response = stub.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest(host=host), timeout=10)
    except grpc.RpcError:
        return "0000:01:00.0"
    ranked = sorted(
        response.devices,
        key=lambda d: (not d.assignability.assignable, d.function.type != "gpu", d.function.pci_address),
    )

    return ranked[0].function.pci_address if ranked else "0000:01:00.0"


def _start_agents(
    children: list[Child],
    args: argparse.Namespace,
    controller: str,
    state_dir: Path,
    log_dir: Path,
    run_dir: Path,
) -> list[str]:
    hosts = []
    if args.simulate:
        for index, description in enumerate(args.simulate):
            tree = state_dir / "simulated" / str(index)
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir(parents=True)
            extra = ["--simulate", str(Path(description).resolve()), "--simulate-dir", str(tree)]
            hosts.append(_start_agent(children, f"agent-{index}", controller, extra, log_dir, run_dir))
    else:
        extra = ["--sysfs-root", str(args.sysfs_root), "--state-dir", str(state_dir / "agent")]
        hosts.append(_start_agent(children, "agent", controller, extra, log_dir, run_dir))

    return hosts


def _start_agent(
    children: list[Child], name: str, controller: str, extra: list[str], log_dir: Path, run_dir: Path
) -> str:
    child = _start(children, name, ["-m", "agent", "--controller", controller, *extra], log_dir, run_dir)
    host: str = _wait_ready(child, run_dir)["host"]

    return host


def _start(children: list[Child], name: str, arguments: list[str], log_dir: Path, run_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, *arguments, "--ready-file", str(run_dir / f"{name}.json"), "--log-json"],
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
    )
    child = Child(name, process, log_path, log_file)
    children.append(child)

    return child


def _wait_ready(child: Child, run_dir: Path) -> dict[str, str]:
    ready_file = run_dir / f"{child.name}.json"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if ready_file.exists():
            fields: dict[str, str] = json.loads(ready_file.read_text())
            return fields
        if child.process.poll() is not None:
            raise StartFailed(f"{child.name} exited at start:\n{_tail(child.log_path)}")
        time.sleep(0.05)

    raise StartFailed(
        f"{child.name} did not start within {START_TIMEOUT_SECONDS:.0f} s; see {child.log_path}"
    )


def _wait_for_hosts(address: str, hosts: list[str], children: list[Child]) -> None:
    """Wait until every agent's first heartbeat reached the controller."""
    stub = hosts_pb2_grpc.HostServiceStub(client.connect(address))
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            listed = stub.ListHosts(hosts_pb2.ListHostsRequest(), timeout=5)
            available = {h.name for h in listed.hosts if h.available}
            if set(hosts) <= available:
                return
        except grpc.RpcError:
            pass
        for child in children:
            if child.process.poll() is not None:
                raise StartFailed(f"{child.name} exited at start:\n{_tail(child.log_path)}")
        time.sleep(0.1)

    raise StartFailed(
        f"hosts {', '.join(hosts)} did not reach the controller within {START_TIMEOUT_SECONDS:.0f} s"
    )


def _print_summary(address: str, hosts: list[str], state_dir: Path, example: str) -> None:
    first_host = hosts[0]
    print(
        f"""devpass is running.
  controller  {address}   (registry: {state_dir / "registry.sqlite3"})
  hosts       {", ".join(hosts)}
  logs        {state_dir / "logs"}

Try, in another terminal (with the project's virtualenv on PATH, e.g. `. .venv/bin/activate`):
  export DEVPASS_CONTROLLER={address}
  devpass hosts list
  devpass devices available --host {first_host}
  devpass devices register --host {first_host} {example} --name gpu-a
  devpass -o json devices list
or with grpcurl (not packaged in Debian 12), through server reflection:
  grpcurl -plaintext {address} list
  grpcurl -plaintext -d '{{"host": "{first_host}"}}' {address} devpass.v1.DeviceService/ListAvailableDevices

Press Ctrl-C to stop.""",
        flush=True,
    )


def _stop_all(children: list[Child]) -> None:
    # Agents stop first so that they do not log heartbeat failures against a stopped controller.
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        child.log_file.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
