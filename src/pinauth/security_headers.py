"""Security headers: the ones every response carries, and each page's Content-Security-Policy.

RequestContextMiddleware adds `ALWAYS` to every response, and `LOCKED_DOWN_CSP` to each
one that names no policy of its own: JSON, errors, static files. The proxy sets
`LOCKED_DOWN_CSP` itself on what it relays, so no header from upstream can stand in for
it. HTML pages set a policy that allows exactly what they load: the demo page, /docs and
/redoc (api/docs.py), the sandbox's consent page (sandbox/pages.py).
"""

from __future__ import annotations

from collections.abc import Iterable

Header = tuple[bytes, bytes]

ALWAYS: tuple[Header, ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # For browsers that predate frame-ancestors; every policy here also says 'none'.
    (b"x-frame-options", b"DENY"),
)

# Nothing may load, run, submit or frame it; `sandbox` also gives a document an opaque
# origin, so HTML that comes back through the proxy is inert on pinauth's origin.
LOCKED_DOWN_CSP: Header = (
    b"content-security-policy",
    b"default-src 'none'; frame-ancestors 'none'; sandbox",
)

# The demo page (static/index.html) loads one script and one stylesheet from /static,
# has no inline script or style, and talks to pinauth with fetch().
DEMO_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_CSP = b"content-security-policy"
_ALWAYS_AND_LOCKED_DOWN = (*ALWAYS, LOCKED_DOWN_CSP)


_REQUEST_ID = b"x-request-id"
_VARY = b"vary"
# The headers secured() looks at, by what it does with them: one lookup per header.
_POLICY, _ID, _VARIES = 0, 1, 2
_WATCHED = {_CSP: _POLICY, _REQUEST_ID: _ID, _VARY: _VARIES}


def secured(headers: Iterable[Header], request_id: Header) -> list[Header]:
    """A response's headers with the request id and the security headers added.

    A response carries one request id, the one logged, and one Vary naming each field
    once: an inner layer's id is dropped, and Vary values that layers joined (CORS's
    "Origin" on a response that already varied by Origin) are merged. One pass over the
    headers, which are rebuilt only when there is something to merge.
    """
    if type(headers) is not list:  # Starlette sends lists; anything else is read once
        headers = list(headers)
    has_policy = merge = False
    varies = 0
    for name, value in headers:
        kind = _WATCHED.get(name)
        if kind is None:
            continue
        if kind == _POLICY:
            has_policy = True
        elif kind == _ID:
            merge = True
        else:
            varies += 1
            merge = merge or varies > 1 or b"," in value
    if merge:
        headers = _merged(headers)
    return [*headers, request_id, *(ALWAYS if has_policy else _ALWAYS_AND_LOCKED_DOWN)]


def _merged(headers: list[Header]) -> list[Header]:
    """`headers` less any request id, with every Vary merged into the first, each field once."""
    kept: list[Header] = []
    fields: dict[bytes, bytes] = {}  # lowercased -> as first spelled
    vary_at = -1
    for name, value in headers:
        if name == _REQUEST_ID:
            continue
        if name == _VARY:
            for field in value.split(b","):
                field = field.strip()
                if field:
                    fields.setdefault(field.lower(), field)
            if vary_at < 0:
                vary_at = len(kept)
                kept.append((name, value))
            continue
        kept.append((name, value))
    if vary_at >= 0:
        kept[vary_at] = (_VARY, b", ".join(fields.values()))
    return kept
