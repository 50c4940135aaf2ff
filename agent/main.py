"""Entry point of the per-host agent: `devpass-agent` or `python -m agent`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog

from agent.heartbeat import Heartbeat, HostIdentity
from agent.journal import Journal
from agent.kernel import KernelWriter, SysfsWriter
from agent.pciids import PciIds
from agent.service import AgentServicer
from agent.sysfs import REAL_SYSFS_ROOT, Sysfs
from agent.usage import HostUsageScanner
from agent.vfio import DEFAULT_WRITE_TIMEOUT, Binder
from devpass import logs, rpc
from devpass.errors import DevpassError
from devpass.names import validate_host_name
from devpass.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from agent.simulate import SimulatedHost

log = structlog.get_logger()

SERVICE_NAMES = [agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name]
DEFAULT_STATE_DIR = Path("/var/lib/devpass-agent")


@dataclass(frozen=True)
class HostEnvironment:
    """The roots and writer of the host the agent serves: the real host, or a simulated one."""

    host_name: str
    sysfs_root: Path
    proc_root: Path
    dev_root: Path
    writer: KernelWriter
    journal_path: Path
    simulated: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devpass-agent", description=__doc__)
    parser.add_argument("--controller", default="127.0.0.1:50051", help="controller address, host:port")
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="address to serve AgentService on; port 0 picks a free port"
    )
    parser.add_argument(
        "--advertise", help="address the controller dials to reach this agent (default: the listen address)"
    )
    parser.add_argument("--host-name", help="name of this host in the fleet (default: the system host name)")
    parser.add_argument(
        "--sysfs-root", type=Path, default=REAL_SYSFS_ROOT, help="root of the sysfs tree to read and write"
    )
    parser.add_argument(
        "--proc-root",
        type=Path,
        default=Path("/proc"),
        help="root of the proc tree (open files, mounts, routes)",
    )
    parser.add_argument(
        "--dev-root", type=Path, default=Path("/dev"), help="root of the device nodes (/dev/vfio)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="directory of the intent journal"
    )
    parser.add_argument(
        "--write-timeout",
        type=float,
        default=DEFAULT_WRITE_TIMEOUT,
        help="seconds one sysfs write may take before the call fails with WRITE_TIMED_OUT",
    )
    parser.add_argument(
        "--simulate",
        type=Path,
        metavar="FILE",
        help="serve a simulated host built from this YAML description",
    )
    parser.add_argument(
        "--simulate-dir",
        type=Path,
        help="directory for the simulated tree (default: a new temporary directory)",
    )
    parser.add_argument(
        "--pci-ids", type=Path, help="path of the pci.ids database (default: /usr/share/misc/pci.ids)"
    )
    parser.add_argument("--ready-file", type=Path, help="write the bound address as JSON here once serving")
    parser.add_argument(
        "--insecure", action="store_true", help="allow a plaintext listen address that is not loopback"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="write JSON logs even on a terminal"
    )

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except DevpassError as err:
        raise SystemExit(f"devpass-agent: {err.message}") from None


@dataclass(frozen=True)
class AgentConfig:
    controller: str
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    pci_ids: Path | None = None
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    insecure: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        return cls(
            controller=args.controller,
            listen=args.listen,
            advertise=args.advertise,
            pci_ids=args.pci_ids,
            write_timeout=args.write_timeout,
            insecure=args.insecure,
        )


async def serve(args: argparse.Namespace) -> None:
    environment = _host_environment(args)
    logs.configure(
        "agent",
        level=args.log_level,
        json=args.log_json,
        host=environment.host_name,
        simulated=environment.simulated,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def write_ready(address: str) -> None:
        if args.ready_file:
            rpc.write_ready_file(
                args.ready_file,
                address=address,
                host=environment.host_name,
                sysfs_root=str(environment.sysfs_root),
            )

    await run_agent(environment, AgentConfig.from_args(args), stop, ready=write_ready)


async def run_agent(
    environment: HostEnvironment,
    config: AgentConfig,
    stop: asyncio.Event,
    *,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Repair from the journal, serve AgentService and send heartbeats until `stop` is set."""
    rpc.check_listen_address(config.listen, insecure=config.insecure)
    validate_host_name(environment.host_name)

    sysfs = Sysfs(environment.sysfs_root, PciIds.load(config.pci_ids))
    usage = HostUsageScanner(
        environment.sysfs_root,
        environment.proc_root,
        environment.dev_root,
        controller_host=config.controller.rsplit(":", 1)[0],
    )
    journal = Journal(environment.journal_path)
    binder = Binder(
        sysfs,
        environment.writer,
        journal,
        usage,
        dev_root=environment.dev_root,
        write_timeout=config.write_timeout,
    )
    # A bind or restore that a crash interrupted is finished or undone before serving.
    for move in await asyncio.to_thread(binder.repair):
        log.info("journal_repaired", pci_address=str(move.address), driver=move.driver)

    servicer = AgentServicer(sysfs, usage, binder)
    server, port = await create_server(config.listen, servicer)
    await server.start()
    address = config.advertise or f"{config.listen.rsplit(':', 1)[0]}:{port}"
    log.info(
        "agent_started",
        address=address,
        controller=config.controller,
        sysfs_root=str(environment.sysfs_root),
        udev=sysfs.uses_udev,
        iommu_enabled=sysfs.iommu_enabled(),
        vfio_available=sysfs.vfio_available(),
    )
    if ready is not None:
        ready(address)

    async with grpc.aio.insecure_channel(config.controller, options=rpc.RECONNECT_OPTIONS) as channel:
        identity = HostIdentity(environment.host_name, address, environment.simulated)
        heartbeat = Heartbeat(channel, sysfs, identity, journal)
        servicer.on_change = heartbeat.trigger
        loop = asyncio.get_running_loop()

        def on_udev_event(action: str, pci_address: str) -> None:
            log.info("pci_device_event", action=action, pci_address=pci_address)
            loop.call_soon_threadsafe(heartbeat.trigger)

        stop_watching = sysfs.watch(on_udev_event)
        heartbeat_task = asyncio.create_task(heartbeat.run())
        await stop.wait()
        heartbeat_task.cancel()
        if stop_watching is not None:
            stop_watching()
        await server.stop(grace=2)
    log.info("agent_stopped")


