"""The agent's announcement to the controller and the heartbeat that keeps it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog

from agent.journal import Journal, Phase
from agent.service import function_to_proto
from agent.sysfs import Sysfs
from devpass import __version__
from devpass.v1 import hosts_pb2, hosts_pb2_grpc

log = structlog.get_logger()

# Used until the controller states its interval in the first response.
DEFAULT_INTERVAL_SECONDS = 2.0
# A heartbeat that takes longer than this part of the interval counts as failed, so a slow
# response never delays the next beat.
_DEADLINE_FRACTION = 0.8


@dataclass(frozen=True)
class HostIdentity:
    name: str
    agent_address: str
    simulated: bool


class Heartbeat:
    """Send the host's live PCI state to the controller at the interval the controller sets."""

    def __init__(
        self, channel: grpc.aio.Channel, sysfs: Sysfs, identity: HostIdentity, journal: Journal
    ) -> None:
        self._stub = hosts_pb2_grpc.HostServiceStub(channel)
        self._sysfs = sysfs
        self._identity = identity
        self._journal = journal
        # Identifies this agent run. A new id makes the controller reconcile the host.
        self._instance = uuid.uuid4().hex
        self.interval = DEFAULT_INTERVAL_SECONDS
        self._wake = asyncio.Event()
        # A thread of its own: binds waiting for the binder's lock can fill the default
        # executor, and a heartbeat queued behind them would make the host look dead.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat")

    def trigger(self) -> None:
        """Send the next heartbeat now instead of at the end of the interval."""
        self._wake.set()

    async def run(self) -> None:
        """Send heartbeats until cancelled, logging failures without giving up."""
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.send()
            except grpc.RpcError as err:
                failures += 1
                # Log the first failure and then every tenth, so an outage is visible but not noisy.
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "heartbeat_failed",
                        code=err.code().name if err.code() else "UNKNOWN",
                        error=err.details(),
                        consecutive_failures=failures,
                        check="is the controller running and reachable at --controller?",
                    )
            else:
                if failures:
                    log.info("heartbeat_restored", after_failures=failures)
                failures = 0

            # The next beat is due one interval after this one started, however long it took.
            remaining = max(0.0, started + self.interval - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)
            self._wake.clear()

    async def send(self) -> None:
        request = await asyncio.get_running_loop().run_in_executor(self._executor, self._request)
        response = await self._stub.Heartbeat(request, timeout=self.interval * _DEADLINE_FRACTION)
        if response.interval_seconds > 0:
            self.interval = response.interval_seconds

    def _request(self) -> hosts_pb2.HeartbeatRequest:
        functions = [function_to_proto(f) for f in self._sysfs.list_functions()]
        # The journal records which binds devpass made, so a controller that never got a bind's
        # response (the agent died first) still learns that devpass must give the device back.
        bound = {e.pci_address: e for e in self._journal.entries() if e.phase == Phase.BOUND}
        for function in functions:
            entry = bound.get(function.pci_address)
            if entry is not None and function.bound_to_vfio:
                function.bound_by_devpass = True
                function.original_driver = entry.original_driver or ""

        return hosts_pb2.HeartbeatRequest(
            host=self._identity.name,
            agent_address=self._identity.agent_address,
            agent_version=__version__,
            iommu_enabled=self._sysfs.iommu_enabled(),
            vfio_available=self._sysfs.vfio_available(),
            simulated=self._identity.simulated,
            agent_instance=self._instance,
            functions=functions,
        )
