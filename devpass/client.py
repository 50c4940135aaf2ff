"""Channels to the controller, with the retry policy for reads in the gRPC service config."""

from __future__ import annotations

import json
import os
import uuid

import grpc

from devpass.errors import InvalidArgument

DEFAULT_CONTROLLER = "127.0.0.1:50051"
CONTROLLER_ENV = "DEVPASS_CONTROLLER"

_RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
_MUTATING = (
    "RegisterDevice",
    "UnregisterDevice",
    "BindDevice",
    "UnbindDevice",
    "AttachDevice",
    "DetachDevice",
)

# gRPC itself retries a call that failed with UNAVAILABLE (a restarting controller, a lost
# connection). Reads are safe to repeat. Mutating calls are too, because the CLI gives each
# one a request_id, and the controller returns the first result for a repeated request_id.
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
            "retryPolicy": _RETRY_POLICY,
        },
        {
            "name": [{"service": "devpass.v1.DeviceService", "method": method} for method in _MUTATING],
            "timeout": "90s",
            "retryPolicy": _RETRY_POLICY,
        },
    ]
}


def request_id(explicit: str = "") -> str:
    """Return `explicit`, or a new random request id that makes a retried call safe."""
    return explicit or f"cli-{uuid.uuid4().hex}"


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
