"""The registry backend for several controllers: one PostgreSQL database (psycopg 3, async pool).

The database's own UNIQUE constraints decide every race for a name or an address, so two
controllers can never both win. Migrations run under a transaction-scoped advisory lock,
so controllers that start together apply each one exactly once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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

# Key of the advisory lock that serialises migrations across controllers ("devpass" in ASCII).
_MIGRATION_LOCK = 0x6465767061737300

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE devices (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL CONSTRAINT devices_name_key UNIQUE,
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
            stale BOOLEAN NOT NULL DEFAULT FALSE,
            created_at TIMESTAMPTZ NOT NULL,
            bound_by_devpass BOOLEAN NOT NULL DEFAULT FALSE,
            original_driver TEXT NOT NULL DEFAULT '',
            CONSTRAINT devices_host_pci_address_key UNIQUE (host, pci_address)
        );
        CREATE INDEX devices_host ON devices (host, seq);
        CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            agent_address TEXT NOT NULL,
            agent_version TEXT NOT NULL,
            iommu_enabled BOOLEAN NOT NULL,
            vfio_available BOOLEAN NOT NULL,
            simulated BOOLEAN NOT NULL,
            last_heartbeat TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE requests (
            request_id TEXT PRIMARY KEY,
            method TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            response BYTEA NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        2,
        """
        ALTER TABLE devices ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        3,
        """
        ALTER TABLE hosts ADD COLUMN functions TEXT NOT NULL DEFAULT '{}';
        """,
    ),
    (
        4,
        """
        ALTER TABLE hosts ADD COLUMN available BOOLEAN NOT NULL DEFAULT TRUE;
        CREATE TABLE events (
            cursor BIGSERIAL PRIMARY KEY,
            kind TEXT NOT NULL,
            host TEXT NOT NULL,
            device_id TEXT NOT NULL,
            name TEXT NOT NULL,
            pci_address TEXT NOT NULL,
            detail TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
    ),
]

# Channel on which every controller announces new events, so watchers on other
# controllers wake at once instead of at their next poll.
EVENTS_CHANNEL = "devpass_events"


class PostgresRegistry:
    """Registry in a PostgreSQL database that several controllers share."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 5.0) -> None:
        self._url = url
        # check_connection on checkout drops connections that a database restart broke, so
        # service resumes by itself once PostgreSQL is back.
        self._pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
        )

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=30)
        except PoolTimeout as err:
            raise _unavailable(err) from err
        await self._migrate()
        log.info("registry_opened", backend="postgresql", database=_safe_url(self._url))

    async def close(self) -> None:
        await self._pool.close()

    async def add_device(self, record: DeviceRecord) -> DeviceRecord:
        async def insert(connection: psycopg.AsyncConnection[Any]) -> DeviceRecord:
            try:
                row = await self._fetch_one(
                    connection,
                    f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (DEFAULT, "
                    + ", ".join(["%s"] * 21)
                    + f") RETURNING {DEVICE_COLUMNS}",
                    _device_values(record),
                )
            except pg_errors.UniqueViolation as err:
                raise await self._conflict(connection, record, err) from err
            assert row is not None

            return device_from_row(row)

        return await self._with_connection(insert)

    async def find_device(self, id_or_name: str) -> DeviceRecord | None:
        return await self._one_device("id = %s OR name = %s", (id_or_name, id_or_name))

    async def device_at(self, host: str, pci_address: str) -> DeviceRecord | None:
        return await self._one_device("host = %s AND pci_address = %s", (host, pci_address))

    async def list_devices(self, *, host: str, type: str, after_seq: int, limit: int) -> list[DeviceRecord]:
        async def select(connection: psycopg.AsyncConnection[Any]) -> list[DeviceRecord]:
            async with connection.cursor(row_factory=dict_row) as cursor:
                query = (
                    f"SELECT {DEVICE_COLUMNS} FROM devices WHERE seq > %s "
                    "AND (%s = '' OR host = %s) AND (%s = '' OR type = %s) ORDER BY seq LIMIT %s"
                )
                await cursor.execute(query.encode(), (after_seq, host, host, type, type, limit))
                return [device_from_row(row) for row in await cursor.fetchall()]

        return await self._with_connection(select)

    async def remove_device(self, device_id: str) -> bool:
        async def delete(connection: psycopg.AsyncConnection[Any]) -> bool:
            cursor = await connection.execute("DELETE FROM devices WHERE id = %s", (device_id,))
            return cursor.rowcount > 0

        return await self._with_connection(delete)

    async def set_binding(self, device_id: str, *, bound_by_devpass: bool, original_driver: str) -> None:
        await self._execute(
            "UPDATE devices SET bound_by_devpass = %s, original_driver = %s WHERE id = %s",
            (bound_by_devpass, original_driver, device_id),
        )

    async def claim_attachment(self, device_id: str, instance_id: str) -> DeviceRecord:
        async def claim(connection: psycopg.AsyncConnection[Any]) -> DeviceRecord:
            # Compare-and-set: of two concurrent attaches, only one finds attached_to empty.
            cursor = await connection.execute(
                "UPDATE devices SET attached_to = %s WHERE id = %s AND attached_to = ''",
                (instance_id, device_id),
            )
            row = await self._fetch_one(
                connection, f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = %s", (device_id,)
            )
            if row is None:
                raise device_gone(device_id)
            record = device_from_row(row)
            if cursor.rowcount == 0:
                raise device_in_use(record)

            return record

        return await self._with_connection(claim)

    async def release_attachment(self, device_id: str) -> None:
        await self._execute("UPDATE devices SET attached_to = '' WHERE id = %s", (device_id,))

    async def mark_stale(self, device_id: str) -> None:
        await self._execute("UPDATE devices SET stale = TRUE WHERE id = %s", (device_id,))

    async def find_request(self, request_id: str) -> RequestRecord | None:
        async def select(connection: psycopg.AsyncConnection[Any]) -> RequestRecord | None:
            row = await self._fetch_one(
                connection,
                "SELECT request_id, method, fingerprint, response FROM requests WHERE request_id = %s",
                (request_id,),
            )
            if row is None:
                return None
            return RequestRecord(row["request_id"], row["method"], row["fingerprint"], bytes(row["response"]))

        return await self._with_connection(select)

    async def save_request(self, record: RequestRecord) -> None:
        await self._execute(
            "INSERT INTO requests (request_id, method, fingerprint, response) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (request_id) DO NOTHING",
            (record.request_id, record.method, record.fingerprint, record.response),
        )

    async def add_event(self, event: EventRecord) -> int:
        async def insert(connection: psycopg.AsyncConnection[Any]) -> int:
            async with connection.transaction():
                row = await self._fetch_one(
                    connection,
                    "INSERT INTO events (kind, host, device_id, name, pci_address, detail) "
                    "VALUES (%s, %s, %s, %s, %s, %s) RETURNING cursor",
                    (event.kind, event.host, event.device_id, event.name, event.pci_address, event.detail),
                )
                assert row is not None
                added = int(row["cursor"])
                await connection.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(added)))
                if added % 100 == 0:
                    await connection.execute(
                        "DELETE FROM events WHERE cursor <= %s", (added - EVENTS_RETAINED,)
                    )

            return added

        return await self._with_connection(insert)

    async def events_after(self, cursor: int, limit: int) -> list[EventRecord]:
        async def select(connection: psycopg.AsyncConnection[Any]) -> list[EventRecord]:
            async with connection.cursor(row_factory=dict_row) as rows:
                await rows.execute(
                    "SELECT * FROM events WHERE cursor > %s ORDER BY cursor LIMIT %s", (cursor, limit)
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
                        at=row["at"],
                    )
                    for row in await rows.fetchall()
                ]

        return await self._with_connection(select)

    async def event_bounds(self) -> tuple[int, int]:
        async def select(connection: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
            cursor = await connection.execute("SELECT MIN(cursor), MAX(cursor) FROM events")
            row = await cursor.fetchone()
            assert row is not None
            return (row[0] or 0, row[1] or 0)

        return await self._with_connection(select)

    async def set_host_available(self, name: str, available: bool) -> bool:
        async def update(connection: psycopg.AsyncConnection[Any]) -> bool:
            cursor = await connection.execute(
                "UPDATE hosts SET available = %s WHERE name = %s AND available != %s",
                (available, name, available),
            )
            return cursor.rowcount > 0

        return await self._with_connection(update)

    async def wait_for_event(self, timeout: float) -> None:
        """Return when another controller announces an event, or after `timeout` seconds."""
        try:
            connection = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
        except psycopg.OperationalError as err:
            raise _unavailable(err) from err
        try:
            await connection.execute(f"LISTEN {EVENTS_CHANNEL}".encode())
            generator = connection.notifies(timeout=timeout, stop_after=1)
            async for _ in generator:
                break
        finally:
            await connection.close()

    async def save_host(self, host: HostRecord) -> None:
        await self._execute(
            "INSERT INTO hosts (name, agent_address, agent_version, iommu_enabled, vfio_available, "
            "simulated, last_heartbeat, functions) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET functions = EXCLUDED.functions, "
            "agent_address = EXCLUDED.agent_address, agent_version = EXCLUDED.agent_version, "
            "iommu_enabled = EXCLUDED.iommu_enabled, vfio_available = EXCLUDED.vfio_available, "
            "simulated = EXCLUDED.simulated, last_heartbeat = EXCLUDED.last_heartbeat",
            (
                host.name,
                host.agent_address,
                host.agent_version,
                host.iommu_enabled,
                host.vfio_available,
                host.simulated,
                host.last_heartbeat,
                host.functions,
            ),
        )

    async def list_hosts(self) -> list[HostRecord]:
        async def select(connection: psycopg.AsyncConnection[Any]) -> list[HostRecord]:
            async with connection.cursor(row_factory=dict_row) as cursor:
                await cursor.execute("SELECT * FROM hosts ORDER BY name")
                return [
                    HostRecord(
                        name=row["name"],
                        agent_address=row["agent_address"],
                        agent_version=row["agent_version"],
                        iommu_enabled=row["iommu_enabled"],
                        vfio_available=row["vfio_available"],
                        simulated=row["simulated"],
                        last_heartbeat=row["last_heartbeat"],
                        functions=row["functions"],
                    )
                    for row in await cursor.fetchall()
                ]

        return await self._with_connection(select)

    async def _migrate(self) -> None:
        async def migrate(connection: psycopg.AsyncConnection[Any]) -> None:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                cursor = await connection.execute("SELECT version FROM schema_migrations")
                applied = {row[0] for row in await cursor.fetchall()}
                for version, script in MIGRATIONS:
                    if version in applied:
                        continue
                    await connection.execute(script.encode())
                    await connection.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
                    log.info("registry_migrated", backend="postgresql", version=version)

        await self._with_connection(migrate)

    async def _conflict(
        self, connection: psycopg.AsyncConnection[Any], record: DeviceRecord, err: pg_errors.UniqueViolation
    ) -> Exception:
        """Name the owner of the unique constraint the insert broke."""
        constraint = err.diag.constraint_name or ""
        if constraint == "devices_host_pci_address_key":
            row = await self._fetch_one(
                connection,
                f"SELECT {DEVICE_COLUMNS} FROM devices WHERE host = %s AND pci_address = %s",
                (record.host, record.pci_address),
            )
            if row is not None:
                return already_registered(device_from_row(row))
        if constraint == "devices_name_key":
            row = await self._fetch_one(
                connection, f"SELECT {DEVICE_COLUMNS} FROM devices WHERE name = %s", (record.name,)
            )
            if row is not None:
                return name_taken(record.name, device_from_row(row))

        return err

    async def _one_device(self, where: str, params: tuple[Any, ...]) -> DeviceRecord | None:
        async def select(connection: psycopg.AsyncConnection[Any]) -> DeviceRecord | None:
            row = await self._fetch_one(
                connection, f"SELECT {DEVICE_COLUMNS} FROM devices WHERE {where} LIMIT 1", params
            )
            return device_from_row(row) if row is not None else None

        return await self._with_connection(select)

    async def _execute(self, statement: str, params: tuple[Any, ...]) -> None:
        async def run(connection: psycopg.AsyncConnection[Any]) -> None:
            await connection.execute(statement.encode(), params)

        await self._with_connection(run)

    @staticmethod
    async def _fetch_one(
        connection: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...]
    ) -> dict[str, Any] | None:
        async with connection.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(statement.encode(), params)
            return await cursor.fetchone()

    async def _with_connection(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run `work` on a pooled connection; a lost database becomes REGISTRY_UNAVAILABLE."""
        try:
            async with self._connection() as connection:
                return await work(connection)
        except (psycopg.OperationalError, PoolTimeout) as err:
            raise _unavailable(err) from err

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._pool.connection() as connection:
            yield connection


def _device_values(record: DeviceRecord) -> tuple[Any, ...]:
    return (
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
        record.stale,
        record.created_at,
        record.bound_by_devpass,
        record.original_driver,
        record.request_id,
    )


def _unavailable(err: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"the registry database is unavailable ({type(err).__name__}: {str(err).strip()[:200]}); "
        "check that PostgreSQL runs and accepts connections, then retry",
    )


def _safe_url(url: str) -> str:
    """Return the URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, location = rest.rpartition("@")

    return f"{scheme}://{credentials.split(':', 1)[0]}@{location}"
