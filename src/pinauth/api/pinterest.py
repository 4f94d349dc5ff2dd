"""/pinterest/{path} and /boards: Pinterest's API with the session's token added."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from pinauth.api.deps import Caller, Services, ServicesDep, get_acting_connection
from pinauth.api.responses import client_disconnected_response, error_response
from pinauth.api.schemas import API_KEY_OR_COOKIE, BoardsPage, error_responses
from pinauth.errors import (
    AmbiguousSession,
    Busy,
    ConnectionIdAmbiguous,
    ConnectionIdRequired,
    ConnectionNotFound,
    DatabaseUnavailable,
    ForbiddenOrigin,
    InvalidApiKey,
    InvalidProxyToken,
    NotAuthenticated,
    PayloadTooLarge,
    PinauthError,
    PinterestClientRejected,
    ProxyTokenConnectionMismatch,
    ReauthorizationRequired,
    UnprocessableRequest,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pinauth.models import Connection
from pinauth.numbers import ascii_int
from pinauth.outage import OutageTracker
from pinauth.pinterest import headers
from pinauth.pinterest.client import UpstreamRequest
from pinauth.pinterest.paths import InvalidPath, confine
from pinauth.proxy import BodyReservation
from pinauth.security_headers import LOCKED_DOWN_CSP

router = APIRouter(tags=["pinterest"])

CONNECT_SESSIONS_PATH = "/v1/connect-sessions"
ActingConnection = Annotated[tuple[Connection, Caller], Depends(get_acting_connection)]

PROXY_PREFIX = "/pinterest/"


def _raw_path(request: Request) -> str:
    """The path after /pinterest/ exactly as the client encoded it.

    The router's `path` parameter is already percent-decoded (`..%2f` has become `../`),
    so confinement has to look at the raw bytes.
    """
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    # Some ASGI clients put the query string in raw_path; it is not part of the path.
    path = raw.split(b"?", 1)[0].decode("latin-1")
    prefix = request.scope.get("root_path", "") + PROXY_PREFIX
    if not path.startswith(prefix):
        raise InvalidPath()
    return path[len(prefix) :]


async def _read_body(request: Request, limit: int, reservation: BodyReservation) -> bytes:
    """The whole body, its bytes reserved in the process's in-flight budget before they
    are read: a declared length all at once (413 or 503 busy without reading a byte), a
    chunked body chunk by chunk."""
    declared = request.headers.get("content-length")
    if declared is None and "transfer-encoding" not in request.headers:
        return b""  # HTTP/1.1: a request without either header has no body
    size = None if declared is None else ascii_int(declared)
    if size is not None:
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        reservation.grow(size)  # the server delivers no more than the declared length
    if size is not None and size > _ONE_BUFFER_BYTES:
        return await _read_into_one_buffer(request, size)
    # One growing buffer, not a list of chunks joined at the end: the chunks would be many
    # small blocks on the heap (fragmenting it under concurrent uploads) and the join a
    # second full copy beside them; a buffer past 1 MiB has pages of its own that grow in
    # place (map_large_allocations).
    buffer = bytearray()
    async for chunk in request.stream():
        if len(buffer) + len(chunk) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        if size is None:
            reservation.grow(len(chunk))
        buffer += chunk
    return bytes(buffer)


# A declared body larger than this is read into one buffer of its size as it arrives.
_ONE_BUFFER_BYTES = 256 * 1024


async def _read_into_one_buffer(request: Request, size: int) -> bytes:
    buffer = bytearray(size)
    received = 0
    async for chunk in request.stream():
        buffer[received : received + len(chunk)] = chunk
        received += len(chunk)
    del buffer[received:]
    return bytes(buffer)


def _relay(upstream: httpx.Response) -> Response:
    response = Response(content=upstream.content, status_code=upstream.status_code)
    # raw_headers, not a dict: repeated headers (Link, …) must all come back.
    response.raw_headers.extend(headers.response_headers(upstream.headers.raw))
    # Whatever Pinterest's body is (text/html included), it must not act as a page of
    # pinauth's origin; set here, after upstream's headers, so it holds whatever they say.
    response.raw_headers.append(LOCKED_DOWN_CSP)
    return response


async def proxy(request: Request) -> Response:
    """Call any Pinterest v5 endpoint as the session's user; the response passes through."""
    # The one hot route takes only `request`: FastAPI's per-parameter dependency
    # resolution was the largest single cost of a proxied call (see bench/).
    connection, caller = await get_acting_connection(request)
    services: Services = request.state.services
    # Held until Pinterest has answered: the body stays in memory that long.
    reservation = services.bodies.reservation()
    try:
        upstream = UpstreamRequest(
            method=request.method,
            path=confine(_raw_path(request)),
            query=request.scope.get("query_string", b""),
            headers=headers.request_headers(request.headers.items()),
            body=await _read_body(request, services.settings.max_body_bytes, reservation),
        )
        with _reconnect_hint(connection, caller):
            return _relay(await services.proxy.call(connection, upstream))
    finally:
        reservation.release()


