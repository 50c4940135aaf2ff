"""The default registry backend: one SQLite file, no server to run.

Durability: WAL journal with `synchronous=FULL`, so the WAL is fsynced at every commit
and an acknowledged registration survives a power cut, not only a process crash.
All statements run on one worker thread that owns the connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from controller.registry import (
    DEVICE_COLUMNS,
    EVENTS_RETAINED,
    DeviceRecord,
    EventRecord,
    HostRecord,
    RequestRecord,
    already_registered,
    device_from_row,
    device_gone,
    device_in_use,
    name_taken,
)
from devpass.errors import RegistryUnavailable

T = TypeVar("T")
log = structlog.get_logger()

# Versioned schema changes, applied in order at start; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE devices (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL UNIQUE,
            host TEXT NOT NULL,
            pci_address TEXT NOT NULL,
            type TEXT NOT NULL,
            vendor_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            subsystem_vendor_id TEXT NOT NULL,
            subsystem_device_id TEXT NOT NULL,
            class_code TEXT NOT NULL,
            serial_number TEXT NOT NULL,
            vendor_name TEXT NOT NULL,
            device_name TEXT NOT NULL,
            iommu_group INTEGER,
            numa_node INTEGER NOT NULL,
            attached_to TEXT NOT NULL DEFAULT '',
            stale INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            UNIQUE (host, pci_address)
        );
        CREATE INDEX devices_host ON devices (host, seq);
        CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            agent_address TEXT NOT NULL,
            agent_version TEXT NOT NULL,
            iommu_enabled INTEGER NOT NULL,
            vfio_available INTEGER NOT NULL,
            simulated INTEGER NOT NULL,
            last_heartbeat TEXT NOT NULL
        );
        """,
    ),
    (
        2,
        """
        ALTER TABLE devices ADD COLUMN bound_by_devpass INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN original_driver TEXT NOT NULL DEFAULT '';
        CREATE TABLE requests (
            request_id TEXT PRIMARY KEY,
            method TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            response BLOB NOT NULL,
            created_at TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        """
        ALTER TABLE devices ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        4,
        """
        ALTER TABLE hosts ADD COLUMN functions TEXT NOT NULL DEFAULT '{}';
        """,
    ),
    (
        5,
        """
        ALTER TABLE hosts ADD COLUMN available INTEGER NOT NULL DEFAULT 1;
        CREATE TABLE events (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            host TEXT NOT NULL,
            device_id TEXT NOT NULL,
            name TEXT NOT NULL,
            pci_address TEXT NOT NULL,
            detail TEXT NOT NULL,
            at TEXT NOT NULL
        );
        """,
    ),
]

_DEVICE_COLUMNS = DEVICE_COLUMNS


