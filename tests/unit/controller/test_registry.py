"""Contract of every registry backend; each backend runs the same tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from controller.registry import DeviceRecord, HostRecord, Registry
from controller.registry.sqlite import SqliteRegistry
from devpass.errors import DeviceAlreadyRegistered, NameTaken

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


@pytest.fixture(params=["sqlite"])
def open_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Registry]:
    def factory() -> Registry:
        return SqliteRegistry(tmp_path / "nested" / "registry.sqlite3")

    return factory


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
