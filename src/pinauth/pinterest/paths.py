"""Confine proxied paths to the configured Pinterest API base.

httpx ignores `base_url` for an absolute URL, and servers decode `%2F` before routing, so
a naive `/proxy/{path}` can send the user's token to any host or climb out of `/v5`.
Pinterest's own paths are plain words, ids and underscores, so instead of trying to
recognise every attack, a path is accepted only if every segment is made of URL
*unreserved* characters (RFC 3986) and is not a dot segment. That rules out `..`, `.`,
empty segments, `\\`, `@`, `:`, `;`, control characters, schemes and authorities, and
any percent-encoded form of them, which is checked on the raw path as the client sent it.
"""

from __future__ import annotations

import re

from pinauth.errors import PinauthError

_SEGMENT = re.compile(r"[A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+)*")
_MAX_PATH_LENGTH = 2048


class InvalidPath(PinauthError):
    status_code = 400
    code = "invalid_path"
    default_message = (
        "That path cannot be proxied: use a Pinterest v5 path such as boards or "
        "boards/<board_id>/pins, without dot segments, empty segments or encoded characters."
    )


def confine(raw_path: str) -> str:
    """The path to append to the API base, from the raw (still percent-encoded) path.

    Legitimate Pinterest paths never need percent-encoding, so any `%` is refused: that
    covers `%2e%2e`, `%2f`, `%5c`, `%40` and their double-encoded forms alike.
    """
    if not raw_path or len(raw_path) > _MAX_PATH_LENGTH:
        raise InvalidPath()
    segments = raw_path.split("/")
    if not all(_SEGMENT.fullmatch(segment) for segment in segments):
        raise InvalidPath()
    if segments[0].lower() == "oauth":
        # Token issuing and revocation are pinauth's own business, never a client's.
        raise InvalidPath("OAuth endpoints cannot be called through the proxy.")
    return raw_path
