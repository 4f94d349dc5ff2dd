"""pinauth.client: the app's backend talking to pinauth, in Python (asyncio, httpx).

    async with PinauthClient("https://pinauth.example.com", api_key) as pinauth:
        session = await pinauth.create_connect_session("user_42", return_to="/settings")
        # ... send the end user's browser to session.connect_url; it comes back to
        # /settings?pinauth_connect_result=…, where your app knows who is logged in:
        connection = await pinauth.confirm_connection(result, end_user_id="user_42")
        async for connection in pinauth.connections(end_user_id="user_42"):
            boards = await pinauth.request(connection.id, "GET", "/boards")

Every call authenticates with the API key; calls to Pinterest go through pinauth's proxy
(`/pinterest/{path}` with `Pinauth-Connection-Id`), so no Pinterest token ever reaches
the backend. Failures are exceptions: `PinauthAPIError` for pinauth's own errors (its
`error` code), `PinterestAPIError` for Pinterest's, passed through unchanged (its `code`),
a redirect included (this client follows none), `RateLimitError` for a 429 (with
`retry_after`), `PinauthTransportError` when pinauth could not be reached. All derive from
`PinauthClientError`. Arguments that cannot make a valid call (a method the proxy does not
serve, a control character in a path or header, a header the client sets itself) raise
ValueError before anything is sent; an id that cannot be a connection's raises
ConnectionNotFoundError, as pinauth would, without a request.

`sdk_client()` needs the optional extra `pinauth[sdk]` (the official pinterest-api-sdk).
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote

import httpx

from pinauth import __version__
from pinauth.numbers import ascii_int

if TYPE_CHECKING:
    from pinterest.client import PinterestSDKClient  # type: ignore[import-untyped]

__all__ = [
    "APIError",
    "AuthenticationError",
    "ConnectResultMismatchError",
    "ConnectSession",
    "Connection",
    "ConnectionNotFoundError",
    "InvalidConnectResultError",
    "PinauthAPIError",
    "PinauthClient",
    "PinauthClientError",
    "PinauthTimeoutError",
    "PinauthTransportError",
    "PinterestAPIError",
    "ProxyToken",
    "ProxyTokenNotFoundError",
    "RateLimitError",
    "ReauthorizationRequiredError",
    "UnexpectedResponseError",
]

CONNECTION_ID_HEADER = "Pinauth-Connection-Id"
# Headers the client sets for every call and a caller may not replace or add beside
# its own (HTTP header names are case-insensitive): they choose whom a call acts as.
_RESERVED_HEADERS = frozenset({"authorization", CONNECTION_ID_HEADER.lower()})
# The methods pinauth's proxy serves.
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# pinauth's connection ids: "conn_" and 26 base32 characters (models.new_public_id);
# looser in length so an id pinauth may mint differently later still reaches it.
_CONNECTION_ID = re.compile(r"conn_[a-z0-9]{1,35}")
# Proxy token ids: "pt_" and 26 base32 characters, as loosely.
_PROXY_TOKEN_ID = re.compile(r"pt_[a-z0-9]{1,35}")
# RFC 9110: a header name is a token; a value visible ASCII, spaces and tabs.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
DEFAULT_TIMEOUT_SECONDS = 30.0
# The most /v1/connections returns per page.
MAX_PAGE_SIZE = 100
# How much of an unexpected body an exception message quotes.
_QUOTED_BODY_CHARS = 200


# --- errors -------------------------------------------------------------------------


class PinauthClientError(Exception):
    """Base of every error this client raises."""


class PinauthTransportError(PinauthClientError):
    """pinauth could not be reached, or the connection broke before it answered."""


class PinauthTimeoutError(PinauthTransportError):
    """pinauth did not answer within the client's timeout."""


