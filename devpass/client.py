"""Channels to the controller, with the retry policy for reads in the gRPC service config."""

from __future__ import annotations

import json
import os

import grpc

from devpass.errors import InvalidArgument

DEFAULT_CONTROLLER = "127.0.0.1:50051"
CONTROLLER_ENV = "DEVPASS_CONTROLLER"

# Reads are safe to repeat, so a transient UNAVAILABLE (a restarting controller) is retried
# by gRPC itself. Registration and unregistration are not retried: a retry could act twice.
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "devpass.v1.DeviceService", "method": "GetDevice"},
                {"service": "devpass.v1.DeviceService", "method": "ListDevices"},
                {"service": "devpass.v1.DeviceService", "method": "ListAvailableDevices"},
                {"service": "devpass.v1.HostService", "method": "ListHosts"},
            ],
            "timeout": "30s",
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        },
        {
            "name": [{"service": "devpass.v1.DeviceService"}],
            "timeout": "60s",
        },
    ]
}


def controller_address(explicit: str | None = None) -> str:
    """Return the controller address from the argument, $DEVPASS_CONTROLLER, or the default."""
    return explicit or os.environ.get(CONTROLLER_ENV) or DEFAULT_CONTROLLER


def connect(address: str) -> grpc.Channel:
    """Open a plaintext channel to the controller at `address`.

    Raises:
        InvalidArgument: the address lacks a port or has one outside 1-65535.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(
            f"invalid controller address {address!r}: use HOST:PORT with a port from 1 to 65535, "
            "for example 127.0.0.1:50051",
            address=address,
        )
    options = [
        ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]

    return grpc.insecure_channel(address, options=options)