class SqliteRegistry:
    """Registry in one SQLite file; the file and its directory are created on first open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def add_device(self, record: DeviceRecord) -> DeviceRecord:
        return await self._run(self._add_device, record)

    async def find_device(self, id_or_name: str) -> DeviceRecord | None:
        return await self._run(self._one_device, "id = ? OR name = ?", (id_or_name, id_or_name))

    async def device_at(self, host: str, pci_address: str) -> DeviceRecord | None:
        return await self._run(self._one_device, "host = ? AND pci_address = ?", (host, pci_address))

    async def list_devices(self, *, host: str, type: str, after_seq: int, limit: int) -> list[DeviceRecord]:
        return await self._run(self._list_devices, host, type, after_seq, limit)

    async def remove_device(self, device_id: str) -> bool:
        return await self._run(self._remove_device, device_id)

    async def set_binding(self, device_id: str, *, bound_by_devpass: bool, original_driver: str) -> None:
        await self._run(
            self._execute,
            "UPDATE devices SET bound_by_devpass = ?, original_driver = ? WHERE id = ?",
            (int(bound_by_devpass), original_driver, device_id),
        )

    async def claim_attachment(self, device_id: str, instance_id: str) -> DeviceRecord:
        return await self._run(self._claim_attachment, device_id, instance_id)

    async def release_attachment(self, device_id: str) -> None:
        await self._run(self._execute, "UPDATE devices SET attached_to = '' WHERE id = ?", (device_id,))

    async def mark_stale(self, device_id: str) -> None:
        await self._run(self._execute, "UPDATE devices SET stale = 1 WHERE id = ?", (device_id,))

    async def find_request(self, request_id: str) -> RequestRecord | None:
        return await self._run(self._find_request, request_id)

    async def save_request(self, record: RequestRecord) -> None:
        await self._run(
            self._execute,
            "INSERT INTO requests (request_id, method, fingerprint, response, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
            (record.request_id, record.method, record.fingerprint, record.response, _now()),
        )

    async def add_event(self, event: EventRecord) -> int:
        return await self._run(self._add_event, event)

    async def events_after(self, cursor: int, limit: int) -> list[EventRecord]:
        return await self._run(self._events_after, cursor, limit)

    async def event_bounds(self) -> tuple[int, int]:
        return await self._run(self._event_bounds)

    async def set_host_available(self, name: str, available: bool) -> bool:
        return await self._run(self._set_host_available, name, available)

    async def save_host(self, host: HostRecord) -> None:
        await self._run(self._save_host, host)

    async def list_hosts(self) -> list[HostRecord]:
        return await self._run(self._list_hosts)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except sqlite3.OperationalError as err:
            raise RegistryUnavailable(
                f"the registry database {self.path} failed: {err}; check the file's disk and permissions",
                database=str(self.path),
            ) from err

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit, so each statement's commit is known.
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=5000")
        self._connection = connection
        self._migrate()
        log.info("registry_opened", backend="sqlite", path=str(self.path))

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _migrate(self) -> None:
        connection = self._db()
        # BEGIN IMMEDIATE takes the write lock first, so two controllers starting on one
        # file apply each migration once.
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            applied = {row[0] for row in connection.execute("SELECT version FROM schema_migrations")}
            for version, script in MIGRATIONS:
                if version in applied:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    connection.execute(statement)
                connection.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, _now()),
                )
                log.info("registry_migrated", backend="sqlite", version=version)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("registry used before open()")

        return self._connection

    def _add_device(self, record: DeviceRecord) -> DeviceRecord:
        try:
            cursor = self._db().execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES "
                "(NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.host,
                    record.pci_address,
                    record.type,
                    record.vendor_id,
                    record.device_id,
                    record.subsystem_vendor_id,
                    record.subsystem_device_id,
                    record.class_code,
                    record.serial_number,
                    record.vendor_name,
                    record.device_name,
                    record.iommu_group,
                    record.numa_node,
                    record.attached_to,
                    int(record.stale),
                    record.created_at.isoformat(),
                    int(record.bound_by_devpass),
                    record.original_driver,
                    record.request_id,
                ),
            )
        except sqlite3.IntegrityError as err:
            raise self._conflict(record, err) from err

        return self._one_device("seq = ?", (cursor.lastrowid,)) or record

    def _conflict(self, record: DeviceRecord, err: sqlite3.IntegrityError) -> Exception:
        """Name the owner of whichever unique constraint the insert broke."""
        at_address = self._one_device("host = ? AND pci_address = ?", (record.host, record.pci_address))
        if at_address is not None:
            return already_registered(at_address)
        named = self._one_device("name = ?", (record.name,))
        if named is not None:
            return name_taken(record.name, named)

        return err

    def _one_device(self, where: str, params: tuple[Any, ...]) -> DeviceRecord | None:
        row = (
            self._db()
            .execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE {where} LIMIT 1", params)
            .fetchone()
        )

        return device_from_row(row) if row is not None else None

    def _list_devices(self, host: str, type: str, after_seq: int, limit: int) -> list[DeviceRecord]:
        rows = self._db().execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE seq > ? "
            "AND (? = '' OR host = ?) AND (? = '' OR type = ?) ORDER BY seq LIMIT ?",
            (after_seq, host, host, type, type, limit),
        )

        return [device_from_row(row) for row in rows]

    def _execute(self, statement: str, params: tuple[Any, ...]) -> None:
        self._db().execute(statement, params)

    def _claim_attachment(self, device_id: str, instance_id: str) -> DeviceRecord:
        # The WHERE clause makes the claim a compare-and-set: of two concurrent attaches,
        # only one finds attached_to empty.
        cursor = self._db().execute(
            "UPDATE devices SET attached_to = ? WHERE id = ? AND attached_to = ''", (instance_id, device_id)
        )
        record = self._one_device("id = ?", (device_id,))
        if record is None:
            raise device_gone(device_id)
        if cursor.rowcount == 0:
            raise device_in_use(record)

        return record

    def _find_request(self, request_id: str) -> RequestRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT request_id, method, fingerprint, response FROM requests WHERE request_id = ?",
                (request_id,),
            )
            .fetchone()
        )
        if row is None:
            return None

        return RequestRecord(row["request_id"], row["method"], row["fingerprint"], bytes(row["response"]))

    def _add_event(self, event: EventRecord) -> int:
        cursor = self._db().execute(
            "INSERT INTO events (kind, host, device_id, name, pci_address, detail, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.kind, event.host, event.device_id, event.name, event.pci_address, event.detail, _now()),
        )
        added = int(cursor.lastrowid or 0)
        if added % 100 == 0:
            self._db().execute("DELETE FROM events WHERE cursor <= ?", (added - EVENTS_RETAINED,))

        return added

    def _events_after(self, cursor: int, limit: int) -> list[EventRecord]:
        rows = (
            self._db()
            .execute("SELECT * FROM events WHERE cursor > ? ORDER BY cursor LIMIT ?", (cursor, limit))
            .fetchall()
        )

        return [
            EventRecord(
                cursor=row["cursor"],
                kind=row["kind"],
                host=row["host"],
                device_id=row["device_id"],
                name=row["name"],
                pci_address=row["pci_address"],
                detail=row["detail"],
                at=datetime.fromisoformat(row["at"]),
            )
            for row in rows
        ]

    def _event_bounds(self) -> tuple[int, int]:
        row = self._db().execute("SELECT MIN(cursor), MAX(cursor) FROM events").fetchone()

        return (row[0] or 0, row[1] or 0)

    def _set_host_available(self, name: str, available: bool) -> bool:
        cursor = self._db().execute(
            "UPDATE hosts SET available = ? WHERE name = ? AND available != ?",
            (int(available), name, int(available)),
        )

        return cursor.rowcount > 0

    def _remove_device(self, device_id: str) -> bool:
        cursor = self._db().execute("DELETE FROM devices WHERE id = ?", (device_id,))

        return cursor.rowcount > 0

    def _save_host(self, host: HostRecord) -> None:
        self._db().execute(
            "INSERT INTO hosts (name, agent_address, agent_version, iommu_enabled, "
            "vfio_available, simulated, last_heartbeat, functions) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET agent_address = excluded.agent_address, "
            "agent_version = excluded.agent_version, iommu_enabled = excluded.iommu_enabled, "
            "vfio_available = excluded.vfio_available, simulated = excluded.simulated, "
            "last_heartbeat = excluded.last_heartbeat, functions = excluded.functions",
            (
                host.name,
                host.agent_address,
                host.agent_version,
                int(host.iommu_enabled),
                int(host.vfio_available),
                int(host.simulated),
                host.last_heartbeat.isoformat(),
                host.functions,
            ),
        )

    def _list_hosts(self) -> list[HostRecord]:
        rows = self._db().execute("SELECT * FROM hosts ORDER BY name")

        return [
            HostRecord(
                name=row["name"],
                agent_address=row["agent_address"],
                agent_version=row["agent_version"],
                iommu_enabled=bool(row["iommu_enabled"]),
                vfio_available=bool(row["vfio_available"]),
                simulated=bool(row["simulated"]),
                last_heartbeat=datetime.fromisoformat(row["last_heartbeat"]),
                functions=row["functions"],
            )
            for row in rows
        ]


def _now() -> str:
    return datetime.now(UTC).isoformat()
