"""Logging setup that keeps OAuth codes, states and tokens out of the logs."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from pinauth.observability import context_fields


class StripQueryFilter(logging.Filter):
    """Drop query strings from uvicorn's access log.

    The callback's query carries the OAuth `code` and `state`, and proxied queries
    belong to the user; the path and status are what operators need.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, logger, request and connection ids,
    and whatever the call passed as `extra` (route, status, duration_ms, …)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        entry.update((k, v) for k, v in context_fields().items() if v is not None)
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """A dictConfig for uvicorn and pinauth alike."""
    level = level.upper()
    text_format = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"strip_query": {"()": StripQueryFilter}},
        "formatters": {
            "default": {"()": JsonFormatter} if log_format == "json" else text_format,
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["strip_query"],
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "pinauth": {"handlers": ["default"], "level": level, "propagate": False},
            "pinauth.access": {"handlers": ["access"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            # httpx logs full request URLs at INFO; keep it quiet.
            "httpx": {"level": "WARNING"},
        },
    }