class UnexpectedResponseError(PinauthClientError):
    """A success status whose body is not what pinauth sends (a wrong base_url?)."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(message)
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")


class APIError(PinauthClientError):
    """An error answer (status >= 400), from pinauth or, through it, from Pinterest.

    `body` is the decoded JSON body (None if it was not JSON); `retry_after` the seconds
    the `Retry-After` header asks to wait (None without one); `request_id` is pinauth's
    `X-Request-ID` for this call, the key to its log lines.
    """

    def __init__(self, message: str, response: httpx.Response, body: Any) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = response.status_code
        self.body = body
        self.headers = response.headers
        self.request_id: str | None = response.headers.get("x-request-id")
        self.retry_after = retry_after_seconds(response.headers.get("retry-after"))

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.message}"


class PinauthAPIError(APIError):
    """pinauth's own error, `{"error": "<code>", "message": "…"}`; `error` is the code."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        self.error: str = str(body["error"])
        super().__init__(str(body.get("message") or self.error), response, body)

    def __str__(self) -> str:
        return f"HTTP {self.status_code} {self.error}: {self.message}"


class AuthenticationError(PinauthAPIError):
    """The API key (or proxy token) was refused: `invalid_api_key`."""


class ConnectionNotFoundError(PinauthAPIError):
    """No connection has this id (or it was deleted): `connection_not_found`.

    Also raised, without a request (so `request_id` is None), for an id that cannot be
    one of pinauth's (they look like `conn_…`).
    """


class ProxyTokenNotFoundError(PinauthAPIError):
    """The connection has no proxy token with this id (revoked, expired, or another
    connection's): `proxy_token_not_found`. Also raised, without a request, for an id
    that cannot be one of pinauth's (they look like `pt_…`)."""


class InvalidConnectResultError(PinauthAPIError):
    """The connect result is unknown, expired or already used: `invalid_connect_result`."""


class ConnectResultMismatchError(PinauthAPIError):
    """The connect result belongs to another end user's connect session (someone else
    completed that link): `connect_result_mismatch`. pinauth discarded what it made."""


class ReauthorizationRequiredError(PinauthAPIError):
    """Pinterest no longer accepts the connection's tokens: the end user must connect
    again. Mint a new connect session for `end_user_id` (None for a browser-only login)
    and send them to its connect_url; the connection is renewed in place, same id."""

    def __init__(self, response: httpx.Response, body: Mapping[str, Any]) -> None:
        super().__init__(response, body)
        self.end_user_id: str | None = body.get("end_user_id")


class PinterestAPIError(APIError):
    """Pinterest's own error, passed through unchanged: `{"code": int, "message": str}`.

    `code` is Pinterest's error code (see its API reference), `status_code` the HTTP status.
    A redirect (3xx) Pinterest answers is one too, with `code` None: pinauth passes it
    through without its `Location`, and this client follows none.
    """

    def __init__(
        self, response: httpx.Response, body: Mapping[str, Any] | None, message: str = ""
    ) -> None:
        code = (body or {}).get("code")
        self.code: int | None = code if isinstance(code, int) else None
        super().__init__(message or str((body or {}).get("message") or ""), response, body)

    def __str__(self) -> str:
        if self.code is None:
            return f"HTTP {self.status_code}: {self.message}"
        return f"HTTP {self.status_code}, Pinterest code {self.code}: {self.message}"


class RateLimitError(PinterestAPIError):
    """429: Pinterest (or pinauth on its behalf) asks this connection to slow down.

    Wait `retry_after` seconds before the next call in the same category; it is None
    when Pinterest gave no `Retry-After` (its limits count per minute).
    """


_PINAUTH_ERRORS: dict[str, type[PinauthAPIError]] = {
    "invalid_api_key": AuthenticationError,
    "invalid_proxy_token": AuthenticationError,
    "connection_not_found": ConnectionNotFoundError,
    "proxy_token_not_found": ProxyTokenNotFoundError,
    "reauthorization_required": ReauthorizationRequiredError,
    "invalid_connect_result": InvalidConnectResultError,
    "connect_result_mismatch": ConnectResultMismatchError,
}


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """A `Retry-After` header as seconds from now (delta-seconds or HTTP-date form)."""
    if value is None:
        return None
    value = value.strip()
    if (seconds := ascii_int(value)) is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year of 30 digits overflows
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, math.ceil((when - (now or datetime.now(UTC))).total_seconds()))


