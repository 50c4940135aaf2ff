"""Contract of every registry backend; each backend runs the same tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from controller.registry import DeviceRecord, HostRecord, Registry, RequestRecord
from controller.registry.postgres import PostgresRegistry
from controller.registry.sqlite import SqliteRegistry
from devpass.errors import DeviceAlreadyRegistered, DeviceInUse, DeviceNotFound, NameTaken

T = TypeVar("T")


def _record(
    id: str, name: str, host: str = "h1", address: str = "0000:a2:00.0", type: str = "gpu"
) -> DeviceRecord:
    return DeviceRecord(
        id=id,
        name=name,
        host=host,
        pci_address=address,
        type=type,
        vendor_id="10de",
        device_id="27b8",
        subsystem_vendor_id="10de",
        subsystem_device_id="16ca",
        class_code="030200",
        serial_number="",
        vendor_name="NVIDIA Corporation",
        device_name="AD104GL [L4]",
        iommu_group=82,
        numa_node=0,
        created_at=datetime(2026, 12, 4, 12, 0, tzinfo=UTC),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def open_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Registry]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
        return lambda: PostgresRegistry(url)

    return lambda: SqliteRegistry(tmp_path / "nested" / "registry.sqlite3")


def run(open_registry: Callable[[], Registry], body: Callable[[Registry], Awaitable[T]]) -> T:
    async def main() -> T:
        registry = open_registry()
        await registry.open()
        try:
            return await body(registry)
        finally:
            await registry.close()

    return asyncio.run(main())


def test_add_and_find(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        stored = await registry.add_device(_record("id1", "gpu-a"))

        assert stored.seq > 0
        assert await registry.find_device("id1") == stored
        assert await registry.find_device("gpu-a") == stored
        assert await registry.device_at("h1", "0000:a2:00.0") == stored
        assert await registry.find_device("nope") is None

    run(open_registry, body)


def test_name_unique_across_hosts(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_device(_record("id1", "gpu-a", host="h1"))

        with pytest.raises(NameTaken) as caught:
            await registry.add_device(_record("id2", "gpu-a", host="h2"))

        assert caught.value.metadata["owner_host"] == "h1"
        assert caught.value.metadata["owner_id"] == "id1"
        assert await registry.device_at("h2", "0000:a2:00.0") is None

    run(open_registry, body)


def test_address_unique_per_host(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_device(_record("id1", "gpu-a"))

        with pytest.raises(DeviceAlreadyRegistered) as caught:
            await registry.add_device(_record("id2", "gpu-b"))

        assert caught.value.metadata["owner_name"] == "gpu-a"
        assert await registry.find_device("gpu-b") is None

    run(open_registry, body)


def test_list_filters_and_order(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        for index in range(5):
            host = "h1" if index % 2 == 0 else "h2"
            type = "gpu" if index < 3 else "pci"
            await registry.add_device(
                _record(f"id{index}", f"dev{index}", host=host, address=f"0000:0{index}:00.0", type=type)
            )

        everything = await registry.list_devices(host="", type="", after_seq=0, limit=100)
        assert [r.name for r in everything] == [f"dev{i}" for i in range(5)]
        h1 = await registry.list_devices(host="h1", type="", after_seq=0, limit=100)
        assert [r.name for r in h1] == ["dev0", "dev2", "dev4"]
        gpus_h2 = await registry.list_devices(host="h2", type="gpu", after_seq=0, limit=100)
        assert [r.name for r in gpus_h2] == ["dev1"]
        page = await registry.list_devices(host="", type="", after_seq=everything[1].seq, limit=2)
        assert [r.name for r in page] == ["dev2", "dev3"]

    run(open_registry, body)


def test_remove(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_device(_record("id1", "gpu-a"))

        assert await registry.remove_device("id1") is True
        assert await registry.remove_device("id1") is False
        assert await registry.find_device("gpu-a") is None
        await registry.add_device(_record("id2", "gpu-a"))

    run(open_registry, body)


def test_hosts_saved_and_updated(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        host = HostRecord("h1", "127.0.0.1:1", "0.1.0", True, True, False, datetime(2026, 1, 1, tzinfo=UTC))
        await registry.save_host(host)
        await registry.save_host(replace(host, agent_address="127.0.0.1:2"))

        assert await registry.list_hosts() == [replace(host, agent_address="127.0.0.1:2")]

    run(open_registry, body)


def test_survives_reopen(open_registry: Callable[[], Registry]) -> None:
    stored = run(open_registry, lambda registry: registry.add_device(_record("id1", "gpu-a")))

    assert run(open_registry, lambda registry: registry.find_device("id1")) == stored


def test_concurrent_name_race_has_one_winner(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> list[BaseException | DeviceRecord]:
        attempts = [
            registry.add_device(_record(f"id{i}", "contested", host=f"h{i}", address="0000:a2:00.0"))
            for i in range(20)
        ]
        return await asyncio.gather(*attempts, return_exceptions=True)

    results = run(open_registry, body)

    winners = [r for r in results if isinstance(r, DeviceRecord)]
    losers = [r for r in results if isinstance(r, NameTaken)]
    assert len(winners) == 1
    assert len(losers) == 19
    assert {loser.metadata["owner_id"] for loser in losers} == {winners[0].id}


def test_claim_attachment_once(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_device(_record("id1", "gpu-a"))
        results = await asyncio.gather(
            *(registry.claim_attachment("id1", f"vm-{i}") for i in range(5)), return_exceptions=True
        )
        claimed = [r for r in results if isinstance(r, DeviceRecord)]
        rejected = [r for r in results if isinstance(r, DeviceInUse)]

        assert len(claimed) == 1
        assert len(rejected) == 4
        stored = await registry.find_device("id1")
        assert stored is not None
        assert stored.attached_to == claimed[0].attached_to
        await registry.release_attachment("id1")
        released = await registry.find_device("id1")
        assert released is not None
        assert released.attached_to == ""
        with pytest.raises(DeviceNotFound):
            await registry.claim_attachment("missing", "vm-1")

    run(open_registry, body)


def test_binding_and_stale_flags(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_device(_record("id1", "gpu-a"))
        await registry.set_binding("id1", bound_by_devpass=True, original_driver="nvidia")
        await registry.mark_stale("id1")

        stored = await registry.find_device("id1")
        assert stored is not None
        assert stored.bound_by_devpass is True
        assert stored.original_driver == "nvidia"
        assert stored.stale is True

    run(open_registry, body)


def test_requests_keep_first_outcome(open_registry: Callable[[], Registry]) -> None:
    async def body(registry: Registry) -> None:
        await registry.save_request(RequestRecord("r1", "RegisterDevice", "f1", b"first"))
        await registry.save_request(RequestRecord("r1", "RegisterDevice", "f2", b"second"))

        assert await registry.find_request("r1") == RequestRecord("r1", "RegisterDevice", "f1", b"first")
        assert await registry.find_request("r2") is None

    run(open_registry, body)


def test_concurrent_open_migrates_once(open_registry: Callable[[], Registry]) -> None:
    async def main() -> None:
        registries = [open_registry() for _ in range(4)]
        await asyncio.gather(*(r.open() for r in registries))
        try:
            await registries[0].add_device(_record("id1", "gpu-a"))
            assert (await registries[3].find_device("gpu-a")) is not None
        finally:
            for registry in registries:
                await registry.close()

    asyncio.run(main())


def test_sqlite_commits_are_durable(tmp_path: Path) -> None:
    async def main() -> tuple[str, int]:
        registry = SqliteRegistry(tmp_path / "registry.sqlite3")
        await registry.open()
        try:
            connection = registry._db()  # the settings live on the connection itself
            journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
            synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
            return journal_mode, synchronous
        finally:
            await registry.close()

    journal_mode, synchronous = asyncio.run(main())

    assert journal_mode == "wal"
    # 2 is FULL: the WAL is synced to disk at every commit, not only at checkpoints.
    assert synchronous == 2
