"""Contract tests against Pinterest's official OpenAPI spec (vendored in spec/pinterest/).

1. The sandbox: every implemented operation's requests and responses validate.
2. pinauth itself: every request it sends to Pinterest (token exchange, refresh, user
   account, proxied calls) validates as a request of the operation it targets.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from pinauth.app import create_app
from pinauth.sandbox import SandboxConfig, create_sandbox_app
from pinauth.settings import Settings
from tests.helpers import make_settings, serve_app

# Vendored with its provenance, so these tests always run on a fresh clone.
SPEC = Path(__file__).resolve().parents[1] / "spec" / "pinterest" / "openapi.yaml"

# openapi-core cannot check OAuth2 bearer tokens and warns on each request; the tests
# that matter for tokens (test_login, test_proxy) assert the headers exactly.
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported scheme type:UserWarning")

SANDBOX = "http://sandbox.test"
SPEC_HOST = "https://api.pinterest.com"  # the spec's server is https://api.pinterest.com/v5
REDIRECT_URI = "http://localhost:8000/auth/callback"
CONFIG = SandboxConfig(redirect_uris=(REDIRECT_URI,))
ALL_SCOPES = "user_accounts:read,boards:read,boards:write,pins:read,pins:write"


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC))


def as_openapi_request(request: httpx.Request) -> MockRequest:
    """Describe an httpx request as the spec sees it: on Pinterest's host, /v5/… paths."""
    path = request.url.path
    path = path[path.index("/v5/") :]
    content_type = request.headers.get("content-type", "application/json").split(";")[0]
    return MockRequest(
        SPEC_HOST,
        request.method.lower(),
        path,
        args=dict(request.url.params),
        headers=dict(request.headers),
        data=request.content or None,
        content_type=content_type,
    )


def as_openapi_response(response: httpx.Response) -> MockResponse:
    return MockResponse(
        response.content,
        status_code=response.status_code,
        headers=dict(response.headers),
        content_type=response.headers.get("content-type", "application/json"),
    )


class Recorder(httpx.AsyncBaseTransport):
    """Forwards to the sandbox in-process, keeping every exchange for validation."""

    def __init__(self, target: httpx.AsyncBaseTransport) -> None:
        self.target = target
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.target.handle_async_request(request)
        await response.aread()
        self.exchanges.append((request, response))
        return response


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[httpx.AsyncClient, Recorder]]:
    recorder = Recorder(httpx.ASGITransport(create_sandbox_app(CONFIG)))
    async with httpx.AsyncClient(transport=recorder, base_url=SANDBOX) as client:
        yield client, recorder


async def authorize(client: httpx.AsyncClient, scope: str = ALL_SCOPES) -> str:
    consent = await client.get(
        "/oauth/",
        params={
            "client_id": CONFIG.client_id,
            "redirect_uri": REDIRECT_URI,
            "response_type": "code",
            "scope": scope,
            "state": "s1",
        },
    )
    assert consent.status_code == 200
    decision = await client.post(
        "/oauth/",
        data={
            "client_id": CONFIG.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": "s1",
            "decision": "allow",
        },
    )
    location = decision.headers["location"]
    assert location.startswith(REDIRECT_URI)
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["s1"]
    return query["code"][0]


BASIC = "Basic " + base64.b64encode(f"{CONFIG.client_id}:{CONFIG.client_secret}".encode()).decode()


