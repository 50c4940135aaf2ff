"""The event log: filters, resuming from a cursor, and the resync signal after pruning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller import events as events_module
from controller.events import RESYNC, EventLog, WatchFilter
from controller.registry import EventRecord
from controller.registry import sqlite as sqlite_module
from controller.registry.sqlite import SqliteRegistry


async def _take(log: EventLog, after: int, where: WatchFilter, count: int) -> list[EventRecord]:
    taken: list[EventRecord] = []
    async for event in log.watch(after, where):
        taken.append(event)
        if len(taken) == count:
            break
    return taken


def test_resume_filters_and_resync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "EVENTS_RETAINED", 50)
    monkeypatch.setattr(events_module, "_POLL_SECONDS", 0.01)

    async def main() -> None:
        registry = SqliteRegistry(tmp_path / "registry.sqlite3")
        await registry.open()
        log = EventLog(registry)
        try:
            for index in range(10):
                await log.emit("host_available", host=f"h{index % 2}")
            resumed = await _take(log, 4, WatchFilter(host="h1"), 3)
            assert [(e.cursor, e.host) for e in resumed] == [(6, "h1"), (8, "h1"), (10, "h1")]

            # Cursor 200 prunes everything up to 150, so cursor 4 is too old to resume from.
            for _ in range(190):
                await log.emit("host_unavailable", host="h0")
            oldest, newest = await registry.event_bounds()
            assert (oldest, newest) == (151, 200)
            stale = await _take(log, 4, WatchFilter(), 2)
            assert stale[0].kind == RESYNC
            assert stale[1].cursor == 151

            live = asyncio.ensure_future(_take(log, 0, WatchFilter(host="h9"), 1))
            await asyncio.sleep(0.05)
            await log.emit("host_available", host="h9")
            fresh = await asyncio.wait_for(live, 5)
            assert [(e.kind, e.host, e.cursor) for e in fresh] == [("host_available", "h9", 201)]
        finally:
            await registry.close()

    asyncio.run(main())
