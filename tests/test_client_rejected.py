"""Pinterest refusing the app's own client credentials kills no connection (issue 19, 1).

A wrong PINTEREST_CLIENT_SECRET makes the token endpoint answer 401 to every refresh,
whatever the refresh token: no connection may change state and no webhook may go out.
Only a refused grant (400: the refresh token spent, revoked or expired) marks its one
connection. Pinterest is mocked at the edge (respx); time is a clock the test moves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
import respx
from fastapi import FastAPI

from pinauth.app import create_app
from pinauth.clientstate import CLIENT_REJECTED_COOLDOWN
from pinauth.errors import PinterestClientRejected
from pinauth.models import ConnectionStatus
from pinauth.observability import Metrics
from pinauth.pinterest.http import create_http_client
from pinauth.pinterest.oauth import PinterestOAuth, TokenRejected
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    ManualClock,
    RotatingTokenEndpoint,
    SimClock,
    captured_logs,
    create_api_key,
    events,
    outbox_types,
    replica,
    seed_connections,
    serve_app,
    stored_connections,
)

AUTHENTICATION_FAILED = {"code": 2, "message": "Authentication failed."}
BOARDS: dict[str, object] = {"items": [], "bookmark": None}
STARTED = "refuses this app's client credentials"
ENDED = "accepts this app's client credentials again"


class TokenEndpoint(RotatingTokenEndpoint):
    """The strict rotating token endpoint, which can also refuse the app's credentials
    (401, code 2, before it looks at the grant), as Pinterest does for a wrong secret."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_client = False
        self.refused = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.refuse_client:
            self.calls += 1
            self.refused += 1
            return httpx.Response(401, json=AUTHENTICATION_FAILED)
        return await super().__call__(request)


@pytest.fixture
def endpoint(pinterest: respx.MockRouter) -> TokenEndpoint:
    fake = TokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=fake)
    return fake


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app(settings: Settings, pinterest: respx.MockRouter, clock: ManualClock) -> FastAPI:
    return create_app(settings, transport=httpx.MockTransport(pinterest.async_handler), clock=clock)


@dataclass
class Backend:
    client: httpx.AsyncClient
    key: str

    async def boards(self, connection_id: str) -> httpx.Response:
        return await self.client.get(
            "/pinterest/boards",
            headers={"Authorization": f"Bearer {self.key}", "Pinauth-Connection-Id": connection_id},
        )


@pytest.fixture
async def backend(app: FastAPI, settings: Settings) -> AsyncIterator[Backend]:
    key = await create_api_key(settings)
    async with serve_app(app) as client:
        yield Backend(client, key)


async def seed_expired(settings: Settings, endpoint: TokenEndpoint, count: int) -> list[str]:
    """Connections whose access tokens have expired: every call needs a refresh first."""
    return await seed_connections(
        settings,
        endpoint,
        count,
        refresh_expires_in=timedelta(days=50),
        access_expires_in=timedelta(minutes=-1),
    )


async def statuses(settings: Settings) -> dict[str, str]:
    return {k: str(v["status"]) for k, v in (await stored_connections(settings)).items()}


async def test_a_refused_client_marks_nothing_and_answers_503_until_the_credentials_work(
    backend: Backend,
    pinterest: respx.MockRouter,
    settings: Settings,
    endpoint: TokenEndpoint,
    clock: ManualClock,
) -> None:
    """Guards the app-wide state: a 401 from the token endpoint marks no connection and
    records no event; calls that need a refresh get 503 pinterest_client_rejected with
    Retry-After, without a token call each (one try per cooldown); /readyz says so; one
    error line when it starts, one when it ends; with the credentials working again every
    connection refreshes and serves."""
    ids = await seed_expired(settings, endpoint, 4)
    before = await stored_connections(settings)
    pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.refuse_client = True

    with captured_logs() as logs:
        first = [await backend.boards(conn) for conn in ids]
        readiness = await backend.client.get("/readyz")
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        probe = await backend.boards(ids[0])  # the one try of this cooldown: refused again
        held = await backend.boards(ids[1])
        assert endpoint.refused == 2

        endpoint.refuse_client = False
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        recovered = [await backend.boards(conn) for conn in ids]
        ready = await backend.client.get("/readyz")

    for response in [*first, probe, held]:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "pinterest_client_rejected"
        assert 1 <= int(response.headers["retry-after"]) <= CLIENT_REJECTED_COOLDOWN
    assert first[0].headers["retry-after"] == str(int(CLIENT_REJECTED_COOLDOWN))
    assert readiness.status_code == 200
    assert readiness.json()["status"] == "degraded"
    assert readiness.json()["error"] == "pinterest_client_rejected"
    assert [r.status_code for r in recovered] == [200] * 4
    assert ready.json() == {"status": "ready"}
    # Nothing was marked or reported, and no refresh token was spent while refused.
    assert await outbox_types(settings) == []
    after = await stored_connections(settings)
    assert {k: v["status"] for k, v in after.items()} == dict.fromkeys(ids, "active")
    assert endpoint.reused == []
    assert sorted(endpoint.spent) == sorted(str(before[conn]["refresh"]) for conn in ids)
    started, ended = events(logs, STARTED), events(logs, ENDED)
    assert len(started) == 1
    assert len(ended) == 1
    assert started[0]["level"] == ended[0]["level"] == "error"
    # 2 tries refused by Pinterest, 4 calls refused without one.
    assert "6 token refreshes were refused" in ended[0]["event"]


