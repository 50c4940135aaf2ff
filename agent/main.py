"""Entry point of the per-host agent: `devpass-agent` or `python -m agent`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import tempfile
from pathlib import Path

import grpc
import structlog

from agent.heartbeat import Heartbeat, HostIdentity
from agent.pciids import PciIds
from agent.service import AgentServicer
from agent.sysfs import REAL_SYSFS_ROOT, Sysfs
from devpass import logs, rpc
from devpass.errors import DevpassError
from devpass.names import validate_host_name
from devpass.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger()

SERVICE_NAMES = [agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name]


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
        "--sysfs-root", type=Path, default=REAL_SYSFS_ROOT, help="root of the sysfs tree to read"
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


async def serve(args: argparse.Namespace) -> None:
    sysfs_root, host_name, simulated = _host_source(args)
    logs.configure("agent", level=args.log_level, json=args.log_json, host=host_name, simulated=simulated)
    rpc.check_listen_address(args.listen, insecure=args.insecure)
    validate_host_name(host_name)

    sysfs = Sysfs(sysfs_root, PciIds.load(args.pci_ids))
    server, port = await create_server(args.listen, sysfs)
    await server.start()
    address = args.advertise or f"{args.listen.rsplit(':', 1)[0]}:{port}"
    log.info(
        "agent_started",
        address=address,
        controller=args.controller,
        sysfs_root=str(sysfs_root),
        udev=sysfs.uses_udev,
        iommu_enabled=sysfs.iommu_enabled(),
        vfio_available=sysfs.vfio_available(),
    )
    if args.ready_file:
        rpc.write_ready_file(args.ready_file, address=address, host=host_name, sysfs_root=str(sysfs_root))

    async with grpc.aio.insecure_channel(args.controller) as channel:
        heartbeat = Heartbeat(channel, sysfs, HostIdentity(host_name, address, simulated))
        heartbeat_task = asyncio.create_task(heartbeat.run())
        await _wait_for_signal()
        heartbeat_task.cancel()
        await server.stop(grace=2)
    log.info("agent_stopped")


async def create_server(address: str, sysfs: Sysfs) -> tuple[grpc.aio.Server, int]:
    """Build the agent's server bound to `address`; return it with the bound port."""
    server = grpc.aio.server(interceptors=[rpc.RpcInterceptor()])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(sysfs), server)
    health = rpc.add_standard_services(server, SERVICE_NAMES)
    port = server.add_insecure_port(address)
    await rpc.mark_serving(health, SERVICE_NAMES)

    return server, port


def _host_source(args: argparse.Namespace) -> tuple[Path, str, bool]:
    """Return the sysfs root, host name and simulated flag that the arguments select."""
    if args.simulate is None:
        return args.sysfs_root, args.host_name or socket.gethostname(), False

    from agent.simulate import HostDescription, SimulatedHost

    description = HostDescription.from_yaml(args.simulate)
    base = args.simulate_dir or Path(tempfile.mkdtemp(prefix=f"devpass-sim-{description.host}-"))
    simulated_host = SimulatedHost.build(description, base)

    return simulated_host.sysfs_root, args.host_name or description.host, True


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


if __name__ == "__main__":
    main()
