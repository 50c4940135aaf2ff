"""Entry point of the controller: `devpass-controller` or `python -m controller`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from controller.agents import AgentClients
from controller.devices import Devices
from controller.events import EventLog
from controller.hosts import HostDirectory
from controller.passthrough import Passthrough
from controller.registry import Registry
from controller.registry.sqlite import SqliteRegistry
from controller.service import DeviceServicer, HostServicer, RequestLog
from devpass import logs, rpc
from devpass.errors import DevpassError, InvalidArgument
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc

log = structlog.get_logger()

SERVICE_NAMES = [
    devices_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    hosts_pb2.DESCRIPTOR.services_by_name["HostService"].full_name,
]
DEFAULT_STATE_DIR = Path("/var/lib/devpass")


@dataclass(frozen=True)
class ControllerConfig:
    listen: str = "127.0.0.1:50051"
    database: str = ""
    state_dir: Path = DEFAULT_STATE_DIR
    heartbeat_interval: float = 2.0
    missed_heartbeats: int = 3
    agent_deadline: float = 10.0
    insecure: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControllerConfig:
        return cls(
            listen=args.listen,
            database=args.database or "",
            state_dir=args.state_dir,
            heartbeat_interval=args.heartbeat_interval,
            missed_heartbeats=args.missed_heartbeats,
            agent_deadline=args.agent_deadline,
            insecure=args.insecure,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devpass-controller", description=__doc__)
    parser.add_argument(
        "--listen", default="127.0.0.1:50051", help="address to serve on; port 0 picks a free port"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="directory of the SQLite registry file"
    )
    parser.add_argument(
        "--database",
        help="registry URL: sqlite:///PATH (default: STATE_DIR/registry.sqlite3) or postgresql://USER@HOST/DATABASE",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, default=2.0, help="seconds between agent heartbeats"
    )
    parser.add_argument(
        "--missed-heartbeats", type=int, default=3, help="missed heartbeats after which a host is unavailable"
    )
    parser.add_argument(
        "--agent-deadline", type=float, default=10.0, help="deadline in seconds of each call to an agent"
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


def open_registry(config: ControllerConfig) -> Registry:
    """Select the registry backend from the database URL.

    Raises:
        InvalidArgument: the URL names no supported backend.
    """
    url = config.database or f"sqlite:///{config.state_dir / 'registry.sqlite3'}"
    if url.startswith("sqlite:///"):
        return SqliteRegistry(Path(url.removeprefix("sqlite:///")))

    if url.startswith(("postgresql://", "postgres://")):
        from controller.registry.postgres import PostgresRegistry

        return PostgresRegistry(url)

    location = url.split("@")[-1]
    raise InvalidArgument(
        f"unsupported --database {location!r}: use sqlite:///PATH or postgresql://USER@HOST/DATABASE",
        database=location,
    )


@dataclass
class Controller:
    server: grpc.aio.Server
    port: int
    registry: Registry
    agents: AgentClients
    hosts: HostDirectory
    monitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self.monitor = asyncio.create_task(self.hosts.monitor())

    async def stop(self, grace: float = 2.0) -> None:
        if self.monitor is not None:
            self.monitor.cancel()
        await self.server.stop(grace)
        await self.agents.close()
        await self.registry.close()


async def create_server(config: ControllerConfig) -> Controller:
    """Open the registry and build the controller's server; the caller starts it."""
    rpc.check_listen_address(config.listen, insecure=config.insecure)
    registry = open_registry(config)
    await registry.open()
    events = EventLog(registry)
    hosts = HostDirectory(
        registry, events, interval=config.heartbeat_interval, missed_heartbeats=config.missed_heartbeats
    )
    await hosts.load()
    agents = AgentClients(deadline_seconds=config.agent_deadline)

    server = grpc.aio.server(interceptors=[rpc.RpcInterceptor()])
    devices = Devices(registry, hosts, agents, events)
    passthrough = Passthrough(devices, registry, hosts, agents)
    hosts.on_host_returned = passthrough.reconcile_host
    devices_pb2_grpc.add_DeviceServiceServicer_to_server(
        DeviceServicer(devices, passthrough, RequestLog(registry)), server
    )
    hosts_pb2_grpc.add_HostServiceServicer_to_server(HostServicer(hosts), server)
    health = rpc.add_standard_services(server, SERVICE_NAMES)
    port = server.add_insecure_port(config.listen)
    await rpc.mark_serving(health, SERVICE_NAMES)

    return Controller(server, port, registry, agents, hosts)


async def serve(args: argparse.Namespace) -> None:
    logs.configure("controller", level=args.log_level, json=args.log_json)
    config = ControllerConfig.from_args(args)
    controller = await create_server(config)
    await controller.start()
    address = f"{config.listen.rsplit(':', 1)[0]}:{controller.port}"
    log.info("controller_started", address=address)
    if args.ready_file:
        rpc.write_ready_file(args.ready_file, address=address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await controller.stop()
    log.info("controller_stopped")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except DevpassError as err:
        raise SystemExit(f"devpass-controller: {err.message}") from None


if __name__ == "__main__":
    main()