@contextmanager
def _reconnect_hint(connection: Connection, caller: Caller) -> Iterator[None]:
    """Errors in the caller's terms: a backend learns how to let its end user reconnect
    (a new connect session), and that a connection deleted meanwhile is gone (404); a
    proxy token, that it died with its connection (401 invalid_proxy_token)."""
    try:
        yield
    except ReauthorizationRequired as e:
        # Only the API key can mint a connect session; a proxy token's holder, which acts
        # for this one connection and nothing else, is told no more about its end user.
        if caller is Caller.API_KEY:
            e.extra["connect_session_url"] = CONNECT_SESSIONS_PATH
            e.extra["end_user_id"] = connection.end_user_id
        raise
    except NotAuthenticated as e:
        # Deleted since this process cached it (on another replica, say), found out when
        # a refresh looked for its row: not an authentication problem for a backend
        # naming it, and the end of a proxy token, which dies with its connection.
        if caller is Caller.API_KEY:
            raise ConnectionNotFound() from e
        if caller is Caller.PROXY_TOKEN:
            raise InvalidProxyToken() from e
        raise


_PATH_PARAMETER = {
    "name": "path",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A Pinterest v5 path such as `boards` or `boards/<board_id>/pins`; "
    "the query string and body pass through unchanged.",
}

_CONNECTION_ID_PARAMETER = {
    "name": "Pinauth-Connection-Id",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "With an API key: the connection to act for. Browsers send none; with a "
    "proxy token it may only name the token's own connection (else 403).",
}

PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# Errors of every call made for a connection (proxy and /boards).
_CALL_ERRORS: tuple[type[PinauthError], ...] = (
    InvalidApiKey,
    InvalidProxyToken,
    ProxyTokenConnectionMismatch,
    ConnectionIdRequired,
    ConnectionIdAmbiguous,
    NotAuthenticated,
    AmbiguousSession,
    ReauthorizationRequired,
    ConnectionNotFound,
    UpstreamError,
    UpstreamUnavailable,
    PinterestClientRejected,
    UpstreamTimeout,
    DatabaseUnavailable,
)
# Statuses Pinterest itself answers with its {code, message} body, relayed unchanged; 429
# may also come from pinauth holding calls back on Pinterest's behalf (governor.py).
_PINTEREST_ERRORS = (400, 401, 403, 404, 409, 429)
_PINTEREST_DEFAULT: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": "Any other status Pinterest answers, passed through unchanged.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PinterestErrorResponse"}}
        },
    }
}
_PROXY_BODY = {
    "required": False,
    "description": "Passed to Pinterest unchanged (at most PINAUTH_MAX_BODY_BYTES).",
    "content": {
        "application/json": {
            "schema": {"type": "object", "additionalProperties": True},
            "example": {"name": "Recipes", "privacy": "PUBLIC"},
        }
    },
}
_PROXY_SUCCESS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Pinterest's response, passed through unchanged."},
    201: {"description": "Pinterest created something; its response, passed through."},
    204: {"description": "Pinterest's empty success (deletions), passed through."},
}


def _proxy_errors(method: str) -> dict[int | str, dict[str, Any]]:
    # Origin is checked only on methods that can change something (deps.SAFE_METHODS).
    origin = () if method == "GET" else (ForbiddenOrigin,)
    return error_responses(
        *_CALL_ERRORS,
        *origin,
        InvalidPath,
        PayloadTooLarge,
        Busy,
        pinterest=_PINTEREST_ERRORS,
    )


