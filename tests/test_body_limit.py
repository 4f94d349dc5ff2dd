"""Request bodies: a small limit on pinauth's own routes, the proxy's own larger one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from pinauth.api.body_limit import MAX_BODY_BYTES
from pinauth.app import create_app
from pinauth.sandbox import SandboxConfig
from pinauth.settings import Settings
from tests.helpers import API, create_api_key, log_in, make_settings, run_client, serve_app

HUGE = 30 * 1024 * 1024
CHUNK = 16 * 1024
# pinauth's own routes, with and without a body of their own, with and without a key.
OWN_ROUTES = [
    ("POST", "/v1/connections/conn_x/proxy-tokens"),
    ("POST", "/v1/connect-sessions"),
    ("POST", "/auth/refresh"),
    ("GET", "/v1/connections"),
    ("GET", "/no/such/route"),
]


class Sent:
    """A request body of `total` bytes that counts how much of it was read."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.read < self.total:
            self.read += CHUNK
            yield b" " * CHUNK


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": "payload_too_large",
        "message": f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    }


@pytest.mark.parametrize(("method", "path"), OWN_ROUTES)
async def test_a_declared_length_over_the_limit_is_refused_unread(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    body = Sent(HUGE)

    response = await client.request(
        method, path, content=body, headers={"Content-Length": str(HUGE)}
    )

    assert_too_large(response)
    assert body.read == 0


@pytest.mark.parametrize(("method", "path"), OWN_ROUTES[:2])  # the routes that read a body
async def test_a_chunked_body_is_cut_off_at_the_limit(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    body = Sent(HUGE)  # no Content-Length: the limit applies while reading

    response = await client.request(method, path, content=body)

    assert_too_large(response)
    assert body.read <= MAX_BODY_BYTES + CHUNK


async def test_a_body_at_the_limit_is_still_served(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    key = await create_api_key(settings)
    body = json.dumps({"end_user_id": "u"}).encode()
    padded = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    fits = await client.post("/v1/connect-sessions", content=padded, headers=auth)
    over = await client.post("/v1/connect-sessions", content=b" " + padded, headers=auth)

    assert fits.status_code == 201, fits.text
    assert_too_large(over)


async def test_the_proxy_keeps_its_own_larger_limit(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    settings = make_settings(database_url, max_body_bytes=4 * 1024 * 1024)
    two_mib = b"x" * (2 * 1024 * 1024)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        route = pinterest.post(f"{API}/media").respond(201, json={})

        declared = await client.post("/pinterest/media", content=two_mib)
        chunked = await client.post("/pinterest/media", content=Sent(len(two_mib)))

    assert declared.status_code == 201, declared.text
    assert chunked.status_code == 201, chunked.text
    assert [len(call.request.content) for call in route.calls] == [len(two_mib)] * 2


async def test_the_sandbox_the_proxy_calls_in_demo_mode_keeps_the_proxys_limit(
    settings: Settings,
) -> None:
    """The demo's proxy forwards bodies up to PINAUTH_MAX_BODY_BYTES to the mounted sandbox."""
    app = create_app(settings, sandbox=SandboxConfig())
    async with serve_app(app) as client:
        response = await client.post(
            "/sandbox/v5/pins", content=b"{" + b" " * MAX_BODY_BYTES + b"}"
        )

    assert response.status_code == 401  # the sandbox's own answer: no token
