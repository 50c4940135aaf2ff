"""Device and host name rules, and the names generated for unnamed devices."""

from __future__ import annotations

import re

from devpass.errors import InvalidArgument, InvalidName
from devpass.pci import PciAddress

MAX_NAME_LENGTH = 63
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")


def validate_name(name: str) -> str:
    """Return `name` unchanged when it is a valid device name.

    Raises:
        InvalidName: the name breaks the pattern or is longer than 63 characters.
    """
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise InvalidName(
            f"invalid device name {name[:80]!r}: use 2 to {MAX_NAME_LENGTH} characters from "
            "letters, digits, '_', '.' and '-', starting with a letter or digit",
            name=name[:80],
        )

    return name


def validate_host_name(host: str) -> str:
    """Return `host` unchanged when it can name a host (and so qualify a device name).

    Raises:
        InvalidArgument: the host name breaks the device name pattern.
    """
    if len(host) > MAX_NAME_LENGTH or not _NAME.match(host):
        raise InvalidArgument(
            f"invalid host name {host[:80]!r}: use 2 to {MAX_NAME_LENGTH} characters from "
            "letters, digits, '_', '.' and '-', starting with a letter or digit",
            host=host[:80],
        )

    return host


def auto_name(address: PciAddress) -> str:
    """Return the name given to an unnamed device, for example `pci-0000-a2-00-0`."""
    return f"pci-{address.slug}"


def host_qualified_name(address: PciAddress, host: str) -> str:
    """Return the generated name used when another host's device owns `auto_name`.

    Raises:
        InvalidName: the qualified name would exceed 63 characters.
    """
    name = f"{auto_name(address)}.{host}"
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"generated name {name!r} is longer than {MAX_NAME_LENGTH} characters because "
            f"{auto_name(address)!r} is taken on another host; pass a name explicitly",
            name=name,
        )

    return name
