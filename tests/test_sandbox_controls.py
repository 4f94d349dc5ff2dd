"""The sandbox's /_sandbox/ controls refuse cross-origin requests (no CSRF in demo mode)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pinauth.app import create_app
from pinauth.sandbox import SandboxConfig, create_sandbox_app
from pinauth.settings import Settings
from tests.helpers import SERVICE, serve_app

OWN = "http://sandbox.test"
FOREIGN_ORIGINS = [
    "https://evil.example",
    "null",
    "http://sandbox.test:8080",
    "https://sandbox.test",
]
# A body each control accepts, so a refusal cannot be mistaken for a validation error.
BODIES: dict[str, dict[str, Any]] = {
    "/_sandbox/access-token-lifetime": {"seconds": 60},
    "/_sandbox/faults": {"path_prefix": "/v5/boards", "status": 500},
    "/_sandbox/introspect": {"token": "pina_x"},
    "/_sandbox/token-hold": {"seconds": 1},
}


def controls(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) under /_sandbox/, from the app's own OpenAPI document."""
    return [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/_sandbox/")
        for method in operations
    ]


CONTROLS = controls(create_sandbox_app())


@pytest.fixture
async def sandbox() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(create_sandbox_app())
    async with httpx.AsyncClient(transport=transport, base_url=OWN) as client:
        yield client


def test_every_control_is_covered() -> None:
    """Guards the coverage of the tests below: they see all the sandbox's controls."""
    assert len(CONTROLS) >= 8
    assert ("POST", "/_sandbox/reset") in CONTROLS


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize(("method", "path"), CONTROLS)
async def test_controls_refuse_other_origins(
    sandbox: httpx.AsyncClient, method: str, path: str, origin: str
) -> None:
    """Guards the Origin check on every control: another origin (or null) gets 403."""
    response = await sandbox.request(
        method, path, json=BODIES.get(path), headers={"Origin": origin}
    )
    assert response.status_code == 403
    assert "cross-origin" in response.json()["message"]


@pytest.mark.parametrize(("method", "path"), CONTROLS)
async def test_controls_work_same_origin_and_without_origin(
    sandbox: httpx.AsyncClient, method: str, path: str
) -> None:
    """Guards against over-blocking: the sandbox's own pages and non-browser clients."""
    for headers in ({"Origin": OWN}, {}):
        response = await sandbox.request(method, path, json=BODIES.get(path), headers=headers)
        assert response.status_code < 300, response.text


async def test_a_cross_site_text_plain_form_post_cannot_reset_the_sandbox(
    sandbox: httpx.AsyncClient,
) -> None:
    """Guards the CSRF case itself: a simple request (no preflight) from another site."""
    await sandbox.post("/_sandbox/faults", json=BODIES["/_sandbox/faults"])

    refused = await sandbox.post(
        "/_sandbox/reset",
        content=b"anything=1",
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )

    assert refused.status_code == 403
    # The queued fault survived: the reset never ran.
    assert (await sandbox.delete("/_sandbox/faults")).json() == {"cleared": 1}


async def test_demo_mode_controls_refuse_other_origins(settings: Settings) -> None:
    """Guards the demo setup, where the sandbox is mounted on pinauth's own origin."""
    app = create_app(settings, sandbox=SandboxConfig())
    async with serve_app(app) as client:
        foreign = await client.post(
            "/sandbox/_sandbox/expire-access-tokens",
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        )
        own = await client.post(
            "/sandbox/_sandbox/expire-access-tokens", headers={"Origin": SERVICE}
        )

    assert foreign.status_code == 403
    assert own.status_code == 200


# --- DNS rebinding: only the sandbox's public Host ---------------------------------------

REBOUND = "rebind.attacker.example:8000"


@pytest.fixture
async def public_sandbox() -> AsyncIterator[httpx.AsyncClient]:
    """A sandbox whose public host is sandbox.test, as `pinauth sandbox` and demo mode set."""
    app = create_sandbox_app(SandboxConfig(control_hosts=("sandbox.test",)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=OWN) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), CONTROLS)
async def test_controls_refuse_a_rebound_host_name(
    public_sandbox: httpx.AsyncClient, method: str, path: str
) -> None:
    """Guards the Host check on every control: a DNS-rebinding page is same-origin with
    itself (Origin equals Host), so it passed the Origin check; its Host is not ours."""
    for headers in ({"Host": REBOUND, "Origin": f"http://{REBOUND}"}, {"Host": REBOUND}):
        response = await public_sandbox.request(
            method, path, json=BODIES.get(path), headers=headers
        )
        assert response.status_code == 403, response.text
        assert "own host" in response.json()["message"]
    own = await public_sandbox.request(method, path, json=BODIES.get(path))
    assert own.status_code < 300, own.text


async def test_demo_mode_controls_answer_on_the_public_host_only(settings: Settings) -> None:
    """Guards demo mode's wiring: pinauth's public host (the redirect URI's, localhost:<port>)
    is the controls' one; the red team's rebound `revoke-refresh-tokens` is refused."""
    from pinauth.demo import demo_settings

    demo, config = demo_settings(settings, "127.0.0.1", 8000)
    assert config.control_hosts == ("localhost:8000",)
    async with serve_app(create_app(demo, sandbox=config)) as client:  # at localhost:8000
        rebound = await client.post(
            "/sandbox/_sandbox/revoke-refresh-tokens",
            headers={"Host": REBOUND, "Origin": f"http://{REBOUND}"},
        )
        loopback = await client.post(
            "/sandbox/_sandbox/revoke-refresh-tokens", headers={"Host": "127.0.0.1:8000"}
        )
        own = await client.post(
            "/sandbox/_sandbox/revoke-refresh-tokens", headers={"Origin": SERVICE}
        )
    assert rebound.status_code == 403
    assert loopback.status_code == 403  # not the public host either
    assert own.status_code == 200
    assert own.json() == {"revoked": 0}


def test_pinauth_sandbox_controls_answer_on_its_loopback_names() -> None:
    """`pinauth sandbox` on loopback (or every address): the names a local client uses."""
    from pinauth.demo import loopback_hosts

    assert loopback_hosts("127.0.0.1", 8001) == ("localhost:8001", "127.0.0.1:8001", "[::1]:8001")
    assert loopback_hosts("10.1.2.3", 8001) == ("10.1.2.3:8001",)
