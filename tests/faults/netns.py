"""A network namespace joined to the root namespace by a veth pair, for cutting a host off the network.

The test creates the namespace and both addresses itself, and traffic only goes between
those two addresses. Creating a namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT, START_TIMEOUT, Processes, ServerProcess

# Each namespace takes one /30 from this block, chosen by process id so that parallel runs rarely clash.
ADDRESS_BLOCK = ipaddress.IPv4Network("10.231.0.0/16")


@dataclass(frozen=True)
class VethNamespace:
    """A namespace `name` whose interface `namespace_interface` is the veth peer of `host_interface`."""

    name: str
    host_interface: str
    namespace_interface: str
    host_address: str
    namespace_address: str

    def command(self, *arguments: str) -> list[str]:
        """Return `arguments` as a command that runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *arguments]

    def set_namespace_link(self, *, up: bool) -> None:
        """Bring the namespace side of the veth pair up or down."""
        run_ip(
            "netns", "exec", self.name, "ip", "link", "set", self.namespace_interface, "up" if up else "down"
        )


def run_ip(*arguments: str) -> None:
    """Run `ip ARGUMENTS`, failing the test with its output when it exits non-zero."""
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"`ip {' '.join(arguments)}` failed with exit status {result.returncode}: "
            f"{result.stderr.strip()}",
            pytrace=False,
        )


@contextmanager
def veth_namespace(prefix: str = "dp-cut") -> Iterator[VethNamespace]:
    """Create a namespace with a veth pair and a /30 on both ends, and delete both on exit.

    Fails the test, rather than skipping it, when `ip` is missing or `ip netns add` is
    rejected, because the fault tests run as root in CI.
    """
    if shutil.which("ip") is None:
        pytest.fail("the `ip` command is missing. Install the iproute2 package.", pytrace=False)

    pid = os.getpid()
    subnet_count = 2 ** (32 - ADDRESS_BLOCK.prefixlen - 2)
    subnet = ipaddress.IPv4Network((int(ADDRESS_BLOCK.network_address) + 4 * (pid % subnet_count), 30))
    host_address, namespace_address = (str(address) for address in subnet.hosts())
    # Linux limits interface names to 15 characters, and "dpc" + a 7-digit pid + one letter fits.
    namespace = VethNamespace(
        name=f"{prefix}-{pid}",
        host_interface=f"dpc{pid}h",
        namespace_interface=f"dpc{pid}n",
        host_address=host_address,
        namespace_address=namespace_address,
    )

    in_use = subprocess.run(
        ["ip", "-o", "address", "show", "to", str(subnet)], capture_output=True, text=True, check=False
    )
    if in_use.stdout.strip():
        pytest.fail(f"{subnet} is already assigned on this machine:\n{in_use.stdout}", pytrace=False)

    created = subprocess.run(
        ["ip", "netns", "add", namespace.name], capture_output=True, text=True, check=False
    )
    if created.returncode != 0:
        pytest.fail(
            f"`ip netns add {namespace.name}` failed: {created.stderr.strip()}. "
            "Creating a network namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) "
            "and a name that is not in use yet.",
            pytrace=False,
        )
    try:
        run_ip(
            "link",
            "add",
            namespace.host_interface,
            "type",
            "veth",
            "peer",
            "name",
            namespace.namespace_interface,
        )
        run_ip("link", "set", namespace.namespace_interface, "netns", namespace.name)
        run_ip("address", "add", f"{host_address}/30", "dev", namespace.host_interface)
        run_ip("link", "set", namespace.host_interface, "up")
        inside = ("netns", "exec", namespace.name, "ip")
        run_ip(*inside, "address", "add", f"{namespace_address}/30", "dev", namespace.namespace_interface)
        run_ip(*inside, "link", "set", namespace.namespace_interface, "up")
        run_ip(*inside, "link", "set", "lo", "up")
        yield namespace
    finally:
        _delete(namespace)


def _delete(namespace: VethNamespace) -> None:
    """Delete the namespace and the host side of the veth pair, whichever of them exist."""
    problems = []
    deleted = subprocess.run(
        ["ip", "netns", "delete", namespace.name], capture_output=True, text=True, check=False
    )
    if deleted.returncode != 0:
        problems.append(f"`ip netns delete {namespace.name}`: {deleted.stderr.strip()}")
    # The kernel destroys the pair only when the namespace is freed, after its last process exits.
    # Deleting the host side removes the pair at once, even while a process still runs inside.
    host_side = subprocess.run(
        ["ip", "link", "show", namespace.host_interface], capture_output=True, check=False
    )
    if host_side.returncode == 0:
        removed = subprocess.run(
            ["ip", "link", "delete", namespace.host_interface], capture_output=True, text=True, check=False
        )
        if removed.returncode != 0:
            problems.append(f"`ip link delete {namespace.host_interface}`: {removed.stderr.strip()}")
    if problems:
        # Teardown problems go to stderr instead of masking the test's own outcome.
        print("network namespace cleanup failed: " + "; ".join(problems), file=sys.stderr)


def start_in_namespace(
    processes: Processes, namespace: VethNamespace, name: str, module: str, *arguments: str
) -> ServerProcess:
    """Start `python -m module` inside the namespace, like `Processes.start`, and wait for its ready file.

    The process joins `processes.started`, so the `processes` fixture stops it at teardown.
    `ip netns exec` replaces itself with the command, so signals reach the Python process.
    """
    ready_file = processes.workdir / f"{name}.ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = processes.workdir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = namespace.command(
        sys.executable, "-m", module, *arguments, "--ready-file", str(ready_file), "--log-json"
    )
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=env, cwd=ROOT)
    server = ServerProcess(name, process, log_path, ready_file)
    processes.started.append(server)

    deadline = time.monotonic() + START_TIMEOUT
    while not ready_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not start within {START_TIMEOUT} s:\n{server.log()}")
        time.sleep(0.02)
    server.info = json.loads(ready_file.read_text())

    return server
