"""Boot a QEMU guest with a real Linux kernel and run commands in it.

The guest's root is this machine's own `/`, exported read-only over 9p, with a tmpfs
overlay on top. The host's Python and this repository so exist in the guest at the
same paths. The guest's own /proc, /sys and /dev are mounted over the host's, so every
sysfs write made there reaches the guest's kernel. The harness work directory is
exported read-write at its own path, for start scripts and logs.

Commands travel over a virtio-serial port as JSON lines, to a small server (`serve`
below, run by the guest as `python -m tests.kernel.guest serve`). The guest's network is
QEMU user networking with `restrict=on`: it reaches only the ports forwarded between it
and the host's loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.kernel.assets import (
    COMMAND_PORT_NAME,
    REPO_ROOT,
    ROOT_MOUNT_TAG,
    START_SCRIPT_NAME,
    WORKDIR_MOUNT_TAG,
    WORKDIR_PARAMETER,
    GuestAssets,
    ensure_assets,
)

# The address on the guest's network that `guest_forwards` ports listen on.
GUEST_FORWARD_ADDRESS = "10.0.2.100"
KERNEL_COMMAND_LINE = "console=ttyS0 quiet intel_iommu=on iommu=pt panic=-1"
LOG_DIRECTORY = "logs"
_LOG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Characters allowed in the work directory path, which travels on the kernel command line.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_POWEROFF_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1
# Seconds a relay waits for the host side to finish after the guest closed its side.
_RELAY_LINGER = 10.0


class GuestError(RuntimeError):
    """The guest failed to boot, stopped replying, or a command could not be run."""


class Guest:
    """A QEMU guest booted for the duration of a `with` block.

    `__enter__` boots the guest and returns once its command server replies;
    `__exit__` asks the guest to power off, and kills QEMU if it has not exited in time.
    QEMU also dies with the thread that started it, so an interrupted test run leaves
    no guest behind.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host_forwards: Mapping[int, int] | None = None,
        guest_forwards: Mapping[int, int] | None = None,
        memory_mb: int = 1024,
        cpus: int = 1,
        boot_timeout: float = 120.0,
        assets: GuestAssets | None = None,
    ) -> None:
        """Prepare a guest; nothing starts before `__enter__`.

        Args:
            workdir: directory shared read-write with the guest at the same path.
            host_forwards: host port on 127.0.0.1 -> guest TCP port.
            guest_forwards: guest port on 10.0.2.100 -> host TCP port on 127.0.0.1. Each
                guest connection opens its own host connection.
            memory_mb: guest memory in MiB.
            cpus: number of virtual CPUs.
            boot_timeout: seconds to wait for the guest's command server.
            assets: kernel, initramfs and QEMU to use (default: `ensure_assets()`).
        """
        self.workdir = Path(workdir).resolve()
        if not _SAFE_PATH.fullmatch(str(self.workdir)):
            raise GuestError(
                f"work directory {self.workdir} has characters the kernel command line cannot carry"
            )
        self.host_forwards = dict(host_forwards or {})
        self.guest_forwards = dict(guest_forwards or {})
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.assets = assets
        self.boot_seconds = 0.0
        self.console_path = self.workdir / "console.log"
        self.qemu_log_path = self.workdir / "qemu.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._booted = False
        self._socket_dir: Path | None = None
        self._channel: _Channel | None = None

    def __enter__(self) -> Guest:
        try:
            self._boot()
        except BaseException:
            self._shut_down()
            raise

        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._shut_down()

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run `command` with /bin/sh in the guest's chroot; return its exit status and output.

        The output is stdout and stderr combined. A command killed by a signal returns
        128 plus the signal number, as a shell reports it. A background process that
        `command` leaves holding the output open keeps `run` waiting: use `spawn` for those.

        Raises:
            GuestError: the command did not finish within `timeout` seconds (it is then
                killed, and the message contains its output so far), or the guest stopped.
        """
        reply = self._request({"op": "run", "command": command, "timeout": timeout}, timeout + 10.0)
        if reply.get("timed_out"):
            raise GuestError(
                f"command timed out after {timeout} s in the guest: {command}\n{reply['output']}"
            )

        return int(reply["status"]), str(reply["output"])

    def spawn(self, command: str, log_name: str) -> None:
        """Start `command` in the background in the guest's chroot.

        Its stdout and stderr go to `log_name` in the work directory's logs folder, which
        `read_log` returns. The guest stops the process (SIGTERM, then SIGKILL) at power off.
        """
        self._log_path(log_name)
        self._request({"op": "spawn", "command": command, "log_name": log_name}, 30.0)

    def exit_status(self, log_name: str) -> int | None:
        """Return the exit status of the command spawned with `log_name`, or None while it runs.

        A command killed by a signal returns 128 plus the signal number.

        Raises:
            GuestError: no command was spawned with `log_name`.
        """
        reply = self._request({"op": "status", "log_name": log_name}, 30.0)
        status = reply["status"]

        return None if status is None else int(status)

    def read_log(self, log_name: str) -> str:
        """Return the log of a spawned command so far, or "" if it has written nothing yet."""
        try:
            return self._log_path(log_name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_log(self) -> str:
        """Return the guest's serial console so far, with QEMU's own messages at the end."""
        parts = []
        for path in (self.console_path, self.qemu_log_path):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")

        return "\n".join(parts)

    def log_path(self, log_name: str) -> Path:
        """Return the host path of a spawned command's log."""
        return self._log_path(log_name)

    def _log_path(self, log_name: str) -> Path:
        if not _LOG_NAME.fullmatch(log_name):
            raise ValueError(f"invalid log name {log_name!r}: use letters, digits, '.', '_' and '-'")

        return self.workdir / LOG_DIRECTORY / log_name

    def _boot(self) -> None:
        started = time.monotonic()
        assets = self.assets if self.assets is not None else ensure_assets()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / LOG_DIRECTORY).mkdir(exist_ok=True)
        self._write_start_script()
        # A Unix socket path has at most 107 bytes, which a deep work directory exceeds.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="devpass-guest-"))
        command_socket = self._socket_dir / "command.sock"

        with self.qemu_log_path.open("wb") as qemu_log:
            self._process = subprocess.Popen(
                self._qemu_command(assets, command_socket),
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = started + self.boot_timeout
        self._channel = _Channel(self._connect(command_socket, deadline), self._process)
        try:
            self._channel.request({"op": "hello"}, max(deadline - time.monotonic(), 0.0), self.console_log)
        except GuestError as err:
            raise GuestError(f"the guest did not boot within {self.boot_timeout} s: {err}") from err
        self._booted = True
        self.boot_seconds = time.monotonic() - started

    def _write_start_script(self) -> None:
        """Write the script the guest's init runs in the chroot: the command server."""
        environment = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in environment.items())
        server = [sys.executable, "-S", "-m", "tests.kernel.guest", "serve", "--workdir", str(self.workdir)]
        script = (
            "# Written by tests/kernel/guest.py: the guest's init runs this in its chroot.\n"
            f"{exports}"
            f"cd {shlex.quote(str(REPO_ROOT))}\n"
            f'exec {shlex.join(server)} --port "$DEVPASS_COMMAND_PORT"\n'
        )
        (self.workdir / START_SCRIPT_NAME).write_text(script)

    def _qemu_command(self, assets: GuestAssets, command_socket: Path) -> list[str]:
        forwards = [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.host_forwards.items()]
        # A `tcp:` target would be a single chardev connection made once at start-up, so
        # each guest connection instead starts its own relay process (`cmd:`).
        relay = [sys.executable, "-S", "-m", "tests.kernel.guest", "relay", "--port"]
        forwards += [
            f"guestfwd=tcp:{GUEST_FORWARD_ADDRESS}:{guest}-cmd:{shlex.join([*relay, str(host)])}"
            for guest, host in self.guest_forwards.items()
        ]
        append = f"{KERNEL_COMMAND_LINE} {WORKDIR_PARAMETER}={self.workdir}"

        return [
            str(assets.qemu),
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-accel", "tcg",
            "-machine", "q35,kernel-irqchip=split",
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory_mb),
            # The IOMMU comes first so that the PCI devices after it sit behind it.
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-kernel", str(assets.kernel),
            "-initrd", str(assets.initramfs),
            "-append", append,
            "-chardev", f"file,id=console,path={self.console_path}",
            "-serial", "chardev:console",
            # The devices the tests read: std VGA (1234:1111, bochs-drm), and the e1000e
            # they bind, alone behind a root port and with no network backend.
            "-device", "VGA",
            "-device", "pcie-root-port,id=rp1,chassis=1",
            "-device", "e1000e,bus=rp1,romfile=",
            # The guest's own network: only the forwards listed above reach the host.
            "-netdev", ",".join(["user", "id=net0", "restrict=on", *forwards]),
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-device", "virtio-serial-pci,id=serial0",
            "-chardev", f"socket,id=command,path={command_socket},server=on,wait=off",
            "-device", f"virtserialport,bus=serial0.0,chardev=command,name={COMMAND_PORT_NAME}",
            "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=root,mount_tag={ROOT_MOUNT_TAG}",
            "-fsdev", f"local,id=work,path={self.workdir},security_model=none,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=work,mount_tag={WORKDIR_MOUNT_TAG}",
        ]  # fmt: skip

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        """Connect to QEMU's end of the command port once QEMU has created it."""
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise GuestError(f"QEMU exited with status {self._process.returncode}:\n{self.console_log()}")
            try:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.connect(str(path))
                return connection
            except (FileNotFoundError, ConnectionRefusedError):
                connection.close()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU did not create {path} in time:\n{self.console_log()}")
            time.sleep(0.05)

    def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._channel is None:
            raise GuestError("the guest is not running: use Guest as a context manager")

        return self._channel.request(message, timeout, self.console_log)

    def _shut_down(self) -> None:
        """Power the guest off through its command server, or kill QEMU if it never replied."""
        process = self._process
        if process is not None and process.poll() is None:
            if self._booted and self._channel is not None:
                with contextlib.suppress(GuestError):
                    self._channel.request({"op": "poweroff"}, 10.0, self.console_log)
            else:
                process.kill()
            try:
                process.wait(timeout=_POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._channel is not None:
            self._channel.close()
        if self._socket_dir is not None:
            for entry in self._socket_dir.iterdir():
                entry.unlink()
            self._socket_dir.rmdir()
        self._channel = None
        self._process = None
        self._booted = False
        self._socket_dir = None


class _Channel:
    """The host's end of the command port: one request at a time, JSON per line."""

    def __init__(self, connection: socket.socket, process: subprocess.Popen[bytes]) -> None:
        self._connection = connection
        self._process = process
        self._buffer = b""
        self._lock = threading.Lock()
        self._next_id = 1

    def request(self, message: dict[str, Any], timeout: float, console: Callable[[], str]) -> dict[str, Any]:
        """Send `message` and return the guest's reply to it; `console` supplies failure context."""
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            self._connection.sendall(json.dumps({**message, "id": request_id}).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while True:
                reply = self._read_line(deadline, message["op"], console)
                if reply.get("id") == request_id:
                    break
        if "error" in reply:
            raise GuestError(f"the guest's command server failed {message['op']}: {reply['error']}")

        return reply

    def _read_line(self, deadline: float, op: str, console: Callable[[], str]) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"no reply from the guest to {op} in time:\n{console()}")
            readable, _, _ = select.select([self._connection], [], [], min(remaining, 0.5))
            if not readable:
                if self._process.poll() is not None:
                    raise GuestError(
                        f"QEMU exited with status {self._process.returncode} during {op}:\n{console()}"
                    )
                continue
            chunk = self._connection.recv(65536)
            if not chunk:
                raise GuestError(f"QEMU closed the command port during {op}:\n{console()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)

        return reply

    def close(self) -> None:
        self._connection.close()


def _die_with_parent() -> None:
    """Have the kernel kill QEMU when the thread that started it exits (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now; another process may take it later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]

        return port


def relay(port: int) -> None:
    """Copy one guest connection, on stdin and stdout, to and from 127.0.0.1:`port`.

    QEMU's user network runs this once per guest connection to a `guest_forwards`
    port. Its stderr is the same connection, so errors go to /dev/null instead. glib
    starts it detached from QEMU, so it exits on its own: when the host side closes, or
    `_RELAY_LINGER` seconds after the guest side closed.
    """
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        upstream = socket.create_connection(("127.0.0.1", port))
    except OSError:
        return
    guest_open = True
    with upstream:
        while True:
            watched = [upstream, 0] if guest_open else [upstream]
            readable, _, _ = select.select(watched, [], [], None if guest_open else _RELAY_LINGER)
            if not readable:
                return
            if 0 in readable:
                data = os.read(0, 65536)
                if data:
                    upstream.sendall(data)
                else:
                    guest_open = False
                    upstream.shutdown(socket.SHUT_WR)
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    return
                _write_all(1, data)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


# The guest's side: runs inside the guest's chroot, on the guest's kernel.


class _Server:
    """Run the host's requests from the command port, one at a time."""

    def __init__(self, port: str, workdir: Path) -> None:
        self.port = port
        self.logs = workdir / LOG_DIRECTORY
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def serve(self) -> None:
        descriptor = os.open(self.port, os.O_RDWR)
        buffer = b""
        heard_from_host = False
        while True:
            chunk = os.read(descriptor, 65536)
            if not chunk:
                # The port reads as closed until the host connects, and again after it leaves.
                if heard_from_host:
                    break
                time.sleep(0.1)
                continue
            heard_from_host = True
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                reply = self.handle(request)
                _write_all(descriptor, json.dumps({**reply, "id": request.get("id")}).encode() + b"\n")
                if request.get("op") == "poweroff":
                    self.stop_children()
                    return
        self.stop_children()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op in ("hello", "poweroff"):
                return {"ok": True}
            if op == "run":
                return self.run(request["command"], float(request["timeout"]))
            if op == "spawn":
                return self.spawn(request["command"], request["log_name"])
            if op == "status":
                return self.status(request["log_name"])
        except (OSError, ValueError, KeyError) as err:
            return {"error": f"{type(err).__name__}: {err}"}

        return {"error": f"unknown op {op!r}"}

    def run(self, command: str, timeout: float) -> dict[str, Any]:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return {"timed_out": True, "output": output.decode(errors="replace")}
        return {"status": _shell_status(process.returncode), "output": output.decode(errors="replace")}

    def spawn(self, command: str, log_name: str) -> dict[str, Any]:
        if not _LOG_NAME.fullmatch(log_name):
            raise ValueError(f"invalid log name {log_name!r}")
        previous = self.children.get(log_name)
        if previous is not None and previous.poll() is None:
            raise ValueError(f"a command spawned with log name {log_name!r} is still running")
        with (self.logs / log_name).open("ab") as log:
            child = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[log_name] = child

        return {"ok": True, "pid": child.pid}

    def status(self, log_name: str) -> dict[str, Any]:
        child = self.children.get(log_name)
        if child is None:
            raise ValueError(f"no command was spawned with log name {log_name!r}")
        returncode = child.poll()

        return {"status": None if returncode is None else _shell_status(returncode)}

    def stop_children(self) -> None:
        """Stop every spawned process group: SIGTERM, then SIGKILL after 5 s."""
        running = [child for child in self.children.values() if child.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for child in running:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def _shell_status(returncode: int) -> int:
    """Return a subprocess return code as a shell reports it: 128 plus the signal if killed."""
    return returncode if returncode >= 0 else 128 - returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.guest")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the command server inside the guest")
    serve.add_argument("--port", required=True, help="device of the virtio-serial command port")
    serve.add_argument("--workdir", type=Path, required=True, help="the harness work directory")
    relay_parser = commands.add_parser(
        "relay", help="relay stdin and stdout to a port on 127.0.0.1 (host side)"
    )
    relay_parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args(argv)

    if args.command == "serve":
        _Server(args.port, args.workdir).serve()
    else:
        relay(args.port)


if __name__ == "__main__":
    main()
