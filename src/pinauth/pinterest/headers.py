"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from collections.abc import Iterable

# Requests: an allowlist. The client's Cookie, Authorization, Host, X-Forwarded-* and the
# like belong to the client's conversation with pinauth, never to Pinterest.
FORWARDED_REQUEST_HEADERS = frozenset({"accept", "accept-language", "content-type"})

# Responses: everything but what would be wrong or dangerous to pass on. Set-Cookie
# would plant Pinterest's cookies on the pinauth origin; the body is re-framed here
# (httpx has already decoded it), so framing and encoding headers describe nothing.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {
    "set-cookie",
    "set-cookie2",
    "content-length",
    "content-encoding",
    "cache-control",
    "server",
    "date",
    "alt-svc",
    "strict-transport-security",
    # pinauth's own security headers (security_headers.py) describe these responses;
    # upstream's would compete with them, and for nosniff the first value is the one
    # browsers read.
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "content-security-policy",
    "content-security-policy-report-only",
}


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names that a Connection header declares hop-by-hop."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return named


def request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    headers = list(headers)
    allowed = FORWARDED_REQUEST_HEADERS - _connection_listed(headers)
    return [(name, value) for name, value in headers if name.lower() in allowed]


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    headers = list(headers)
    dropped = DROPPED_RESPONSE_HEADERS | _connection_listed(headers)
    kept = [(name, value) for name, value in headers if name.lower() not in dropped]
    # Responses carry one user's data: no shared cache may keep them.
    kept.append(("cache-control", "no-store"))
    return kept
