"""The `devpass` command as a user runs it, against real servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HOSTS_DIR, ROOT, Fleet, Processes, start_fleet

TWO_HOSTS = {"node-a": "two-hosts-a.yaml", "node-b": "two-hosts-b.yaml"}


def devpass(controller: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devpass", "--controller", controller, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def fleet(processes: Processes, tmp_path: Path) -> Fleet:
    return start_fleet(processes, tmp_path / "state", TWO_HOSTS)


def test_register_get_list_delete(fleet: Fleet) -> None:
    address = fleet.controller.address

    registered = devpass(
        address, "-o", "json", "devices", "register", "--host", "node-a", "a2:00.0", "--name", "l4-a"
    )
    assert registered.returncode == 0, registered.stderr
    device = json.loads(registered.stdout)
    assert device["name"] == "l4-a"
    assert device["pci_address"] == "0000:a2:00.0"
    assert device["type"] == "gpu"
    assert device["iommu_group"] == 82
    assert device["bound_to_vfio"] is False
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", device["created_at"])

    table = devpass(address, "devices", "list")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "HOST", "PCI", "ADDRESS"]
    assert row.split()[:4] == ["l4-a", "node-a", "0000:a2:00.0", "gpu"]

    got = devpass(address, "-o", "json", "devices", "get", device["id"])
    assert json.loads(got.stdout)["name"] == "l4-a"

    deleted = devpass(address, "devices", "delete", "l4-a")
    assert deleted.returncode == 0, deleted.stderr
    assert "unregistered l4-a" in deleted.stdout
    listed = devpass(address, "-o", "json", "devices", "list")
    assert json.loads(listed.stdout) == {"devices": []}


def test_rejection_exit_status(fleet: Fleet) -> None:
    address = fleet.controller.address

    bad = devpass(address, "devices", "register", "--host", "node-a", "0000:82.0.0")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: INVALID_PCI_ADDRESS: ")

    missing = devpass(address, "-o", "json", "devices", "get", "ghost")
    assert missing.returncode == 1
    error = json.loads(missing.stderr)["error"]
    assert error["code"] == "NOT_FOUND"
    assert error["reason"] == "DEVICE_NOT_FOUND"


def test_unreachable_controller() -> None:
    result = devpass("127.0.0.1:1", "hosts", "list")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "is the controller running at 127.0.0.1:1?" in result.stderr


def test_hosts_and_available(fleet: Fleet) -> None:
    address = fleet.controller.address

    hosts = devpass(address, "-o", "json", "hosts", "list")
    assert hosts.returncode == 0, hosts.stderr
    listed = {h["name"]: h for h in json.loads(hosts.stdout)["hosts"]}
    assert sorted(listed) == ["node-a", "node-b"]
    assert listed["node-a"]["available"] is True
    assert listed["node-a"]["iommu_enabled"] is True
    assert listed["node-a"]["simulated"] is True
    assert listed["node-a"]["agent_version"] == "0.1.0"

    table = devpass(address, "devices", "available", "--host", "node-b")
    assert table.returncode == 0, table.stderr
    audio_row = next(line for line in table.stdout.splitlines() if "0000:c1:00.0" in line)
    assert "no: IOMMU_GROUP_NOT_VIABLE" in audio_row


def test_up_with_simulated_hosts(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devpass",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--simulate",
            str(HOSTS_DIR / "hgx-h100.yaml"),
            str(HOSTS_DIR / "workstation.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"devpass up ended early: {process.stderr.read() if process.stderr else ''}"
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        summary = "".join(lines)
        address = re.search(r"controller\s+(127\.0\.0\.1:\d+)", summary)
        assert address is not None, summary
        assert "hgx-h100-01, ws-01" in summary

        available = devpass(address[1], "-o", "json", "devices", "available", "--host", "hgx-h100-01")
        functions = json.loads(available.stdout)["devices"]
        h100s = [d for d in functions if d["function"]["device_id"] == "2330"]
        assert len(h100s) == 8
        assert all(d["function"]["type"] == "gpu" for d in h100s)
        registered = devpass(
            address[1], "devices", "register", "--host", "hgx-h100-01", h100s[0]["function"]["pci_address"]
        )
        assert registered.returncode == 0, registered.stderr
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)

    assert process.returncode == 0
    assert _processes_mentioning(str(tmp_path / "state")) == []
    assert (tmp_path / "state" / "registry.sqlite3").exists()
    assert (tmp_path / "state" / "logs" / "controller.log").exists()


def _processes_mentioning(text: str) -> list[int]:
    """List the pids whose command line contains `text` (children left running)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command_line:
            pids.append(int(entry.name))

    return pids


def test_bind_attach_detach_unbind(processes: Processes, tmp_path: Path) -> None:
    fleet = start_fleet(processes, tmp_path / "state", {"l4-01": "l4.yaml"})
    address = fleet.controller.address
    assert devpass(address, "devices", "register", "a2:00.0", "--name", "l4").returncode == 0

    bound = devpass(address, "-o", "json", "devices", "bind", "l4")
    assert bound.returncode == 0, bound.stderr
    assert json.loads(bound.stdout)["device"]["bound_to_vfio"] is True

    attached = devpass(address, "-o", "json", "devices", "attach", "l4", "vm-7")
    assert attached.returncode == 0, attached.stderr
    assert json.loads(attached.stdout)["attached_to"] == "vm-7"
    again = devpass(address, "devices", "attach", "l4", "vm-8")
    assert again.returncode == 1
    assert again.stderr.startswith("error: DEVICE_IN_USE: ")
    in_use = devpass(address, "devices", "delete", "l4")
    assert in_use.returncode == 1
    assert "detach it first" in in_use.stderr

    assert devpass(address, "devices", "detach", "l4").returncode == 0
    unbound = devpass(address, "devices", "unbind", "l4")
    assert unbound.returncode == 0, unbound.stderr
    assert unbound.stdout.strip() == "l4 is back on nvidia"

    critical = devpass(address, "devices", "register", "01:00.0", "--bind-vfio")
    assert critical.returncode == 1
    assert critical.stderr.startswith("error: HOST_CRITICAL_DEVICE: ")


def test_watch_prints_events(processes: Processes, tmp_path: Path) -> None:
    fleet = start_fleet(processes, tmp_path / "state", {"l4-01": "l4.yaml"})
    address = fleet.controller.address
    watcher = subprocess.Popen(
        [sys.executable, "-m", "devpass", "--controller", address, "-o", "json", "devices", "watch"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        time.sleep(1.5)
        assert devpass(address, "devices", "register", "a2:00.0", "--name", "l4").returncode == 0
        assert watcher.stdout is not None
        event = json.loads(watcher.stdout.readline())
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=10)

    assert event["kind"] == "registered"
    assert event["name"] == "l4"
    assert int(event["cursor"]) > 0


def test_retried_register_keeps_one_entry(fleet: Fleet) -> None:
    address = fleet.controller.address
    first = devpass(
        address, "-o", "json", "devices", "register", "--host", "node-a", "a2:00.0", "--request-id", "r-1"
    )
    again = devpass(
        address, "-o", "json", "devices", "register", "--host", "node-a", "a2:00.0", "--request-id", "r-1"
    )

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["id"] == json.loads(first.stdout)["id"]
    listed = json.loads(devpass(address, "-o", "json", "devices", "list").stdout)["devices"]
    assert len(listed) == 1
