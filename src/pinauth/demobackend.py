"""The demo's backend half: what an app's server does with pinauth, shown exchange by exchange.

In demo mode the demo page plays the app's frontend; this plays its backend. It is a
real client of pinauth's public API, `pinauth.client` over loopback HTTP with an API key
of its own, exactly as a separate backend process would be, so every exchange the page
shows is one that really crossed the wire (method, URL, headers that matter, bodies).
Calling the services in-process would be cheaper but would show nothing true.

The API key is made when the demo starts and revoked when it stops; an exchange shows
only its first characters, as `pinauth api-keys list` does, so that the page never holds
a key that could call pinauth's /v1 API. The connect session and the proxy tokens, short-
lived and bound to one end user or connection, are shown whole; Pinterest's tokens never
leave pinauth, so no exchange can contain one.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import httpx

from pinauth.apikeys import ApiKeyService
from pinauth.client import (
    APIError,
    Connection,
    ConnectSession,
    PinauthAPIError,
    PinauthClient,
    PinauthClientError,
    PinauthTransportError,
    PinterestAPIError,
    error_for,
)
from pinauth.redact import redact_credentials

T = TypeVar("T")
V = TypeVar("V")


class Caller(Protocol):
    """A call to Pinterest (through pinauth) for one connection, however authenticated."""

    def __call__(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Awaitable[httpx.Response]: ...


log = logging.getLogger(__name__)

# Headers an exchange shows: the ones that say who is calling, for whom, and what came back.
SHOWN_REQUEST_HEADERS = ("authorization", "pinauth-connection-id", "content-type")
SHOWN_RESPONSE_HEADERS = ("content-type", "location", "retry-after", "x-request-id")
# A page needs no more of a body than this to make the point.
MAX_SHOWN_BODY = 4_000
DEMO_IMAGE_URL = "https://i.pinimg.com/originals/pinauth-demo.jpg"
PROXY_TOKEN_TTL_SECONDS = 600

_TRANSCRIPT: ContextVar[list[Exchange] | None] = ContextVar("demo_transcript", default=None)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP request the backend made and the answer it got."""

    method: str
    url: str
    request_headers: dict[str, str]
    request_body: str | None
    status: int
    response_headers: dict[str, str]
    response_body: str | None


def _shown_body(content: bytes) -> str | None:
    if not content:
        return None
    text = redact_credentials(content.decode("utf-8", errors="replace"))
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    if len(text) > MAX_SHOWN_BODY:
        return text[:MAX_SHOWN_BODY] + f"\n… ({len(text) - MAX_SHOWN_BODY} more characters)"
    return text


async def _record(response: httpx.Response) -> None:
    """httpx response hook: note the exchange in the transcript of the demo request."""
    transcript = _TRANSCRIPT.get()
    if transcript is None:
        return
    await response.aread()
    request = response.request
    transcript.append(
        Exchange(
            method=request.method,
            url=redact_credentials(str(request.url)),
            request_headers={
                k: redact_credentials(request.headers[k])
                for k in SHOWN_REQUEST_HEADERS
                if k in request.headers
            },
            request_body=_shown_body(request.content),
            status=response.status_code,
            response_headers={
                k: redact_credentials(response.headers[k])
                for k in SHOWN_RESPONSE_HEADERS
                if k in response.headers
            },
            response_body=_shown_body(response.content),
        )
    )


class DemoBackendFailed(Exception):
    """A step failed; `status`, `code` and `message` say how, `exchanges` what was sent."""

    def __init__(self, status: int, code: str, message: str, exchanges: list[Exchange]) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.exchanges = status, code, message, exchanges

    def body(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "exchanges": [asdict(e) for e in self.exchanges],
        }


