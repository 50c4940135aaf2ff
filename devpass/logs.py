"""structlog set-up shared by the controller, the agent and the CLI."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(component: str, *, level: str = "info", json: bool | None = None, **bound: Any) -> None:
    """Configure structlog to write one event per line to stderr.

    Logs are JSON unless stderr is a terminal (console rendering), or as `json` sets.
    `bound` keys (for example `host` or `simulated`) go into every event.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    static_fields = {"component": component, **bound}

    # Static fields go in through a processor, not contextvars, so events logged from
    # worker threads (sysfs reads, SQLite) carry them too.
    def add_static_fields(
        logger: Any, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        for key, value in static_fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    structlog.configure(
        processors=[
            add_static_fields,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
