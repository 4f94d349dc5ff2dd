"""Logging setup that keeps OAuth codes, states and tokens out of the logs."""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeAlias
from urllib.parse import quote

from sqlalchemy.exc import StatementError

from pinauth.observability import ACCESS_LOGGER, CONNECTION_ID, context_fields

ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)

# Database drivers quote SQL parameters in their messages: asyncpg's "invalid input for
# query argument $1: '<value>'", PostgreSQL's 'invalid input syntax for type integer: "<value>"'
# and a unique violation's "DETAIL: Key (...)=(<value>)"; SQLAlchemy adds "[parameters: ...]"
# unless hide_parameters is on. Parameters are tokens, session hashes and user data, so a
# traceback keeps its frames and SQL but not those messages. SQLite's messages name tables
# and constraints, never values, and are kept: they are what makes a traceback useful.
_QUOTING_DRIVERS = ("asyncpg", "psycopg", "sqlalchemy.dialects")
_WITHHELD = "[message withheld: it may quote SQL parameters]"


def _quotes_parameters(error: BaseException) -> bool:
    return isinstance(error, StatementError) or type(error).__module__.startswith(_QUOTING_DRIVERS)


def _safe_message(error: BaseException) -> str:
    if isinstance(error, StatementError):
        orig = error.orig
        text = (
            f"({type(orig).__module__}.{type(orig).__qualname__}) {_safe_message(orig)}"
            if orig is not None
            else _WITHHELD
        )
        return f"{text}\n[SQL: {error.statement}]" if error.statement else text
    if not type(error).__module__.startswith(_QUOTING_DRIVERS):
        return str(error)
    code = getattr(error, "sqlstate", None)
    return f"{_WITHHELD} ({code})" if code else _WITHHELD


def format_exception(exc_info: ExcInfo) -> str:
    """The traceback as logging prints it, minus messages that may quote SQL parameters.

    Withheld: the messages of database errors that may quote parameters, and of whatever
    those were raised from (the value asyncpg failed to encode is in its ValueError too).
    """
    _, error, tb = exc_info
    if error is None:
        return "NoneType: None"
    report = traceback.TracebackException(type(error), error, tb, compact=True)
    pending: list[tuple[traceback.TracebackException, BaseException, bool]] = [
        (report, error, False)
    ]
    seen: set[int] = set()
    while pending:
        node, exc, below = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if below or _quotes_parameters(exc):
            # TracebackException renders the message it keeps in _str (3.11 and later;
            # tests/test_outage.py fails if that changes).
            node._str = _WITHHELD if below else _safe_message(exc)  # type: ignore[attr-defined]
            node.__notes__ = None
        below = below or type(exc).__module__.startswith(_QUOTING_DRIVERS)
        if node.__cause__ is not None and exc.__cause__ is not None:
            pending.append((node.__cause__, exc.__cause__, below))
        if node.__context__ is not None and exc.__context__ is not None:
            pending.append((node.__context__, exc.__context__, below))
        if node.exceptions and isinstance(exc, BaseExceptionGroup):
            pending.extend(
                (n, e, below) for n, e in zip(node.exceptions, exc.exceptions, strict=False)
            )
    return "".join(report.format()).rstrip("\n")


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

    def formatException(self, ei: Any) -> str:
        return format_exception(ei)


# Characters a path keeps in the text log; anything else (spaces, control characters,
# non-ASCII a client percent-encoded) is percent-encoded again, so one request is one
# line of space-separated fields that no client can forge or split.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def access_line(record: logging.LogRecord) -> str:
    """The request log line for people: `GET /boards 200 3.1ms request_id=… connection_id=…`."""
    context = context_fields()
    fields = record.__dict__
    return (
        f"{fields['method']} {quote(fields['path'], safe=_PATH_SAFE)} {fields['status']} "
        f"{fields['duration_ms']}ms request_id={context['request_id'] or '-'} "
        f"connection_id={context['connection_id'] or '-'}"
    )


class TextFormatter(logging.Formatter):
    """logging's plain format, with tracebacks that withhold SQL parameters, and each
    request's access line spelled out (the JSON format has the same as fields)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER and "status" in record.__dict__:
            # A copy: other handlers of the same record keep the structured event.
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = access_line(record), None
        else:
            # The connection the line is about, when the message does not name it (the
            # JSON format has it as a field): e.g. the token endpoint's answers, logged
            # by code that does not know whose refresh it is.
            connection = CONNECTION_ID.get()
            if connection is not None:
                message = record.getMessage()
                if connection not in message:
                    record = logging.makeLogRecord(record.__dict__)
                    record.msg, record.args = f"{message} connection_id={connection}", None
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        return format_exception(ei)


def logging_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """A dictConfig for uvicorn and pinauth alike."""
    level = level.upper()
    text_format = {
        "()": TextFormatter,
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
    }
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
        # Everything else (SQLAlchemy's pool, asyncio) in the same format, through the same
        # traceback filter, rather than Python's bare last-resort handler.
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
