from __future__ import annotations

import pytest

from devpass.errors import InvalidPciAddress
from devpass.pci import PciAddress, device_type, is_bridge


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0000:a2:00.0", "0000:a2:00.0"),
        ("0000:A2:00.0", "0000:a2:00.0"),
        ("a2:00.0", "0000:a2:00.0"),
        ("A2:00.0", "0000:a2:00.0"),
        ("10001:8a:00.0", "10001:8a:00.0"),
        ("00000:8a:00.0", "0000:8a:00.0"),
        ("0000:00:1f.7", "0000:00:1f.7"),
        (" 0000:3b:00.2\n", "0000:3b:00.2"),
    ],
)
def test_parse_normalises(text: str, canonical: str) -> None:
    assert str(PciAddress.parse(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0000:82.0.0",
        "../../../../etc/passwd",
        "0000:a2:00.0/../../x",
        "0000:a2:20.0",
        "0000:a2:00.8",
        "000:a2:00.0",
        "100001:a2:00.0",
        "a2:0.0",
        "0000:a2:00",
        "g000:a2:00.0",
        "0000:a2:00.0 extra",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidPciAddress) as caught:
        PciAddress.parse(text)

    assert caught.value.reason == "INVALID_PCI_ADDRESS"
    assert caught.value.metadata["pci_address"] == text[:64]


def test_slug_and_ordering() -> None:
    low = PciAddress.parse("0000:18:00.0")
    high = PciAddress.parse("10001:01:00.0")

    assert low.slug == "0000-18-00-0"
    assert sorted([high, low]) == [low, high]


@pytest.mark.parametrize(
    ("class_code", "expected"),
    [
        (0x030000, "gpu"),
        (0x030200, "gpu"),
        (0x030001, "gpu"),
        (0x038000, "pci"),
        (0x040300, "pci"),
        (0x020000, "pci"),
    ],
)
def test_device_type(class_code: int, expected: str) -> None:
    assert device_type(class_code) == expected


def test_bridges() -> None:
    assert is_bridge(0x060400)
    assert is_bridge(0x060000)
    assert not is_bridge(0x068000)
