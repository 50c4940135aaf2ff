"""Vendor and device names from the system's PCI ID database (pci.ids)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

# Debian's pci.ids package installs the first path; other distributions use the second.
DEFAULT_PATHS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))

log = structlog.get_logger()


@dataclass(frozen=True)
class PciIds:
    """Vendor names by vendor id and device names by (vendor id, device id), ids in lower-case hex."""

    vendors: dict[str, str] = field(default_factory=dict)
    devices: dict[tuple[str, str], str] = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> PciIds:
        """Read the database at `path`, or at the first default path that exists.

        A missing database gives empty names, with a warning, since names are informative only.
        """
        candidates = [path] if path is not None else list(DEFAULT_PATHS)
        for candidate in candidates:
            if candidate.is_file():
                return cls.parse(candidate.read_text(encoding="utf-8", errors="replace"), candidate)

        log.warning(
            "pci_ids_not_found",
            paths=[str(p) for p in candidates],
            fix="install the pci.ids package (apt-get install pci.ids) for vendor and device names",
        )

        return cls()

    @classmethod
    def parse(cls, text: str, source: Path | None = None) -> PciIds:
        """Parse the pci.ids format: vendor lines, tab-indented device lines, then classes."""
        vendors: dict[str, str] = {}
        devices: dict[tuple[str, str], str] = {}
        vendor = ""
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            # The device class section ("C xx  name") follows all vendors and is not needed.
            if line.startswith("C "):
                break
            if not line.startswith("\t"):
                vendor, _, name = line.partition("  ")
                vendor = vendor.lower()
                vendors[vendor] = name.strip()
            elif not line.startswith("\t\t") and vendor:
                device, _, name = line[1:].partition("  ")
                devices[(vendor, device.lower())] = name.strip()

        return cls(vendors=vendors, devices=devices, source=source)

    def vendor_name(self, vendor_id: str) -> str:
        return self.vendors.get(vendor_id, "")

    def device_name(self, vendor_id: str, device_id: str) -> str:
        return self.devices.get((vendor_id, device_id), "")
