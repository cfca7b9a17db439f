"""Structured (JSON-lines) logging shared by every slomesh service.

Each record is one JSON object on stderr with `ts` (ISO 8601, UTC), `level`, `service`,
`logger`, `msg`, the current `trace_id`/`span_id` when a span is active, and every field passed
through `extra={...}`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys

from opentelemetry import trace

_STANDARD_ATTRS = set(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (see the module docstring)."""

    def __init__(self, service_name: str):
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(),
            "level": record.levelname,
            "service": self.service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service_name: str, level: str = "INFO") -> None:
    """Sends every log record of this process to stderr as JSON lines.

    Args:
        service_name: value of the `service` field.
        level: root log level name ("DEBUG", "INFO", ...).

    Raises:
        ValueError: unknown level name.
    """
    try:
        numeric = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        raise ValueError(f"level: unknown log level {level!r}") from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("aiohttp.access", "nats", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
