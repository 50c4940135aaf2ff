"""Assertions shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from devpass import errors


def rejected(
    call: Callable[..., Any], request: Any, code: grpc.StatusCode, reason: str
) -> errors.DevpassError:
    """Make the call, assert it fails with `code` and ErrorInfo `reason`, and return the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=20)

    assert caught.value.code() == code, caught.value.details()
    error = errors.from_rpc_error(caught.value)
    assert error is not None, f"no devpass ErrorInfo in {caught.value}"
    assert error.reason == reason, error.message

    return error