def error_for(response: httpx.Response) -> APIError:
    """The exception for an error response, by the shape of its body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            kind = _PINAUTH_ERRORS.get(body["error"], PinauthAPIError)
            return kind(response, body)
        if isinstance(body.get("code"), int) and not isinstance(body["code"], bool):
            if response.status_code == 429:
                return RateLimitError(response, body)
            return PinterestAPIError(response, body)
    text = response.text[:_QUOTED_BODY_CHARS].strip()
    reason = response.reason_phrase or "error"
    return APIError(f"{reason}{': ' + text if text else ''}", response, body)


# --- results ------------------------------------------------------------------------


def _when(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected a timestamp, got {value!r}")
    return datetime.fromisoformat(value)


def _maybe_when(value: Any) -> datetime | None:
    return None if value is None else _when(value)


@dataclass(frozen=True, slots=True)
class ConnectSession:
    """A connect session: send the end user's browser to `connect_url` before `expires_at`.

    `token` is the single-use credential inside `connect_url`; it is shown once.
    """

    token: str
    connect_url: str
    expires_at: datetime

    @property
    def url(self) -> str:
        return self.connect_url

    def __repr__(self) -> str:  # keep the single-use token out of logs
        return f"ConnectSession(connect_url=<hidden>, expires_at={self.expires_at!r})"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ConnectSession:
        return cls(
            token=str(body["token"]),
            connect_url=str(body["connect_url"]),
            expires_at=_when(body["expires_at"]),
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """One end user's Pinterest account as pinauth stores it (never its tokens)."""

    id: str
    end_user_id: str | None
    pinterest_user_id: str
    username: str
    scopes: list[str]
    status: str  # "active" or "reauthorization_required"
    created_at: datetime
    updated_at: datetime
    last_refreshed_at: datetime | None
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Connection:
        return cls(
            id=str(body["id"]),
            end_user_id=body.get("end_user_id"),
            pinterest_user_id=str(body["pinterest_user_id"]),
            username=str(body["username"]),
            scopes=[str(scope) for scope in body["scopes"]],
            status=str(body["status"]),
            created_at=_when(body["created_at"]),
            updated_at=_when(body["updated_at"]),
            last_refreshed_at=_maybe_when(body.get("last_refreshed_at")),
            access_token_expires_at=_when(body["access_token_expires_at"]),
            refresh_token_expires_at=_maybe_when(body.get("refresh_token_expires_at")),
        )


@dataclass(frozen=True, slots=True)
class ProxyToken:
    """A credential for one connection on pinauth's proxy only, until `expires_at`.

    Hand it to code that should call Pinterest for this one connection and nothing
    else (the official SDK, a worker): `Authorization: Bearer <token>` on
    `<pinauth>/pinterest/...`. `id` names it to revoke it (`revoke_proxy_token`).
    """

    token: str
    expires_at: datetime
    connection_id: str
    id: str

    def __repr__(self) -> str:
        return (
            f"ProxyToken(id={self.id!r}, token=<hidden>, expires_at={self.expires_at!r}, "
            f"connection_id={self.connection_id!r})"
        )


# --- the client ---------------------------------------------------------------------


