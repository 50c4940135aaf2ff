"""Fixtures that boot a QEMU guest with a real Linux kernel for the kernel tests.

These tests fail rather than skip when QEMU or the guest's kernel cannot be had,
because `make test` must really run them. `python -m tests.kernel.assets` prepares
both ahead of time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.kernel.assets import AssetError, GuestAssets, ensure_assets
from tests.kernel.guest import Guest


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """Install QEMU and build the guest's kernel and initramfs, or reuse the cached ones."""
    try:
        return ensure_assets()
    except AssetError as err:
        pytest.fail(f"cannot prepare the QEMU guest: {err}", pytrace=False)


@pytest.fixture(scope="module")
def start_guest(
    guest_assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Guest]]:
    """Return a function that boots a guest with `Guest`'s keyword arguments.

    Each guest gets its own work directory and is powered off when the module's tests end.
    """
    guests: list[Guest] = []

    def start(**options: Any) -> Guest:
        guest = Guest(tmp_path_factory.mktemp("guest"), assets=guest_assets, **options)
        guest.__enter__()
        guests.append(guest)

        return guest

    try:
        yield start
    finally:
        for guest in reversed(guests):
            guest.__exit__(None, None, None)
