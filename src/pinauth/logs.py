"""Logging setup that keeps OAuth codes, states and tokens out of the logs."""

from __future__ import annotations

import logging
from typing import Any


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


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig for uvicorn and pinauth alike."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"strip_query": {"()": StripQueryFilter}},
        "formatters": {
            "default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
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
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            # httpx logs full request URLs at INFO; keep it quiet.
            "httpx": {"level": "WARNING"},
        },
    }
