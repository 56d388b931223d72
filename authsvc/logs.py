"""structlog set-up: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Defence in depth: no code logs these, and if someone ever does, the value is
# replaced before it is rendered.
_SECRET_KEYS = ("password", "token", "secret", "hash", "api_key", "authorization")


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEYS)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if _is_secret_key(key):
            event[key] = "[redacted]"
    return event


def _trace_ids() -> Any:
    """A processor adding the current span's ``trace_id`` and ``span_id``
    (in a call: the RPC's) to the line."""
    from opentelemetry import trace

    def add_trace_ids(
        _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = trace.format_trace_id(context.trace_id)
            event["span_id"] = trace.format_span_id(context.span_id)
        return event

    return add_trace_ids


def configure(
    log_format: str, level: str, stream: TextIO | None = None, *, trace_ids: bool = False
) -> None:
    """``trace_ids``: add ``trace_id`` and ``span_id`` to every line written
    while a span is current (only when tracing is on: it imports the
    OpenTelemetry API)."""
    stream = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        exceptions: list[Any] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        exceptions = []
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([_trace_ids()] if trace_ids else []),
            _redact,
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