async def test_sandbox_conforms_to_the_spec(
    spec: OpenAPI, sandbox: tuple[httpx.AsyncClient, Recorder]
) -> None:
    client, recorder = sandbox
    code = await authorize(client)
    recorder.exchanges.clear()  # the consent page is not part of the v5 API

    form = {"Authorization": BASIC}
    tokens = (
        await client.post(
            "/v5/oauth/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
            headers=form,
        )
    ).json()
    refreshed = (
        await client.post(
            "/v5/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            headers=form,
        )
    ).json()
    auth = {"Authorization": f"Bearer {refreshed['access_token']}"}

    await client.get("/v5/user_account", headers=auth)
    boards = (await client.get("/v5/boards", params={"page_size": 2}, headers=auth)).json()
    await client.get(
        "/v5/boards", params={"page_size": 2, "bookmark": boards["bookmark"]}, headers=auth
    )
    board = (
        await client.post(
            "/v5/boards",
            json={"name": "Contract", "description": "d", "privacy": "PUBLIC"},
            headers=auth,
        )
    ).json()
    await client.get(f"/v5/boards/{board['id']}", headers=auth)
    await client.patch(f"/v5/boards/{board['id']}", json={"name": "Renamed"}, headers=auth)
    pin = (
        await client.post(
            "/v5/pins",
            json={
                "board_id": board["id"],
                "title": "A pin",
                "media_source": {"source_type": "image_url", "url": "https://example.com/a.jpg"},
            },
            headers=auth,
        )
    ).json()
    await client.get(f"/v5/boards/{board['id']}/pins", headers=auth)
    await client.get("/v5/pins", headers=auth)
    await client.get(f"/v5/pins/{pin['id']}", headers=auth)
    await client.delete(f"/v5/pins/{pin['id']}", headers=auth)
    await client.delete(f"/v5/boards/{board['id']}", headers=auth)
    # Errors have the spec's shapes too.
    await client.get("/v5/boards", headers={"Authorization": "Bearer expired-or-bogus"})
    await client.get("/v5/boards/999", headers=auth)

    statuses = [response.status_code for _, response in recorder.exchanges]
    assert statuses == [
        200,
        200,
        200,
        200,
        200,
        201,
        200,
        200,
        201,
        200,
        200,
        200,
        204,
        204,
        401,
        404,
    ]
    for request, response in recorder.exchanges:
        openapi_request = as_openapi_request(request)
        spec.validate_request(openapi_request)
        spec.validate_response(openapi_request, as_openapi_response(response))


async def test_sandbox_enforces_scopes(sandbox: tuple[httpx.AsyncClient, Recorder]) -> None:
    client, _ = sandbox
    code = await authorize(client, scope="boards:read")
    tokens = (
        await client.post(
            "/v5/oauth/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
            headers={"Authorization": BASIC},
        )
    ).json()
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}

    assert (await client.get("/v5/boards", headers=auth)).status_code == 200
    denied = await client.post("/v5/boards", json={"name": "x"}, headers=auth)

    assert denied.status_code == 401
    assert denied.json()["code"] == 3


async def test_pinauths_requests_to_pinterest_conform_to_the_spec(
    spec: OpenAPI, database_url: str
) -> None:
    recorder = Recorder(httpx.ASGITransport(create_sandbox_app(CONFIG)))
    settings: Settings = make_settings(
        database_url,
        client_id=CONFIG.client_id,
        client_secret=CONFIG.client_secret,
        redirect_uri=REDIRECT_URI,
        api_url=f"{SANDBOX}/v5",
        scopes=ALL_SCOPES,
    )
    async with serve_app(create_app(settings, transport=recorder)) as app:
        login = await app.get("/auth/login")
        params = parse_qs(urlsplit(login.headers["location"]).query)
        assert params["scope"] == [ALL_SCOPES]
        # Consent happens in the sandbox the recorder forwards to.
        sandbox_client = httpx.AsyncClient(transport=recorder.target, base_url=SANDBOX)
        async with sandbox_client:
            decision = await sandbox_client.post(
                "/oauth/",
                data={
                    "client_id": params["client_id"][0],
                    "redirect_uri": params["redirect_uri"][0],
                    "scope": params["scope"][0],
                    "state": params["state"][0],
                    "decision": "allow",
                },
            )
        callback = urlsplit(decision.headers["location"])
        assert (await app.get(f"/auth/callback?{callback.query}")).status_code == 303
        assert (await app.post("/auth/refresh")).status_code == 200
        assert (await app.get("/pinterest/boards", params={"page_size": 5})).status_code == 200
        created = await app.post("/pinterest/boards", json={"name": "From pinauth"})
        assert created.status_code == 201
        assert (await app.get("/boards", params={"all": "true"})).status_code == 200

    sent: list[tuple[str, Any]] = []
    for request, _ in recorder.exchanges:
        spec.validate_request(as_openapi_request(request))
        sent.append((request.method, request.url.path))
    assert sent[:3] == [
        ("POST", "/v5/oauth/token"),
        ("GET", "/v5/user_account"),
        ("POST", "/v5/oauth/token"),
    ]
    assert ("POST", "/v5/boards") in sent
