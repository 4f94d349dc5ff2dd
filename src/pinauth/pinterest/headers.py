"""Which headers cross the proxy, in each direction: allowlists both ways."""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import parsedate_to_datetime

# Requests: an allowlist. The client's Cookie, Authorization, Host, X-Forwarded-* and the
# like belong to the client's conversation with pinauth, never to Pinterest.
FORWARDED_REQUEST_HEADERS = frozenset({"accept", "accept-language", "content-type"})

# Responses: an allowlist too, of what tells the client about Pinterest's answer.
# Everything else stays behind: Set-Cookie would plant Pinterest's cookies on pinauth's
# origin; Location and Refresh would send the browser elsewhere; Access-Control-* would
# widen pinauth's CORS policy; Clear-Site-Data would wipe the app's own storage; framing
# and encoding headers no longer describe the body pinauth re-frames. Lowercase bytes,
# compared with the upstream's raw names lowercased.
RELAYED_RESPONSE_HEADERS = frozenset({b"content-type", b"link", b"retry-after", b"x-pinterest-rid"})
# Pinterest's rate-limit headers (x-ratelimit-*, and x-userendpoint-ratelimit-* on the
# per-user, per-endpoint limits).
RELAYED_RESPONSE_HEADER_PREFIXES = (b"x-ratelimit-", b"x-userendpoint-ratelimit-")
# The names Pinterest documents under those prefixes, for CORS's Expose-Headers, which
# takes names, not patterns.
EXPOSED_RATE_LIMIT_HEADERS = tuple(
    f"{prefix}{field}"
    for prefix in ("X-RateLimit-", "X-Userendpoint-Ratelimit-")
    for field in ("Limit", "Remaining", "Reset")
)

# RFC 9110 field-value characters, less obs-text (bytes >= 0x80, obsolete): a value
# with anything else (control characters, UTF-8 that some stacks decode and others
# refuse) is dropped rather than relayed or allowed to fail the response.
_NOT_FIELD_VALUE = re.compile(rb"[^\t\x20-\x7e]")
_NOT_FIELD_TEXT = re.compile(r"[^\t\x20-\x7e]")

_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

# Retry-After is relayed only in one of its two valid forms.
_DELAY_SECONDS = re.compile(rb"\d{1,9}")


def _retry_after(value: bytes) -> bool:
    """A delay in seconds or an HTTP date (RFC 9110 10.2.3); anything else is dropped."""
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return True
    try:
        return parsedate_to_datetime(value.decode("ascii")) is not None
    except (TypeError, ValueError, IndexError, OverflowError):  # a 30-digit year overflows
        return False


# Responses carry one user's data: no shared cache may keep them.
NO_STORE = (b"cache-control", b"no-store")


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names that a Connection header declares hop-by-hop."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return named


def request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers that may reach Pinterest.

    A value with anything but visible ASCII and tabs is dropped, not forwarded: the outgoing request
    cannot carry it (httpx encodes header values as ASCII), and Pinterest would not
    understand it in an Accept, Accept-Language or Content-Type anyway.
    """
    headers = list(headers)
    allowed = FORWARDED_REQUEST_HEADERS - _connection_listed(headers)
    return [
        (name, value)
        for name, value in headers
        if name.lower() in allowed and not _NOT_FIELD_TEXT.search(value)
    ]


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Pinterest's raw response headers that may reach the client, plus no-store.

    Bytes from end to end: httpx decodes a header block as UTF-8 when it can, and a
    value such as "€" then cannot be encoded back to latin-1 for the response.
    """
    kept: list[tuple[bytes, bytes]] = []
    connection: bytes | None = None
    content_type = retry_after = False
    for name, value in raw:
        name = name.lower()
        if name in RELAYED_RESPONSE_HEADERS or name.startswith(RELAYED_RESPONSE_HEADER_PREFIXES):
            if _NOT_FIELD_VALUE.search(value):
                continue
            # One value each: browsers use the last of two Content-Types, clients the
            # first Retry-After; the first valid one Pinterest sent is relayed.
            if name == b"content-type":
                if content_type:
                    continue
                content_type = True
            elif name == b"retry-after":
                if retry_after or not _retry_after(value):
                    continue
                retry_after = True
            kept.append((name, value))
        elif name == b"connection":
            connection = value if connection is None else connection + b"," + value
    # A header the upstream names in Connection is hop-by-hop (RFC 9110 7.6.1), even
    # an allowed one; the usual bare keep-alive/close names none and costs one lookup.
    if connection is not None and kept and connection.lower() not in _PLAIN_CONNECTION:
        listed = {token.strip().lower() for token in connection.split(b",")}
        kept = [header for header in kept if header[0] not in listed]
    kept.append(NO_STORE)
    return kept
