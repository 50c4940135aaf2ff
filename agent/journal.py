"""The agent's intent journal: which functions devpass moved between drivers, and where to.

The journal is written before the first sysfs write of a bind or restore and updated
after it, so an agent that dies mid-sequence finds at its next start which function was
in flight and which driver it came from.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path


class Phase(StrEnum):
    # Moving to vfio-pci; the call has not returned.
    BINDING = "binding"
    # On vfio-pci because devpass put it there.
    BOUND = "bound"
    # Moving back to the original driver; the call has not returned.
    RESTORING = "restoring"


@dataclass(frozen=True)
class JournalEntry:
    pci_address: str
    # Driver the function had before devpass bound it; None when it had none.
    original_driver: str | None
    phase: Phase
    updated_at: str = ""


class Journal:
    """A JSON file of entries keyed by PCI address, replaced atomically on every change.

    The instance caches the file's content and is the only writer of it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries = self._load()

    def get(self, pci_address: str) -> JournalEntry | None:
        with self._lock:
            return self._entries.get(pci_address)

    def entries(self) -> list[JournalEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.pci_address)

    def put(self, pci_address: str, original_driver: str | None, phase: Phase) -> None:
        entry = JournalEntry(pci_address, original_driver, phase, datetime.now(UTC).isoformat())
        with self._lock:
            self._entries[pci_address] = entry
            self._save()

    def remove(self, pci_address: str) -> None:
        with self._lock:
            if self._entries.pop(pci_address, None) is not None:
                self._save()

    def _load(self) -> dict[str, JournalEntry]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

        entries = {}
        for item in raw.get("entries", []):
            entry = JournalEntry(
                pci_address=item["pci_address"],
                original_driver=item["original_driver"],
                phase=Phase(item["phase"]),
                updated_at=item.get("updated_at", ""),
            )
            entries[entry.pci_address] = entry

        return entries

    def _save(self) -> None:
        # Write, fsync and rename, then fsync the directory: after a crash or power cut the
        # journal is either the old or the new content, never a torn file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        body = {"version": 1, "entries": [asdict(e) for e in self._entries.values()]}
        with partial.open("w") as file:
            json.dump(body, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
