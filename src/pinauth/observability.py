"""Metrics, request ids, security headers and the per-request log line."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from secrets import token_hex
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pinauth.pinterest.endpoints import OTHER, resource
from pinauth.redact import redact_credentials
from pinauth.security_headers import secured

# Set per request; the JSON log formatter adds them to every line logged meanwhile.
REQUEST_ID: ContextVar[str | None] = ContextVar("pinauth_request_id", default=None)
CONNECTION_ID: ContextVar[str | None] = ContextVar("pinauth_connection_id", default=None)

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Label values come from fixed sets, so no client can mint new series: a method outside
# this set (any token is a valid HTTP method) is counted as `other`.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ACCESS_LOGGER = "pinauth.access"
access_log = logging.getLogger(ACCESS_LOGGER)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (one per app instance).

    Every label takes its values from a fixed set: route templates (or `unmatched`),
    known methods, statuses, Pinterest's resource names from its spec (or `other`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pinauth_http_requests",
            "HTTP requests served, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "pinauth_http_request_duration_seconds",
            "Time to serve a request, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "pinauth_upstream_request_duration_seconds",
            "Latency of calls to Pinterest, by resource (first path segment if Pinterest's "
            "spec has it, else other).",
            ["endpoint"],
            registry=self.registry,
        )
        self.refreshes = Counter(
            "pinauth_token_refreshes",
            "Token refresh attempts against Pinterest, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        # client_rejected: Pinterest refused the app's own credentials (no connection marked).
        for outcome in ("ok", "rejected", "transient_error", "client_rejected"):
            self.refreshes.labels(outcome)
        # Labelled by the spec's rate-limit categories: a fixed set, never a path.
        self.governed_calls = Counter(
            "pinauth_governed_calls",
            "Proxied calls pinauth answered 429 itself, without calling Pinterest, because "
            "Pinterest had asked the connection to wait in that rate-limit category.",
            ["category"],
            registry=self.registry,
        )
        self.upstream_rate_limits = Counter(
            "pinauth_upstream_rate_limits",
            "Pinterest's answers asking a connection to wait (429, or 503 with Retry-After) "
            "to proxied calls, by rate-limit category and status.",
            ["category", "status"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "pinauth_webhook_deliveries",
            "Webhook delivery attempts, by what they came to: delivered, retry (to be tried "
            "again) or failed (given up).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("delivered", "retry", "failed"):
            self.webhook_deliveries.labels(outcome)
        self.connections = Gauge(
            "pinauth_connections",
            "Stored Pinterest connections, by status (read at scrape time).",
            ["status"],
            registry=self.registry,
        )
        # Each request's series, looked up once: `labels()` builds and locks a lookup
        # that costs more than counting. Bounded like the labels themselves (fixed sets).
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_series: dict[str, Histogram] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_duration.labels(route),
            )
        series[0].inc()
        series[1].observe(seconds)

    def observe_upstream(self, path: str, seconds: float) -> None:
        endpoint = resource(path)
        series = self._upstream_series.get(endpoint)
        if series is None:
            series = self._upstream_series[endpoint] = self.upstream_duration.labels(endpoint)
        series.observe(seconds)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestContextMiddleware:
    """Request id in and out (X-Request-ID), security headers on every response (see
    security_headers.py), request metrics, and one log line a request.

    Plain ASGI rather than BaseHTTPMiddleware, which costs far more per request.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, log_requests: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = (
            # token_hex: the same 128 random bits as uuid4().hex, without building a UUID
            # (a quarter of the time, on every request).
            incoming if incoming and _VALID_REQUEST_ID.fullmatch(incoming) else token_hex(16)
        )
        request_token = REQUEST_ID.set(request_id)
        connection_token = CONNECTION_ID.set(None)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = secured(
                    message.get("headers", ()), (b"x-request-id", request_id.encode())
                )
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = _route_template(scope)
            method = scope["method"]
            self.metrics.observe_request(
                route, method if method in _METHODS else OTHER, status, duration
            )
            if self.log_requests:
                # The path only: query strings carry OAuth codes, states and user data; and no
                # credential a caller put into the path.
                access_log.info(
                    "request",
                    extra={
                        "method": method,
                        "path": redact_credentials(scope["path"]),
                        "route": route,
                        "status": status,
                        "duration_ms": round(duration * 1000, 2),
                    },
                )
            CONNECTION_ID.reset(connection_token)
            REQUEST_ID.reset(request_token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


@contextlib.contextmanager
def about_connection(public_id: str) -> Iterator[None]:
    """Work on one connection outside a request (a refresh, a recheck, a webhook
    delivery): every line logged meanwhile, even by code that does not know the
    connection (pinterest/oauth.py), carries its public id, as in a request."""
    token = CONNECTION_ID.set(public_id)
    try:
        yield
    finally:
        CONNECTION_ID.reset(token)


def context_fields() -> dict[str, Any]:
    return {"request_id": REQUEST_ID.get(), "connection_id": CONNECTION_ID.get()}
