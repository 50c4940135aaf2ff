"""The agent's single interface for writing kernel attributes.

Every change the agent makes to a host goes through a ``KernelWriter``, so tests can
replace the real sysfs with the simulated kernel in ``agent.simulate``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol


class KernelWriter(Protocol):
    """Writer of one value to one kernel attribute file."""

    def write(self, path: Path, value: str) -> None:
        """Write ``value`` to the attribute at ``path``.

        Raises:
            OSError: the kernel rejected the write, and ``errno`` is the kernel's code.
            ValueError: ``path`` is outside the tree the writer may change.
        """
        ...


class SysfsWriter:
    """KernelWriter for a real sysfs tree mounted at ``root``.

    Each value goes to the kernel in exactly one write(2) call, because a sysfs
    attribute's store function receives only the bytes of a single write.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(os.path.realpath(root))

    @property
    def root(self) -> Path:
        """Resolved root of the tree this writer may change."""
        return self._root

    def write(self, path: Path, value: str) -> None:
        """Write ``value`` to the attribute at ``path`` in one write call.

        The file is opened without O_CREAT, so a misspelled attribute fails with
        ENOENT instead of creating a new file, and with O_NOFOLLOW, because sysfs
        attributes are never symbolic links and a link could lead out of the root.

        Raises:
            ValueError: ``path`` resolves outside the root.
            OSError: the open or the write failed. A short write raises EIO.
        """
        target = self._resolve_under_root(path)
        data = value.encode()
        fd = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)

        if written != len(data):
            raise OSError(
                errno.EIO,
                f"short write to {target}: {written} of {len(data)} bytes accepted",
            )

    def _resolve_under_root(self, path: Path) -> Path:
        parent = Path(os.path.realpath(path.parent))
        if parent != self._root and self._root not in parent.parents:
            raise ValueError(
                f"cannot write {path}: it resolves to {parent / path.name}, "
                f"which is outside the sysfs root {self._root}"
            )

        return parent / path.name
