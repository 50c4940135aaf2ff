"""The controller's directory of hosts: who is connected, where to reach them, live device state."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from controller.events import EventLog
from controller.registry import HostRecord, Registry
from devpass.errors import DevpassError, HostRequired, HostUnavailable, HostUnknown

log = structlog.get_logger()


@dataclass(frozen=True)
class FunctionState:
    """Live state of one PCI function as its host last reported it."""

    driver: str
    bound_to_vfio: bool
    # From the agent's journal: devpass bound it, and the driver it came from.
    bound_by_devpass: bool = False
    original_driver: str = ""


@dataclass(frozen=True)
class HostReport:
    """One heartbeat's content."""

    record: HostRecord
    functions: dict[str, FunctionState]
    agent_instance: str = ""


@dataclass
class HostState:
    """A host as the directory tracks it; the directory owns and mutates these."""

    record: HostRecord
    functions: dict[str, FunctionState] = field(default_factory=dict)
    # Monotonic time of the last heartbeat this controller received; None until the first.
    last_seen: float | None = None
    agent_instance: str = ""

    @property
    def name(self) -> str:
        return self.record.name


class HostDirectory:
    """Track hosts by heartbeat; a host is available while its heartbeats keep arriving.

    A host counts as unavailable once `missed_heartbeats` intervals pass without one.
    Every heartbeat is stored in the registry, so controllers that share a database agree
    on liveness whichever of them received the heartbeat, and a restarted controller
    loads every host. Live function state (drivers) stays with the controller that
    received the heartbeat.
    """

    def __init__(
        self, registry: Registry, events: EventLog, *, interval: float, missed_heartbeats: int
    ) -> None:
        self._registry = registry
        self._events = events
        # Called with a host's name when its agent comes back or restarted, to reapply desired state.
        self.on_host_returned: Callable[[str], Awaitable[None]] | None = None
        self.interval = interval
        self.missed_heartbeats = missed_heartbeats
        self._hosts: dict[str, HostState] = {}
        self._pending_saves: dict[str, HostRecord] = {}
        self._saving: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._save_failures = 0

    async def load(self) -> None:
        await self.refresh()

    async def heartbeat(self, report: HostReport) -> None:
        """Record a heartbeat, announcing the host when it is new or comes back."""
        now = time.monotonic()
        state = self._hosts.get(report.record.name)
        was_available = state is not None and self.is_available(state)
        restarted = (
            state is not None and bool(state.agent_instance) and state.agent_instance != report.agent_instance
        )
        if state is None:
            state = HostState(report.record)
            self._hosts[report.record.name] = state
            log.info("host_registered", host=state.name, agent_address=report.record.agent_address)
        elif not was_available:
            log.info("host_available", host=state.name, agent_address=report.record.agent_address)

        state.record = replace(report.record, functions=_encode_functions(report.functions))
        state.functions = report.functions
        state.last_seen = now
        state.agent_instance = report.agent_instance
        self._save_soon(state.record)
        if (restarted or not was_available) and self.on_host_returned is not None:
            self._start(self.on_host_returned(state.name))

    def _start(self, work: Awaitable[None]) -> None:
        """Run `work` in the background, keeping a reference so the task is not collected."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def monitor(self) -> None:
        """Record hosts that stopped sending heartbeats, once per outage across all controllers."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
                for state in self.hosts():
                    if self.is_available(state):
                        continue
                    if await self._registry.set_host_available(state.name, False):
                        log.warning(
                            "host_unavailable",
                            host=state.name,
                            heartbeat_age_seconds=round(self.heartbeat_age(state), 1),
                            check="is the agent running, and can it reach the controller?",
                        )
                        await self._events.emit("host_unavailable", host=state.name)
            except DevpassError as err:
                log.warning("host_monitor_failed", error=err.message)

    def _save_soon(self, record: HostRecord) -> None:
        """Store the heartbeat in the background, one write per host at a time.

        The heartbeat's response does not wait for the database, so a slow or stopped
        database never makes a live host look dead to the controller that heard it.
        """
        self._pending_saves[record.name] = record
        if record.name in self._saving:
            return
        self._saving.add(record.name)
        self._start(self._save_pending(record.name))

    async def _save_pending(self, host: str) -> None:
        try:
            while host in self._pending_saves:
                record = self._pending_saves.pop(host)
                try:
                    await self._registry.save_host(record)
                    if await self._registry.set_host_available(host, True):
                        await self._events.emit("host_available", host=host)
                except DevpassError as err:
                    self._save_failures += 1
                    # The first failure and every tenth after it, so an outage is visible but not noisy.
                    if self._save_failures == 1 or self._save_failures % 10 == 0:
                        log.warning(
                            "host_heartbeat_not_stored",
                            host=host,
                            error=err.message,
                            failures=self._save_failures,
                            check="other controllers see this host as unavailable until the registry is back",
                        )
                else:
                    self._save_failures = 0
        finally:
            self._saving.discard(host)

    async def refresh(self) -> None:
        """Load heartbeats that other controllers stored since this one last looked.

        Raises:
            RegistryUnavailable: the registry cannot be read.
        """
        for record in await self._registry.list_hosts():
            state = self._hosts.get(record.name)
            if state is None:
                self._hosts[record.name] = HostState(record, _decode_functions(record.functions))
            elif record.last_heartbeat > state.record.last_heartbeat:
                state.record = record
                state.functions = _decode_functions(record.functions)

    def observe(self, host: str, pci_address: str, function: FunctionState) -> None:
        """Record one function's state that an agent returned outside a heartbeat."""
        state = self._hosts.get(host)
        if state is not None:
            state.functions = {**state.functions, pci_address: function}

    def is_available(self, state: HostState) -> bool:
        return self.heartbeat_age(state) <= self.interval * self.missed_heartbeats

    def heartbeat_age(self, state: HostState) -> float:
        """Return seconds since the host's last heartbeat, here or at another controller."""
        stored = (datetime.now(UTC) - state.record.last_heartbeat).total_seconds()
        if state.last_seen is None:
            return stored

        return min(stored, time.monotonic() - state.last_seen)

    def hosts(self) -> list[HostState]:
        return sorted(self._hosts.values(), key=lambda s: s.name)

    def get(self, name: str) -> HostState | None:
        return self._hosts.get(name)

    async def resolve(self, name: str) -> HostState:
        """Return the available host called `name`, or the only available host when `name` is empty.

        Raises:
            HostUnknown: no host of that name has ever sent a heartbeat.
            HostUnavailable: the host missed its heartbeats.
            HostRequired: `name` is empty and there is not exactly one available host.
        """
        state = self._hosts.get(name) if name else None
        if state is None or not self.is_available(state):
            await self.refresh()
        if not name:
            return self._only_host()

        state = self._hosts.get(name)
        if state is None:
            known = ", ".join(self._hosts) or "none"
            raise HostUnknown(
                f"host {name!r} is not known to this controller (known hosts: {known}); "
                "check the name with `devpass hosts list` and that its agent runs",
                host=name,
            )
        self.require_available(state)

        return state

    def require_available(self, state: HostState) -> None:
        """Raise HostUnavailable when the host missed its heartbeats."""
        if self.is_available(state):
            return

        raise HostUnavailable(
            f"host {state.name} is unavailable: no heartbeat from its agent for "
            f"{self.heartbeat_age(state):.2f} s, more than the limit of "
            f"{self.interval * self.missed_heartbeats:.2f} s; "
            "check the agent and its network path to the controller",
            host=state.name,
        )

    def _only_host(self) -> HostState:
        available = [s for s in self._hosts.values() if self.is_available(s)]
        if len(available) == 1:
            return available[0]

        names = ", ".join(sorted(s.name for s in available)) or "none"
        raise HostRequired(
            f"no host given, and {len(available)} hosts are connected ({names}); name the host with --host",
            connected_hosts=str(len(available)),
        )


def _encode_functions(functions: dict[str, FunctionState]) -> str:
    return json.dumps(
        {
            address: [f.driver, f.bound_to_vfio, f.bound_by_devpass, f.original_driver]
            for address, f in functions.items()
        }
    )


def _decode_functions(text: str) -> dict[str, FunctionState]:
    return {address: FunctionState(*fields) for address, fields in json.loads(text).items()}
