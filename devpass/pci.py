"""PCI addresses and the facts devpass derives from class codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from devpass.errors import InvalidPciAddress

# Domain of 4 or 5 hex digits (Intel VMD puts devices in domains 10000 and up),
# bus of 2, device of 2 (at most 0x1f), function of 1 (at most 7).
_ADDRESS = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4,5}):)?"
    r"(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)

# Display controllers with VGA (0x0300) and 3D (0x0302) subclasses count as GPUs.
_GPU_CLASSES = frozenset({0x0300, 0x0302})
# Host bridges (0x0600), PCI bridges (0x0604) and PCIe-to-PCIe bridges (0x0609)
# route traffic and never go to a virtual machine.
BRIDGE_CLASSES = frozenset({0x0600, 0x0604, 0x0609})


@dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function's address; `str()` gives the canonical form dddd:bb:dd.f."""

    domain: int
    bus: int
    device: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse `dddd:bb:dd.f` or `bb:dd.f` in any case.

        Raises:
            InvalidPciAddress: the text is not a PCI address.
        """
        match = _ADDRESS.match(text.strip())
        if match is None:
            raise InvalidPciAddress(text)

        device = int(match["device"], 16)
        if device > 0x1F:
            raise InvalidPciAddress(text)

        return cls(
            domain=int(match["domain"] or "0", 16),
            bus=int(match["bus"], 16),
            device=device,
            function=int(match["function"]),
        )

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @property
    def slug(self) -> str:
        """Return the address with separators replaced by dashes, as used in generated names."""
        return str(self).replace(":", "-").replace(".", "-")


def device_type(class_code: int) -> str:
    """Return "gpu" for VGA and 3D display controllers, else "pci".

    `class_code` is the 24-bit value of the sysfs `class` attribute.
    """
    return "gpu" if (class_code >> 8) in _GPU_CLASSES else "pci"


def is_bridge(class_code: int) -> bool:
    """Return whether the 24-bit class code belongs to a host or PCI bridge."""
    return (class_code >> 8) in BRIDGE_CLASSES
