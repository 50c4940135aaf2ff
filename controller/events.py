"""Fleet events: stored by whichever controller made the change, streamed to watchers by any.

Events live in the registry, so a watcher on one controller receives changes made through
another. Watchers poll the registry; on PostgreSQL a NOTIFY wakes them at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from controller.registry import DeviceRecord, EventRecord, Registry
from devpass.errors import DevpassError

log = structlog.get_logger()

KINDS = (
    "registered",
    "bound",
    "unbound",
    "attached",
    "detached",
    "removed",
    "stale",
    "host_unavailable",
    "host_available",
)
# Sent instead of events when the watcher's cursor is older than the retained events.
RESYNC = "resync"
_POLL_SECONDS = 0.25
_BATCH = 500


@dataclass(frozen=True)
class WatchFilter:
    host: str = ""
    # A device id or name; empty for every device.
    device: str = ""

    def matches(self, event: EventRecord) -> bool:
        if self.host and event.host != self.host:
            return False

        return not self.device or self.device in (event.device_id, event.name)


class EventLog:
    """Store events and stream them; owned by the controller, shared by its services."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def emit(
        self, kind: str, *, record: DeviceRecord | None = None, host: str = "", detail: str = ""
    ) -> None:
        """Store an event; a failure is logged, because the change it reports already happened.

        Raises:
            ValueError: `kind` is not one of KINDS, a programming error.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; use one of {', '.join(KINDS)}")
        event = EventRecord(
            cursor=0,
            kind=kind,
            host=record.host if record is not None else host,
            device_id=record.id if record is not None else "",
            name=record.name if record is not None else "",
            pci_address=record.pci_address if record is not None else "",
            detail=detail,
        )
        try:
            await self._registry.add_event(event)
        except DevpassError as err:
            log.warning("event_not_stored", kind=kind, host=event.host, name=event.name, error=err.message)

    async def watch(self, after_cursor: int, where: WatchFilter) -> AsyncIterator[EventRecord]:
        """Yield matching events after `after_cursor` (0: from now on) until cancelled.

        A cursor older than the retained events yields one RESYNC event first: the
        watcher missed changes and should list the registry again.
        """
        oldest, newest = await self._registry.event_bounds()
        cursor = after_cursor if after_cursor > 0 else newest
        if 0 < after_cursor < oldest - 1:
            yield EventRecord(
                cursor=oldest - 1, kind=RESYNC, host="", detail="events were pruned; list again"
            )
            cursor = oldest - 1

        while True:
            events = await self._registry.events_after(cursor, _BATCH)
            for event in events:
                cursor = event.cursor
                if where.matches(event):
                    yield event
            if len(events) < _BATCH:
                await self._wait()

    async def _wait(self) -> None:
        wait_for_event = getattr(self._registry, "wait_for_event", None)
        if wait_for_event is None:
            await asyncio.sleep(_POLL_SECONDS)
            return

        await wait_for_event(1.0)
