"""The registry: the stored truth for device names, ids and ownership.

Backends enforce the uniqueness of names and of (host, pci_address) with their own
constraints, so two writers can never both win a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from devpass.errors import DeviceAlreadyRegistered, DeviceInUse, DeviceNotFound, NameTaken


@dataclass(frozen=True)
class DeviceRecord:
    """A registered device as stored; live state (driver, presence) is not part of it."""

    id: str
    name: str
    host: str
    pci_address: str
    type: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    serial_number: str
    vendor_name: str
    device_name: str
    iommu_group: int | None
    numa_node: int
    created_at: datetime
    attached_to: str = ""
    stale: bool = False
    # True while devpass keeps the device on vfio-pci, which is the state to restore after a reboot.
    bound_by_devpass: bool = False
    # Driver to give the device back to; empty when it had none.
    original_driver: str = ""
    # request_id of the RegisterDevice call that created the entry, so a retry finds it.
    request_id: str = ""
    # Insertion order, assigned by the backend; pagination walks it.
    seq: int = 0


@dataclass(frozen=True)
class RequestRecord:
    """The stored outcome of a mutating call that carried a request id."""

    request_id: str
    method: str
    # Hash of the request without its request id; a retry must match it.
    fingerprint: str
    response: bytes


@dataclass(frozen=True)
class HostRecord:
    """A host's stored state between its agent's heartbeats."""

    name: str
    agent_address: str
    agent_version: str
    iommu_enabled: bool
    vfio_available: bool
    simulated: bool
    last_heartbeat: datetime
    # The host's PCI functions at that heartbeat as JSON: {pci_address: [driver, bound_to_vfio]}.
    functions: str = "{}"


@dataclass(frozen=True)
class EventRecord:
    """One change in the fleet, in the order the registry stored it."""

    cursor: int
    kind: str
    host: str
    device_id: str = ""
    name: str = ""
    pci_address: str = ""
    detail: str = ""
    at: datetime | None = None


# Events kept for watchers that reconnect; an older cursor gets a resync signal.
EVENTS_RETAINED = 10_000


class Registry(Protocol):
    """Storage of devices and hosts; every method is safe to call concurrently."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def add_device(self, record: DeviceRecord) -> DeviceRecord:
        """Store a new device and return it with its `seq`.

        Raises:
            NameTaken: another device has the name.
            DeviceAlreadyRegistered: the host's address is registered already.
        """

    async def find_device(self, id_or_name: str) -> DeviceRecord | None:
        """Return the device whose id or name is `id_or_name`."""

    async def device_at(self, host: str, pci_address: str) -> DeviceRecord | None: ...

    async def list_devices(self, *, host: str, type: str, after_seq: int, limit: int) -> list[DeviceRecord]:
        """List devices with `seq` above `after_seq` in `seq` order; empty filters match all."""

    async def remove_device(self, device_id: str) -> bool:
        """Delete the device; return whether it existed."""

    async def set_binding(self, device_id: str, *, bound_by_devpass: bool, original_driver: str) -> None:
        """Record whether devpass keeps the device on vfio-pci, and its original driver."""

    async def claim_attachment(self, device_id: str, instance_id: str) -> DeviceRecord:
        """Set `attached_to` if the device is free, atomically, and return the updated record.

        Raises:
            DeviceInUse: the device is attached already.
            DeviceNotFound: the device is gone.
        """

    async def release_attachment(self, device_id: str) -> None: ...

    async def mark_stale(self, device_id: str) -> None: ...

    async def find_request(self, request_id: str) -> RequestRecord | None: ...

    async def save_request(self, record: RequestRecord) -> None:
        """Store a call's outcome; an existing record with the same id is kept."""

    async def add_event(self, event: EventRecord) -> int:
        """Store an event and return its cursor; older events beyond the retention are pruned."""

    async def events_after(self, cursor: int, limit: int) -> list[EventRecord]:
        """Return events with a cursor above `cursor`, oldest first."""

    async def event_bounds(self) -> tuple[int, int]:
        """Return the oldest retained cursor and the newest cursor, (0, 0) without events."""

    async def set_host_available(self, name: str, available: bool) -> bool:
        """Set the host's availability flag; return whether this call changed it."""

    async def save_host(self, host: HostRecord) -> None:
        """Insert or update the host under its name."""

    async def list_hosts(self) -> list[HostRecord]: ...


def name_taken(name: str, owner: DeviceRecord) -> NameTaken:
    """Build the error for a name that `owner` already has."""
    return NameTaken(
        f"name {name!r} is already taken by device {owner.pci_address} on host {owner.host} "
        f"(id {owner.id}); choose another name or unregister that device",
        name=name,
        owner_id=owner.id,
        owner_host=owner.host,
        owner_pci_address=owner.pci_address,
    )


def already_registered(owner: DeviceRecord) -> DeviceAlreadyRegistered:
    """Build the error for an address that `owner` already registers."""
    return DeviceAlreadyRegistered(
        f"{owner.pci_address} on host {owner.host} is already registered as {owner.name!r} "
        f"(id {owner.id}); use that entry, or unregister it first",
        host=owner.host,
        pci_address=owner.pci_address,
        owner_id=owner.id,
        owner_name=owner.name,
    )


def device_in_use(record: DeviceRecord) -> DeviceInUse:
    """Build the error for a device that an instance holds."""
    return DeviceInUse(
        f"device {record.name!r} ({record.pci_address} on {record.host}) is attached to instance "
        f"{record.attached_to}; detach it first",
        device_id=record.id,
        attached_to=record.attached_to,
    )


def device_gone(device_id: str) -> DeviceNotFound:
    return DeviceNotFound(
        f"device {device_id} was unregistered while the call ran; list devices with `devpass devices list`",
        id_or_name=device_id,
    )


# Columns of the devices table in the order both backends select them.
DEVICE_COLUMNS = (
    "seq, id, name, host, pci_address, type, vendor_id, device_id, subsystem_vendor_id, "
    "subsystem_device_id, class_code, serial_number, vendor_name, device_name, iommu_group, "
    "numa_node, attached_to, stale, created_at, bound_by_devpass, original_driver, request_id"
)


def device_from_row(row: Mapping[str, Any]) -> DeviceRecord:
    """Build a record from a row of DEVICE_COLUMNS; SQLite stores times as ISO text."""
    created_at = row["created_at"]
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at)

    return DeviceRecord(
        seq=row["seq"],
        id=row["id"],
        name=row["name"],
        host=row["host"],
        pci_address=row["pci_address"],
        type=row["type"],
        vendor_id=row["vendor_id"],
        device_id=row["device_id"],
        subsystem_vendor_id=row["subsystem_vendor_id"],
        subsystem_device_id=row["subsystem_device_id"],
        class_code=row["class_code"],
        serial_number=row["serial_number"],
        vendor_name=row["vendor_name"],
        device_name=row["device_name"],
        iommu_group=row["iommu_group"],
        numa_node=row["numa_node"],
        attached_to=row["attached_to"],
        stale=bool(row["stale"]),
        created_at=created_at,
        bound_by_devpass=bool(row["bound_by_devpass"]),
        original_driver=row["original_driver"],
        request_id=row["request_id"],
    )
