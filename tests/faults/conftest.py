"""Helpers for the fault tests: generated hosts with many devices, and figures to report."""

from __future__ import annotations

from pathlib import Path

import yaml


def many_gpus_host(path: Path, host: str, count: int, first_group: int = 100) -> Path:
    """Write a host description with `count` GPUs, each alone in its IOMMU group, and return its path."""
    devices = [
        {
            "address": f"0000:{0x10 + index:02x}:00.0",
            "vendor": "10de",
            "device": "2330",
            "class": "030200",
            "driver": "nvidia",
            "iommu_group": first_group + index,
            "numa_node": index % 2,
        }
        for index in range(count)
    ]
    devices.append(
        {
            "address": "0000:01:00.0",
            "vendor": "144d",
            "device": "a80a",
            "class": "010802",
            "driver": "nvme",
            "iommu_group": 20,
            "block": {"name": "nvme0n1", "mounts": ["/"]},
        }
    )
    path.write_text(yaml.safe_dump({"host": host, "iommu": True, "vfio": True, "devices": devices}))

    return path


def report(name: str, **figures: object) -> None:
    """Print one line of figures; `pytest -s` or the -rP summary shows it."""
    print(f"{name}: " + ", ".join(f"{key}={value}" for key, value in figures.items()))
