"""Health, server reflection and request ids on real servers."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from devpass.v1 import devices_pb2
from tests.conftest import Processes, start_fleet


def test_reflection_and_health(processes: Processes, tmp_path: Path) -> None:
    fleet = start_fleet(processes, tmp_path / "state", {"l4-01": "l4.yaml"})

    services = set(ProtoReflectionDescriptorDatabase(fleet.channel).get_services())
    health = health_pb2_grpc.HealthStub(fleet.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="devpass.v1.DeviceService"))

    assert {"devpass.v1.DeviceService", "devpass.v1.HostService", "grpc.health.v1.Health"} <= services
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    agent_channel = grpc.insecure_channel(fleet.agents["l4-01"].address)
    assert "devpass.v1.AgentService" in ProtoReflectionDescriptorDatabase(agent_channel).get_services()


def test_request_id_reaches_agent(processes: Processes, tmp_path: Path) -> None:
    fleet = start_fleet(processes, tmp_path / "state", {"l4-01": "l4.yaml"})

    fleet.devices.RegisterDevice(
        devices_pb2.RegisterDeviceRequest(pci_address="a2:00.0"),
        metadata=(("x-request-id", "trace-0001"),),
    )

    controller_lines = [
        json.loads(line) for line in fleet.controller.log().splitlines() if line.startswith("{")
    ]
    agent_lines = [
        json.loads(line) for line in fleet.agents["l4-01"].log().splitlines() if line.startswith("{")
    ]
    registered = [
        e for e in controller_lines if e["event"] == "rpc_completed" and e.get("request_id") == "trace-0001"
    ]
    inspected = [e for e in agent_lines if e.get("request_id") == "trace-0001"]
    assert [e["method"] for e in registered] == ["/devpass.v1.DeviceService/RegisterDevice"]
    assert [e["method"] for e in inspected] == ["/devpass.v1.AgentService/InspectFunction"]
    assert all(e["simulated"] is True for e in agent_lines)
