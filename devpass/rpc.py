"""Server plumbing shared by the controller and the agent.

One interceptor turns every `DevpassError` into its gRPC status with ErrorInfo and writes
one log line per call. No servicer deals with status codes itself.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from devpass.errors import DevpassError, InvalidArgument

REQUEST_ID_HEADER = "x-request-id"
# Channels between controller and agents reconnect within a second after a peer restarts.
# gRPC's default backoff grows to two minutes, long enough for a restarted controller to
# call every host dead because their heartbeats wait out the backoff.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Request id of the call being served, forwarded to agents so one id follows a request.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# Calls that arrive every few seconds from every host log at debug level.
_DEBUG_METHODS = frozenset({"/devpass.v1.HostService/Heartbeat"})
log = structlog.get_logger()


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Map domain errors to statuses and log one line per RPC with its outcome and duration."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler

        request_id = _request_id(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        return handler


def _request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value

    return uuid.uuid4().hex


def _wrap_unary(inner: Any, method: str, request_id: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        current_request_id.set(request_id)
        started = time.monotonic()
        try:
            response = await inner(request, context)
        except DevpassError as err:
            _log_refusal(method, request_id, started, err)
            await context.abort_with_status(err.to_status())
        except Exception:
            log.exception("rpc_failed", method=method, request_id=request_id, code="INTERNAL")
            await context.abort_with_status(_internal_error(request_id).to_status())
        else:
            _log_success(method, request_id, started)
            return response

    return call


def _wrap_stream(inner: Any, method: str, request_id: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        current_request_id.set(request_id)
        started = time.monotonic()
        try:
            async for response in inner(request, context):
                yield response
        except DevpassError as err:
            _log_refusal(method, request_id, started, err)
            await context.abort_with_status(err.to_status())
        except Exception:
            log.exception("rpc_failed", method=method, request_id=request_id, code="INTERNAL")
            await context.abort_with_status(_internal_error(request_id).to_status())
        else:
            _log_success(method, request_id, started)

    return call


def _internal_error(request_id: str) -> DevpassError:
    return DevpassError(
        f"internal error; the server log has the details under request_id {request_id}",
        request_id=request_id,
    )


def _log_success(method: str, request_id: str, started: float) -> None:
    emit = log.debug if method in _DEBUG_METHODS else log.info
    emit(
        "rpc_completed",
        method=method,
        request_id=request_id,
        code="OK",
        duration_ms=round((time.monotonic() - started) * 1000, 2),
    )


def _log_refusal(method: str, request_id: str, started: float, err: DevpassError) -> None:
    log.info(
        "rpc_rejected",
        method=method,
        request_id=request_id,
        code=err.code.name,
        reason=err.reason,
        error=err.message,
        duration_ms=round((time.monotonic() - started) * 1000, 2),
    )


def is_loopback(address: str) -> bool:
    """Return whether a `host:port` listen address only accepts connections from this machine."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_address(address: str, *, insecure: bool) -> None:
    """Reject a plaintext listen address reachable from other machines unless `insecure` is set.

    Raises:
        InvalidArgument: the address is not loopback and `insecure` is false.
    """
    if not is_loopback(address) and not insecure:
        raise InvalidArgument(
            f"refusing to listen on {address} without TLS: listen on 127.0.0.1, "
            "or pass --insecure to accept plaintext connections from other machines",
            address=address,
        )
    if not is_loopback(address):
        log.warning("plaintext_listen_on_network", address=address)


def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Add grpc.health.v1 and server reflection for `service_names`; return the health servicer."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    return health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    """Report every service, and the server as a whole, as SERVING."""
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def write_ready_file(path: Path, **fields: Any) -> None:
    """Write `fields` as JSON to `path` atomically, so a parent process never reads half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(fields))
    os.replace(partial, path)