async def test_a_current_access_token_is_still_used_while_the_client_is_refused(
    backend: Backend, pinterest: respx.MockRouter, settings: Settings, endpoint: TokenEndpoint
) -> None:
    """Guards the fallback: a call whose token is due for refresh but not yet expired
    goes on with it; only calls that truly need a refresh get the 503."""
    (conn,) = await seed_connections(
        settings,
        endpoint,
        1,
        refresh_expires_in=timedelta(days=50),
        access_expires_in=timedelta(seconds=60),  # inside the 300 s refresh margin
    )
    boards = pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.refuse_client = True

    response = await backend.boards(conn)

    assert response.status_code == 200
    assert endpoint.refused == 1
    assert boards.calls.last.request.headers["authorization"] == f"Bearer pina_{0}_0"


async def test_a_refused_grant_marks_only_its_own_connection(
    backend: Backend, pinterest: respx.MockRouter, settings: Settings, endpoint: TokenEndpoint
) -> None:
    """Guards the other branch: a 400 (the refresh token itself spent) marks that one
    connection reauthorization_required with its one event; the others refresh."""
    ids = await seed_expired(settings, endpoint, 3)
    pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.live.discard(f"pinr_{1}_0")  # connection 1's refresh token was spent elsewhere

    answers = [await backend.boards(conn) for conn in ids]

    assert [r.status_code for r in answers] == [200, 401, 200]
    assert answers[1].json()["error"] == "reauthorization_required"
    assert await statuses(settings) == {
        ids[0]: "active",
        ids[1]: "reauthorization_required",
        ids[2]: "active",
    }
    assert await outbox_types(settings) == [("connection.reauthorization_required", ids[1])]
    assert (await backend.client.get("/readyz")).json() == {"status": "ready"}


async def test_the_keeper_pauses_while_the_client_is_refused(
    settings: Settings, pinterest: respx.MockRouter, endpoint: TokenEndpoint
) -> None:
    """Guards the keeper: refused client credentials cost no connection (none marked, no
    failure counted, no event, the row handed back unclaimed); the next pass inside the
    cooldown claims nothing and calls nothing; after it, a pass refreshes them all."""
    clock = SimClock()
    ids = await seed_connections(
        settings, endpoint, 6, refresh_expires_in=timedelta(days=5), now=clock.now()
    )
    endpoint.refuse_client = True

    async with replica(settings, pinterest, clock) as one:
        refused = await one.keeper.run_once()
        calls = endpoint.calls
        rows = await stored_connections(settings)
        paused = await one.keeper.run_once()
        assert one.tokens.client_credentials.rejected

        endpoint.refuse_client = False
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        resumed = await one.keeper.run_once()
        assert not one.tokens.client_credentials.rejected

    # At most the calls already under way when the first 401 came back.
    assert 1 <= calls <= settings.keeper_concurrency
    assert refused.client_rejected == 6
    assert refused.failed == refused.reauthorization_required == refused.refreshed == 0
    for conn in ids:
        assert rows[conn]["status"] == ConnectionStatus.ACTIVE
        assert rows[conn]["keeper_failures"] == 0
        assert rows[conn]["keeper_not_before"] is None
    assert paused.seen == set()
    assert resumed.refreshed == 6
    assert endpoint.calls == calls + 6
    assert await outbox_types(settings) == []


# --- the token endpoint's answers, told apart (oauth.py) ---------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, AUTHENTICATION_FAILED, PinterestClientRejected),
        (401, {"error": "invalid_grant"}, PinterestClientRejected),  # a 401 is the client's
        (401, None, PinterestClientRejected),
        (400, {"error": "invalid_client"}, PinterestClientRejected),
        (400, {"error": "unauthorized_client"}, PinterestClientRejected),
        (400, {"code": 1, "message": "Invalid refresh token."}, TokenRejected),
        (400, {"error": "invalid_grant"}, TokenRejected),
        (400, None, TokenRejected),
        (403, {"code": 29, "message": "not permitted"}, TokenRejected),
    ],
)
async def test_the_token_endpoints_refusals_are_told_apart(
    settings: Settings,
    pinterest: respx.MockRouter,
    status: int,
    body: dict[str, object] | None,
    expected: type[Exception],
) -> None:
    """Guards the classification: the app's credentials refused (401, or an RFC 6749
    client error) against the grant refused (any other 400 or 403)."""
    content = b"not json" if body is None else json.dumps(body).encode()
    pinterest.post(TOKEN_URL).respond(status, content=content)
    async with create_http_client(settings, httpx.MockTransport(pinterest.async_handler)) as http:
        oauth = PinterestOAuth(http, settings, Metrics())
        with pytest.raises(expected):
            await oauth.refresh("pinr_x")


async def test_a_login_whose_code_exchange_meets_a_refused_client_says_so(
    backend: Backend, pinterest: respx.MockRouter
) -> None:
    """The code exchange is told apart the same way: 503 pinterest_client_rejected, not
    the login's fault (authorization_failed)."""
    pinterest.post(TOKEN_URL).respond(401, json=AUTHENTICATION_FAILED)
    login = await backend.client.get("/auth/login")
    state = httpx.URL(login.headers["location"]).params["state"]

    with captured_logs(logging.WARNING):
        response = await backend.client.get(
            "/auth/callback",
            params={"code": "c", "state": state},
            headers={"Accept": "application/json"},
        )

    assert response.status_code == 503
    assert response.json()["error"] == "pinterest_client_rejected"
    assert "retry-after" in response.headers
