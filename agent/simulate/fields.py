"""Typed reads of a parsed YAML host description, with errors that name the field."""

from __future__ import annotations

import ipaddress
import re
from typing import cast

from devpass.errors import InvalidPciAddress
from devpass.pci import PciAddress

_DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Interface names: at most 15 characters (IFNAMSIZ - 1), no '/' or whitespace.
_INTERFACE_NAME = re.compile(r"^[^/\s:]{1,15}$")
_BLOCK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

_MISSING = object()


class _Fields:
    """Typed reads of one YAML mapping, with errors that name the field and its place."""

    def __init__(self, data: object, where: str, allowed: frozenset[str]) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {_describe(data)}")

        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            raise ValueError(
                f"{where}: unknown field {', '.join(unknown)}. "
                f"allowed fields are {', '.join(sorted(allowed))}"
            )

        self._data: dict[object, object] = data
        self._allowed = allowed
        self.where = where

    def at(self, where: str) -> _Fields:
        """Return the same fields, with errors placed at ``where``."""
        return _Fields(self._data, where, self._allowed)

    def error(self, key: str, expected: str) -> ValueError:
        value = self._data.get(key)

        return ValueError(f"{self.where}: field '{key}' must be {expected}, got {_describe(value)}")

    def value(self, key: str, default: object = _MISSING) -> object:
        value = self._data.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise ValueError(f"{self.where}: missing required field '{key}'")

        return default

    def text(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, "a non-empty string")

        return value

    def optional_text(self, key: str) -> str | None:
        value = self.value(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.error(key, "a non-empty string")

        return value

    def hex_id(self, key: str, digits: int, default: str | None = None) -> str:
        value = self.value(key, _MISSING if default is None else default)
        text = value.lower().removeprefix("0x") if isinstance(value, str) else ""
        if not re.fullmatch(f"[0-9a-f]{{{digits}}}", text):
            # YAML reads an unquoted 030200 as a number, so the usual mistake is quoting.
            raise self.error(key, f'{digits} hex digits in quotes, for example "{"0" * digits}"')

        return text

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self.value(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")

        return value

    def integer(self, key: str, minimum: int, default: int | None = None) -> int:
        value = self.value(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"an integer of at least {minimum}")

        return value

    def optional_integer(self, key: str, minimum: int) -> int | None:
        if self.value(key, None) is None:
            return None

        return self.integer(key, minimum)

    def text_list(self, key: str) -> tuple[str, ...]:
        values = self.value(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise self.error(key, "a list of non-empty strings")

        return tuple(cast(list[str], values))

    def integer_list(self, key: str, minimum: int) -> tuple[int, ...]:
        values = self.value(key, [])
        valid = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
        )
        if not valid:
            raise self.error(key, f"a list of integers of at least {minimum}")

        return tuple(cast(list[int], values))

    def items(self, key: str, required: bool = True) -> list[object]:
        values = self.value(key, _MISSING if required else [])
        if not isinstance(values, list):
            raise self.error(key, "a list")

        return values

    def child(self, key: str, allowed: frozenset[str]) -> _Fields | None:
        value = self.value(key, None)
        if value is None:
            return None

        return _Fields(value, f"{self.where}, {key}", allowed)


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _canonical_address(text: str, where: str) -> str:
    try:
        address = str(PciAddress.parse(text))
    except InvalidPciAddress as err:
        raise ValueError(f"{where}: {err.message}") from err
    if address != text:
        raise ValueError(f"{where}: write the address {text!r} in canonical form {address!r}")

    return address


def _driver_name(name: str, where: str) -> str:
    if not _DRIVER_NAME.match(name):
        raise ValueError(f"{where}: invalid driver name {name!r}: use letters, digits, '_', '.' and '-'")

    return name


def _interface_name(fields: _Fields, key: str) -> str:
    name = fields.text(key)
    if not _INTERFACE_NAME.match(name):
        raise fields.error(key, "an interface name of 1 to 15 characters without '/', ':' or spaces")

    return name


def _block_name(fields: _Fields, key: str) -> str:
    name = fields.text(key)
    if not _BLOCK_NAME.match(name):
        raise fields.error(key, "a block device name such as nvme0n1 or sda")

    return name


def _ip_interfaces(fields: _Fields, key: str) -> tuple[str, ...]:
    """Return the addresses with prefix length (192.0.2.10/24) in ``ipaddress``'s canonical form."""
    addresses = []
    for text in fields.text_list(key):
        try:
            addresses.append(str(ipaddress.ip_interface(text)))
        except ValueError as err:
            raise ValueError(f"{fields.where}, field '{key}': {err}") from err

    return tuple(addresses)


def _mount_points(fields: _Fields, key: str) -> tuple[str, ...]:
    mounts = fields.text_list(key)
    for mount in mounts:
        if not mount.startswith("/") or any(c.isspace() for c in mount):
            raise fields.error(key, "absolute mount points without spaces")

    return mounts
