from __future__ import annotations

import pytest

from devpass.errors import InvalidArgument, InvalidName
from devpass.names import auto_name, host_qualified_name, validate_host_name, validate_name
from devpass.pci import PciAddress


@pytest.mark.parametrize("name", ["gpu0", "h100-a", "A.b_c-d", "9x", "a" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a", "-gpu", ".gpu", "gpu 0", "gpu/0", "gpü", "a" * 64, "../x"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)

    assert caught.value.reason == "INVALID_NAME"


def test_auto_name() -> None:
    assert auto_name(PciAddress.parse("0000:a2:00.0")) == "pci-0000-a2-00-0"
    assert auto_name(PciAddress.parse("10001:8a:00.0")) == "pci-10001-8a-00-0"


def test_host_qualified_name() -> None:
    address = PciAddress.parse("a2:00.0")

    assert host_qualified_name(address, "node-b") == "pci-0000-a2-00-0.node-b"
    assert validate_name(host_qualified_name(address, "node-b")) == "pci-0000-a2-00-0.node-b"


def test_host_qualified_name_too_long() -> None:
    with pytest.raises(InvalidName) as caught:
        host_qualified_name(PciAddress.parse("a2:00.0"), "h" * 50)

    assert "pass a name explicitly" in caught.value.message


@pytest.mark.parametrize("host", ["", "-x", "a b", "h" * 64])
def test_invalid_host_names(host: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_host_name(host)