class PinauthClient:
    """An async client for pinauth's backend API, authenticated by an API key.

    `base_url` is where pinauth is served (e.g. "https://pinauth.example.com");
    `api_key` one from `pinauth api-keys create`. Pass `http` to share an
    `httpx.AsyncClient` (its connection pool, proxies, event hooks); the client then
    leaves closing it to you. `timeout` (seconds or an `httpx.Timeout`) bounds each call;
    by default 30 s, or the shared client's own timeout when `http` is given.

    Use it as an async context manager, or call `aclose()` when done.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if not api_key or not api_key.strip():
            raise ValueError("api_key is empty: create one with `pinauth api-keys create`")
        if not _HEADER_VALUE.fullmatch(api_key.strip()):
            raise ValueError("api_key has characters no HTTP header can carry")
        self.base_url = str(url).rstrip("/")
        self._api_key = api_key.strip()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=DEFAULT_TIMEOUT_SECONDS)
        # None: the shared client's own timeout (ours has the default).
        self._timeout = None if timeout is None else httpx.Timeout(timeout)
        self._headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Accept": "application/json",
            "User-Agent": f"pinauth-client/{__version__} python-httpx",
        }

    def __repr__(self) -> str:
        return f"PinauthClient({self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client, if this client made it."""
        if self._owns_http:
            await self._http.aclose()

    # --- connect sessions and connections -------------------------------------------

    async def create_connect_session(
        self, end_user_id: str, *, return_to: str | None = None
    ) -> ConnectSession:
        """Mint a connect session that links a Pinterest account to `end_user_id`.

        Send the end user's browser to the result's `connect_url`; after consent it lands
        on `return_to` (a relative path or an allowed origin; default pinauth's
        PINAUTH_FRONTEND_URL) with `?pinauth_connect_result=…`, which counts only once
        `confirm_connection` presents it for the end user logged in to your app there.
        Connecting the same account again renews the connection, once confirmed.
        """
        body: dict[str, Any] = {"end_user_id": end_user_id}
        if return_to is not None:
            body["return_to"] = return_to
        response = await self._send("POST", "/v1/connect-sessions", json=body)
        return ConnectSession.from_json(self._json(response))

    async def confirm_connection(self, result: str, end_user_id: str) -> Connection:
        """Confirm a connect session's login: `result` is the `pinauth_connect_result` the
        browser came back with, `end_user_id` the user logged in to your app in it.

        Returns the connection, now active. ConnectResultMismatchError if the connect
        session was minted for another end user (whoever completed the link is not your
        logged-in user: nothing is linked); InvalidConnectResultError for an unknown,
        used or expired result.
        """
        response = await self._send(
            "POST",
            "/v1/connections/confirm",
            json={"result": result, "end_user_id": end_user_id},
        )
        return Connection.from_json(self._json(response))

    async def connections(
        self,
        end_user_id: str | None = None,
        *,
        status: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[Connection]:
        """Every connection, oldest first (optionally one end user's, or in one status),
        fetching pages of `page_size` as the iteration needs them."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}")
        params: dict[str, str | int] = {"limit": page_size}
        if end_user_id is not None:
            params["end_user_id"] = end_user_id
        if status is not None:
            params["status"] = status
        while True:
            response = await self._send("GET", "/v1/connections", params=params)
            page = self._json(response)
            for item in page["items"]:
                yield Connection.from_json(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return
            params["cursor"] = cursor

    async def get_connection(self, connection_id: str) -> Connection:
        """One connection; ConnectionNotFoundError if there is none with this id."""
        response = await self._send("GET", f"/v1/connections/{_checked_id(connection_id)}")
        return Connection.from_json(self._json(response))

    async def delete_connection(self, connection_id: str) -> None:
        """Delete the connection's tokens and end its browser sessions."""
        await self._send("DELETE", f"/v1/connections/{_checked_id(connection_id)}")

    async def create_proxy_token(self, connection_id: str, ttl_seconds: int = 3600) -> ProxyToken:
        """A proxy token for `connection_id`, valid for `ttl_seconds` (at most 86400)."""
        response = await self._send(
            "POST",
            f"/v1/connections/{_checked_id(connection_id)}/proxy-tokens",
            json={"ttl_seconds": ttl_seconds},
        )
        body = self._json(response)
        return ProxyToken(
            token=str(body["token"]),
            expires_at=_when(body["expires_at"]),
            connection_id=connection_id,
            id=str(body["id"]),
        )

    async def revoke_proxy_token(self, connection_id: str, token_id: str) -> None:
        """Revoke the connection's proxy token `token_id` (a `ProxyToken.id`): refused
        at once by the pinauth process that answers, by every other within its
        PINAUTH_CACHE_TTL. ProxyTokenNotFoundError if the connection has no such token."""
        path = f"/v1/connections/{_checked_id(connection_id)}/proxy-tokens"
        await self._send("DELETE", f"{path}/{_checked_token_id(token_id)}")

    async def revoke_proxy_tokens(self, connection_id: str) -> None:
        """Revoke every proxy token of the connection (the connection itself stays)."""
        await self._send("DELETE", f"/v1/connections/{_checked_id(connection_id)}/proxy-tokens")

    # --- Pinterest, through pinauth -------------------------------------------------

    @property
    def pinterest_url(self) -> str:
        """Pinterest API v5 as pinauth serves it: `<base_url>/pinterest`."""
        return f"{self.base_url}/pinterest"

    async def request(
        self,
        connection_id: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Call Pinterest API v5 for one connection, through pinauth's proxy.

        `path` is Pinterest's, after /v5 (e.g. "/boards", "/pins/123"). Returns the
        successful response (`.json()` is Pinterest's body); raises PinterestAPIError
        (or RateLimitError) for Pinterest's errors, a redirect included, and
        PinauthAPIError for pinauth's. `headers` may not set `Authorization` or
        `Pinauth-Connection-Id`: the client sends its own.
        """
        extra = {
            **_checked_headers(headers or {}),
            CONNECTION_ID_HEADER: _checked_id(connection_id),
        }
        if method.upper() not in PROXY_METHODS:
            raise ValueError(f"method must be one of {', '.join(PROXY_METHODS)}, not {method!r}")
        return await self._send(
            method.upper(),
            _pinterest_path(path),
            json=json,
            params=params,
            headers=extra,
        )

    async def sdk_client(self, connection_id: str, ttl_seconds: int = 3600) -> PinterestSDKClient:
        """The official Pinterest SDK's client, acting for one connection through pinauth.

        Mints a proxy token (valid `ttl_seconds`) and points the SDK at
        `<base_url>/pinterest`: the SDK works unchanged, and never sees a Pinterest
        token. Mint a new client when the token expires. Needs `pinauth[sdk]`.
        The SDK is synchronous: from async code, run its calls in a thread
        (`await asyncio.to_thread(Board.get_all, client=sdk)`).
        """
        sdk = _import_sdk()  # before minting: a missing extra should cost no token
        token = await self.create_proxy_token(connection_id, ttl_seconds)
        return sdk.client_for(token.token, self.pinterest_url)

    # --- plumbing -------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        request_headers = self._headers if headers is None else {**self._headers, **headers}
        try:
            request = self._http.build_request(
                method, self.base_url + path, json=json, params=params, headers=request_headers
            )
            if self._timeout is not None:
                request.extensions["timeout"] = self._timeout.as_dict()
            response = await self._http.send(request)
        except httpx.InvalidURL as e:
            raise ValueError(f"cannot make a URL of path {path!r}: {e}") from e
        except httpx.TimeoutException as e:
            raise PinauthTimeoutError(
                f"pinauth at {self.base_url} did not answer {method} {path} in time"
            ) from e
        except httpx.HTTPError as e:
            raise PinauthTransportError(
                f"could not reach pinauth at {self.base_url} ({method} {path}): "
                f"{type(e).__name__}: {e}"
            ) from e
        if response.status_code >= 400:
            raise error_for(response)
        if response.status_code >= 300:
            raise _redirect_error(response, pinterest=path.startswith("/pinterest/"))
        return response

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as e:
            raise UnexpectedResponseError(
                f"expected JSON from pinauth, got {response.headers.get('content-type')!r} "
                f"(is base_url pinauth?): {response.text[:_QUOTED_BODY_CHARS]!r}",
                response,
            ) from e
        if not isinstance(body, dict):
            raise UnexpectedResponseError("expected a JSON object from pinauth", response)
        return body


def _pinterest_path(path: str) -> str:
    """Pinterest's `path` under pinauth's /pinterest, refusing dot segments.

    httpx resolves `..` before sending, so "/boards/../../v1/connections/…" (a board id
    taken from user input, say) would leave the proxy and call /v1 with the API key.
    """
    for segment in path.split("?", 1)[0].split("/"):
        if unquote(segment) in (".", ".."):
            raise ValueError(f"path must not contain '.' or '..' segments: {path!r}")
    return "/pinterest/" + path.lstrip("/")


def _checked_id(connection_id: str) -> str:
    """`connection_id` if it can be one of pinauth's, which also keeps it one path segment
    (`/`, `.` or `..` would reach another route) and a valid header value."""
    if not connection_id:
        raise ValueError("connection_id is empty")
    if not _CONNECTION_ID.fullmatch(connection_id):
        message = f"No connection has the id {connection_id[:60]!r}: ids look like 'conn_…'."
        body = {"error": "connection_not_found", "message": message}
        raise ConnectionNotFoundError(httpx.Response(404, json=body), body)
    return connection_id


def _checked_token_id(token_id: str) -> str:
    """`token_id` if it can be one of pinauth's proxy token ids (so also one path segment)."""
    if not _PROXY_TOKEN_ID.fullmatch(token_id):
        message = f"No proxy token has the id {token_id[:60]!r}: ids look like 'pt_…'."
        body = {"error": "proxy_token_not_found", "message": message}
        raise ProxyTokenNotFoundError(httpx.Response(404, json=body), body)
    return token_id


def _checked_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    for name, value in headers.items():
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(
                f"headers must not set {name!r}: the client sends its own API key and "
                "connection id, and a call acts only for the connection_id it is given"
            )
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            # The value itself stays out of the message: it may be a secret.
            raise ValueError(
                f"header {name!r} has an invalid value: use visible ASCII, spaces and tabs"
            )
    return headers


def _redirect_error(response: httpx.Response, *, pinterest: bool) -> PinauthClientError:
    status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if pinterest:
        try:
            body = response.json()
        except ValueError:
            body = None
        message = f"Pinterest answered a redirect ({status}); the client follows none"
        return PinterestAPIError(response, body if isinstance(body, dict) else None, message)
    location = response.headers.get("location")
    to = f" to {location}" if location else ""
    return UnexpectedResponseError(
        f"expected pinauth's answer, got a redirect ({status}){to}: is base_url right?",
        response,
    )


class _Sdk:
    """The official SDK's two classes this module uses, imported on first use."""

    def __init__(self) -> None:
        # The SDK ships no type information.
        from openapi_generated.pinterest_client.configuration import (  # type: ignore[import-untyped]
            Configuration,
        )
        from pinterest import config  # type: ignore[import-untyped]
        from pinterest.client import PinterestSDKClient

        self._configuration = Configuration
        self._config = config
        self._client = PinterestSDKClient

    def client_for(self, access_token: str, host: str) -> PinterestSDKClient:
        # What PinterestSDKClient.create_client_with_token() builds, with the host set:
        # its own reads PINTEREST_API_URI once, at import.
        configuration = self._configuration(access_token=access_token, host=host)
        configuration.debug = self._config.PINTEREST_DEBUG
        configuration.logger_file = self._config.PINTEREST_LOG_FILE
        configuration.logger_format = self._config.PINTEREST_LOGGER_FORMAT
        configuration.disabled_client_side_validations = (
            self._config.PINTEREST_DISABLED_CLIENT_SIDE_VALIDATIONS
        )
        return self._client(configuration=configuration)


def _import_sdk() -> _Sdk:
    try:
        return _Sdk()
    except ImportError as e:
        raise ImportError(
            "PinauthClient.sdk_client() needs the official Pinterest SDK: "
            "pip install 'pinauth[sdk]' (or pinterest-api-sdk)"
        ) from e
