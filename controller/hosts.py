"""The controller's directory of hosts: who is connected, where to reach them, live device state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from controller.registry import HostRecord, Registry
from devpass.errors import HostRequired, HostUnavailable, HostUnknown

log = structlog.get_logger()


@dataclass(frozen=True)
class FunctionState:
    """Live state of one PCI function as its host last reported it."""

    driver: str
    bound_to_vfio: bool


@dataclass(frozen=True)
class HostReport:
    """One heartbeat's content."""

    record: HostRecord
    functions: dict[str, FunctionState]


@dataclass
class HostState:
    """A host as the directory sees it; the directory owns and mutates these."""

    record: HostRecord
    functions: dict[str, FunctionState] = field(default_factory=dict)
    # Monotonic time of the last heartbeat this controller received; None until the first.
    last_seen: float | None = None
    last_saved: float = 0.0

    @property
    def name(self) -> str:
        return self.record.name


class HostDirectory:
    """Track hosts by heartbeat; a host is available while its heartbeats keep arriving.

    A host counts as unavailable once `missed_heartbeats` intervals pass without one. Host
    records persist in the registry, so a restarted controller still knows every host
    (as unavailable until its agent calls again).
    """

    def __init__(self, registry: Registry, *, interval: float, missed_heartbeats: int) -> None:
        self._registry = registry
        self.interval = interval
        self.missed_heartbeats = missed_heartbeats
        self._hosts: dict[str, HostState] = {}

    async def load(self) -> None:
        for record in await self._registry.list_hosts():
            self._hosts[record.name] = HostState(record)

    async def heartbeat(self, report: HostReport) -> None:
        """Record a heartbeat, announcing the host when it is new or comes back."""
        now = time.monotonic()
        state = self._hosts.get(report.record.name)
        was_available = state is not None and self.is_available(state)
        if state is None:
            state = HostState(report.record)
            self._hosts[report.record.name] = state
            log.info("host_registered", host=state.name, agent_address=report.record.agent_address)
        elif not was_available:
            log.info("host_available", host=state.name, agent_address=report.record.agent_address)

        changed = replace(state.record, last_heartbeat=report.record.last_heartbeat) != report.record
        state.record = report.record
        state.functions = report.functions
        state.last_seen = now
        # The stored heartbeat time is only a hint for a restarted controller, so it is
        # written when something else changes or every ten intervals, not at every beat.
        if changed or not was_available or now - state.last_saved > 10 * self.interval:
            await self._registry.save_host(report.record)
            state.last_saved = now

    def observe(self, host: str, pci_address: str, function: FunctionState) -> None:
        """Record one function's state that an agent returned outside a heartbeat."""
        state = self._hosts.get(host)
        if state is not None:
            state.functions = {**state.functions, pci_address: function}

    def is_available(self, state: HostState) -> bool:
        if state.last_seen is None:
            return False

        return time.monotonic() - state.last_seen <= self.interval * self.missed_heartbeats

    def heartbeat_age(self, state: HostState) -> float:
        """Return seconds since the host's last heartbeat, from the stored time when none arrived here."""
        if state.last_seen is not None:
            return time.monotonic() - state.last_seen

        return (datetime.now(UTC) - state.record.last_heartbeat).total_seconds()

    def hosts(self) -> list[HostState]:
        return sorted(self._hosts.values(), key=lambda s: s.name)

    def get(self, name: str) -> HostState | None:
        return self._hosts.get(name)

    def resolve(self, name: str) -> HostState:
        """Return the available host called `name`, or the only available host when `name` is empty.

        Raises:
            HostUnknown: no host of that name has ever sent a heartbeat.
            HostUnavailable: the host missed its heartbeats.
            HostRequired: `name` is empty and there is not exactly one available host.
        """
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
            f"{self.heartbeat_age(state):.1f} s (limit {self.interval * self.missed_heartbeats:.1f} s); "
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