# One route per method, so each gets its own OpenAPI operation.
for _method in PROXY_METHODS:
    router.add_api_route(
        "/pinterest/{path:path}",
        proxy,
        methods=[_method],
        name=f"proxy_{_method.lower()}",
        operation_id=f"proxy_{_method.lower()}",
        summary=f"{_method} a Pinterest v5 endpoint",
        openapi_extra={
            "parameters": [_PATH_PARAMETER, _CONNECTION_ID_PARAMETER],
            # A browser's session cookie, or the app backend's API key or proxy token.
            "security": API_KEY_OR_COOKIE,
            **({"requestBody": _PROXY_BODY} if _method in ("POST", "PUT", "PATCH") else {}),
        },
        responses={**_PROXY_SUCCESS, **_proxy_errors(_method), **_PINTEREST_DEFAULT},
    )


def proxy_route(method: str) -> BaseRoute:
    """The proxy's APIRoute for `method`, found by name (see ProxyFastPath)."""
    name = f"proxy_{method.lower()}"
    for route in router.routes:
        if getattr(route, "name", None) == name:
            return route
    raise LookupError(name)


@router.get(
    "/boards",
    response_model=BoardsPage,
    responses={
        200: {"description": "The user's boards, as Pinterest lists them."},
        **error_responses(*_CALL_ERRORS, UnprocessableRequest, pinterest=_PINTEREST_ERRORS),
    },
    openapi_extra={
        "parameters": [_CONNECTION_ID_PARAMETER],
        "security": API_KEY_OR_COOKIE,
    },
)
async def boards(
    services: ServicesDep,
    acting: ActingConnection,
    page_size: Annotated[int | None, Query(ge=1, le=250)] = None,
    bookmark: Annotated[str | None, Query(max_length=2048)] = None,
    all_pages: Annotated[
        bool,
        Query(alias="all", description="Follow bookmarks (up to a bound) and return every board."),
    ] = False,
) -> Response:
    """The user's boards (`items`, `bookmark`); `all=true` follows the bookmarks."""
    connection, caller = acting
    with _reconnect_hint(connection, caller):
        return await _boards(services, connection, page_size, bookmark, all_pages)


async def _boards(
    services: Services,
    connection: Connection,
    page_size: int | None,
    bookmark: str | None,
    all_pages: bool,
) -> Response:
    items: list[Any] = []
    for _ in range(services.settings.boards_max_pages if all_pages else 1):
        params = {"page_size": page_size, "bookmark": bookmark}
        query = httpx.QueryParams({k: v for k, v in params.items() if v is not None})
        upstream = await services.proxy.call(
            connection, UpstreamRequest("GET", "boards", query=str(query).encode())
        )
        if upstream.status_code != 200:
            return _relay(upstream)  # Pinterest's own error, unchanged
        try:
            page = BoardsPage.model_validate_json(upstream.content)
        except ValueError:
            return _relay(upstream)
        items.extend(page.items)
        bookmark = page.bookmark
        if not bookmark:
            break
    return JSONResponse(
        BoardsPage(items=items, bookmark=bookmark).model_dump(mode="json"),
        headers={"cache-control": "no-store"},
    )


def is_proxy_request(scope: Scope) -> bool:
    """Whether ProxyFastPath serves this request (the same test wherever it is asked)."""
    return (
        scope["type"] == "http"
        and scope["method"] in PROXY_METHODS
        and scope["path"].startswith(PROXY_PREFIX)
    )


class ProxyFastPath:
    """Serves /pinterest/{path} ahead of FastAPI's per-request machinery.

    The proxy endpoint takes nothing but the request and renders its own errors, so
    the exception middlewares, router and dependency resolution FastAPI runs for
    every request add nothing here but time: about a third of a proxied call's CPU,
    measured with `make bench` (2,173 -> 2,934 req/s). Same endpoint, same errors.
    """

    def __init__(self, app: ASGIApp, *, route: BaseRoute, outage: OutageTracker) -> None:
        self.app = app
        self.route = route  # labels metrics and logs like the APIRoute would
        self.outage = outage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_proxy_request(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        response: Response
        try:
            response = await proxy(Request(scope, receive))
        except DatabaseUnavailable as e:
            self.outage.refused()
            response = error_response(e)
        except PinauthError as e:
            response = error_response(e)
        except ClientDisconnect:
            response = client_disconnected_response()
        await response(scope, receive, send)