class DemoBackend:
    """The app's backend for the demo page; `start()` and `aclose()` bracket its life."""

    def __init__(self, pinauth_url: str) -> None:
        self.pinauth_url = pinauth_url.rstrip("/")
        self._api_keys: ApiKeyService | None = None
        self._key_name: str | None = None
        self._http: httpx.AsyncClient | None = None
        self._client: PinauthClient | None = None

    async def start(self, api_keys: ApiKeyService) -> None:
        """Create this run's API key and the one HTTP client every step shares."""
        self._key_name = f"demo-backend-{secrets.token_hex(4)}"
        created = await api_keys.create(self._key_name)
        self._api_keys = api_keys
        self._http = httpx.AsyncClient(timeout=30, event_hooks={"response": [_record]})
        self._client = PinauthClient(self.pinauth_url, created.key, http=self._http)
        log.info("demo backend ready with API key %r", self._key_name)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._api_keys is not None and self._key_name is not None:
            try:
                await self._api_keys.revoke(self._key_name)
            except Exception as e:  # shutting down: the key is the demo database's only
                log.warning("could not revoke the demo backend's API key: %s", e)

    async def mint_connect_session(
        self, end_user_id: str, return_to: str
    ) -> tuple[ConnectSession, list[Exchange]]:
        return await self._run(
            lambda client: client.create_connect_session(end_user_id, return_to=return_to)
        )

    async def confirm(self, result: str, end_user_id: str) -> tuple[Connection, list[Exchange]]:
        """Confirm a connect session's login for the end user logged in to the app."""
        return await self._run(lambda client: client.confirm_connection(result, end_user_id))

    async def connections(self, end_user_id: str) -> tuple[list[Connection], list[Exchange]]:
        async def step(client: PinauthClient) -> list[Connection]:
            return [c async for c in client.connections(end_user_id=end_user_id)]

        return await self._run(step)

    async def post_pin(
        self, connection_id: str, title: str, *, with_proxy_token: bool
    ) -> tuple[dict[str, Any], list[Exchange]]:
        """Post a pin for the connection: with the API key and Pinauth-Connection-Id (the
        server route), or with a proxy token minted for it."""

        async def step(client: PinauthClient) -> dict[str, Any]:
            call = (
                await self._proxy_token_caller(client, connection_id)
                if with_proxy_token
                else functools.partial(client.request, connection_id)
            )
            how = "with a proxy token" if with_proxy_token else "with its API key"
            boards = (await call("GET", "/boards", params={"page_size": 1})).json()
            if boards.get("items"):
                board_id = str(boards["items"][0]["id"])
            else:  # an account without boards gets one
                board = {"name": "From the demo's backend", "privacy": "PUBLIC"}
                board_id = str((await call("POST", "/boards", json=board)).json()["id"])
            pin = {
                "board_id": board_id,
                "title": title,
                "description": f"Posted by the demo's backend {how}.",
                "media_source": {"source_type": "image_url", "url": DEMO_IMAGE_URL},
            }
            created: dict[str, Any] = (await call("POST", "/pins", json=pin)).json()
            return created

        return await self._run(step)

    async def _proxy_token_caller(self, client: PinauthClient, connection_id: str) -> Caller:
        """Mint a proxy token with the API key, then call with it alone, as any HTTP client
        handed it would (the official SDK, a worker): `Authorization: Bearer <token>`."""
        minted = await client.create_proxy_token(connection_id, PROXY_TOKEN_TTL_SECONDS)
        http = self._require(self._http)
        headers = {"Authorization": f"Bearer {minted.token}", "Accept": "application/json"}

        async def call(
            method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
        ) -> httpx.Response:
            try:
                response = await http.request(
                    method, client.pinterest_url + path, json=json, params=params, headers=headers
                )
            except httpx.HTTPError as e:
                raise PinauthTransportError(f"could not reach pinauth: {e}") from e
            if response.status_code >= 400:
                raise error_for(response)
            return response

        return call

    async def _run(self, step: Callable[[PinauthClient], Awaitable[T]]) -> tuple[T, list[Exchange]]:
        """One step of the demo: its result and every exchange it made; DemoBackendFailed
        (with the exchanges so far) if pinauth or Pinterest said no."""
        client = self._require(self._client)
        transcript: list[Exchange] = []
        token = _TRANSCRIPT.set(transcript)
        try:
            return await step(client), transcript
        except PinauthAPIError as e:
            raise DemoBackendFailed(e.status_code, e.error, e.message, transcript) from e
        except PinterestAPIError as e:
            code = "" if e.code is None else f" (code {e.code})"  # None: a redirect
            message = f"Pinterest says: {e.message}{code}"
            raise DemoBackendFailed(e.status_code, "pinterest_error", message, transcript) from e
        except APIError as e:
            raise DemoBackendFailed(502, "upstream_error", str(e), transcript) from e
        except PinauthClientError as e:
            raise DemoBackendFailed(502, "demo_backend_error", str(e), transcript) from e
        finally:
            _TRANSCRIPT.reset(token)

    @staticmethod
    def _require(value: V | None) -> V:
        if value is None:
            raise RuntimeError("the demo backend has not started")
        return value
