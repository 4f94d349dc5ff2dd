"""What a browser and a frontend on another origin need from pinauth's edges.

The public origin a login must happen on, the frontend redirect that reports a failed
login (`?pinauth_error=<code>`), and the headers a cross-origin frontend may read.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse

from pinauth.pinterest.headers import EXPOSED_RATE_LIMIT_HEADERS
from pinauth.settings import Settings

ERROR_PARAMETER = "pinauth_error"

# Access-Control-Expose-Headers takes names, not patterns (and "*" means no names at
# all when credentials are included), so Pinterest's rate-limit headers are listed.
CORS_EXPOSED_HEADERS = (
    "Retry-After",
    "X-Request-ID",
    "X-Pinterest-RID",
    "Link",
    *EXPOSED_RATE_LIMIT_HEADERS,
)
# What a frontend may send in a cross-origin request besides the CORS-safelisted ones.
CORS_ALLOWED_HEADERS = ("Content-Type", "Accept", "Accept-Language", "X-Request-ID")

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def with_error(url: str, code: str) -> str:
    """`url` with `pinauth_error=<code>` in its query, replacing any it had."""
    return with_parameter(url, ERROR_PARAMETER, code)


def with_parameter(url: str, name: str, value: str) -> str:
    """`url` with `name=<value>` in its query, replacing any it had, keeping the rest."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
    query.append((name, value))
    # "https://app.example" is "https://app.example/" to a browser; say so.
    path = parts.path or ("/" if parts.netloc else "")
    return urlunsplit(parts._replace(path=path, query=urlencode(query)))


def wants_json(headers: Headers) -> bool:
    """The client asked for JSON, not a page: an API client rather than a browser.

    Browsers send `text/html` first for a navigation; `*/*` alone says nothing and gets
    the redirect a browser needs.
    """
    accept = headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


class PublicOrigin:
    """pinauth's public origin, the redirect URI's: where every login has to happen.

    A login started on another name for the same server (127.0.0.1 for localhost, a
    bare IP, an internal host name) sets its login cookie on that name, which the
    callback on the public name never gets: the login fails with invalid_state.
    """

    def __init__(self, settings: Settings) -> None:
        parts = urlsplit(settings.redirect_uri)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.enabled = settings.canonical_redirect and bool(parts.netloc)
        # Compared with the Host header, which omits a default port (and may not).
        host = parts.netloc.lower()
        default = f":{_DEFAULT_PORTS.get(parts.scheme, '')}"
        self._hosts = frozenset(
            {host, host.removesuffix(default)} if host.endswith(default) else {host, host + default}
        )

    def is_public_host(self, request: Request) -> bool:
        """Whether the request named pinauth's public host (and port) in its Host header."""
        host = request.headers.get("host")
        return host is not None and host.lower() in self._hosts

    def redirect(self, request: Request) -> RedirectResponse | None:
        """A redirect to the same path and query on the public origin, if the request
        reached pinauth by another name; None if it is already there.

        The scheme is not compared: behind a TLS-terminating proxy the app sees http,
        and redirecting on it would loop.
        """
        if not self.enabled:
            return None
        host = request.headers.get("host")
        if not host or host.lower() in self._hosts:
            return None
        target = self.origin + request.scope.get("root_path", "") + request.scope["path"]
        query = request.scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        return RedirectResponse(target, status_code=307)