async def create_server(address: str, servicer: AgentServicer) -> tuple[grpc.aio.Server, int]:
    """Build the agent's server bound to `address`; return it with the bound port."""
    server = grpc.aio.server(interceptors=[rpc.RpcInterceptor()])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    health = rpc.add_standard_services(server, SERVICE_NAMES)
    port = server.add_insecure_port(address)
    await rpc.mark_serving(health, SERVICE_NAMES)

    return server, port


def _host_environment(args: argparse.Namespace) -> HostEnvironment:
    """Return the real host, or the simulated host that --simulate describes."""
    if args.simulate is None:
        return HostEnvironment(
            host_name=args.host_name or socket.gethostname(),
            sysfs_root=args.sysfs_root,
            proc_root=args.proc_root,
            dev_root=args.dev_root,
            writer=SysfsWriter(args.sysfs_root),
            journal_path=args.state_dir / "journal.json",
            simulated=False,
        )

    from agent.simulate import HostDescription, SimulatedHost

    description = HostDescription.from_yaml(args.simulate)
    base = args.simulate_dir or Path(tempfile.mkdtemp(prefix=f"devpass-sim-{description.host}-"))
    tree = base / "host"
    # A tree left by an earlier agent on this --simulate-dir keeps its driver state, so
    # the restart repairs from the journal against what that agent left.
    reopen = tree.is_dir() and any(tree.iterdir())
    if reopen:
        simulated_host = SimulatedHost.reopen(description, tree)
    else:
        simulated_host = SimulatedHost.build(description, tree)
    environment = simulated_environment(simulated_host, base / "state", host_name=args.host_name)

    # serve() configures logging only after this returns, so configure it the same way
    # here for this event to reach the log in the agent's format.
    logs.configure(
        "agent", level=args.log_level, json=args.log_json, host=environment.host_name, simulated=True
    )
    log.info(
        "simulated_host_reopened" if reopen else "simulated_host_built",
        description=str(args.simulate),
        tree=str(simulated_host.base),
    )

    return environment


def simulated_environment(
    host: SimulatedHost, state_dir: Path, host_name: str | None = None
) -> HostEnvironment:
    """Return the environment of an agent serving `host`, with its journal in `state_dir`."""
    return HostEnvironment(
        host_name=host_name or host.description.host,
        sysfs_root=host.sysfs_root,
        proc_root=host.proc_root,
        dev_root=host.dev_root,
        writer=host.kernel,
        journal_path=state_dir / "journal.json",
        simulated=True,
    )


if __name__ == "__main__":
    main()
