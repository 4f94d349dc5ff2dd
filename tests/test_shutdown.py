"""Shutdown past PINAUTH_SHUTDOWN_TIMEOUT: the requests still running get 503 with
Retry-After and Connection: close, and nothing is logged as a crash."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from pinauth.shutdown import Shutdown, ShutdownMiddleware
from tests.helpers import sandbox_login, sandboxed_pinauth

SHUTDOWN_TIMEOUT = 1


async def wait_for_upstream_calls(sandbox: httpx.AsyncClient, key: str, count: int) -> None:
    """Until the sandbox has received `count` calls to `key` (they are then in flight)."""
    deadline = time.monotonic() + 30
    while (await sandbox.get("/_sandbox/counters")).json()["api_requests"].get(key, 0) < count:
        assert time.monotonic() < deadline, f"{key} was not called {count} times"
        await asyncio.sleep(0.05)


async def test_requests_running_past_the_shutdown_timeout_get_503(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards the shutdown contract with a real `pinauth serve`: two requests (the proxy's
    fast path and a FastAPI route) wait on a Pinterest that holds its answer for a minute;
    at SIGTERM plus PINAUTH_SHUTDOWN_TIMEOUT uvicorn cancels them, and each gets 503
    shutting_down with Retry-After and Connection: close, not a 500, and the process log
    has no traceback."""
    rig = sandboxed_pinauth(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'pinauth.db'}",
        "/healthz",
        PINAUTH_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
    )
    sandbox, service, base, sandbox_url = rig.sandbox, rig.service, rig.base, rig.sandbox_url
    held = ("/pinterest/boards", "/boards")
    try:
        sandbox.start()
        service.start()
        with httpx.Client(timeout=30) as browser:
            sandbox_login(browser, base, sandbox_url)
            cookies = browser.cookies
        async with (
            httpx.AsyncClient(base_url=sandbox_url) as pinterest,
            httpx.AsyncClient(base_url=base, cookies=cookies, timeout=60) as client,
        ):
            fault = {"path_prefix": "/v5/boards", "status": 200, "body": {"items": []}}
            await pinterest.post("/_sandbox/faults", json=fault | {"delay": 60, "times": len(held)})
            calls = [asyncio.create_task(client.get(path)) for path in held]
            await wait_for_upstream_calls(pinterest, "GET /v5/boards", len(held))
            assert service.popen is not None
            service.popen.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            responses = await asyncio.gather(*calls)
            answered = time.monotonic() - signalled
        exit_status = service.terminate()
        stopped = time.monotonic() - signalled
    finally:
        service.kill()
        sandbox.kill()

    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "shutting_down"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["connection"] == "close"
    assert SHUTDOWN_TIMEOUT <= answered < SHUTDOWN_TIMEOUT + 10
    assert exit_status in (0, -signal.SIGTERM)
    output = service.output()
    assert "Traceback" not in output
    assert "Exception in ASGI application" not in output
    logged = [
        line["status"]
        for line in service.log_lines()
        if line["event"] == "request" and line["path"] in held
    ]
    assert logged.count(503) == len(held)
    with capsys.disabled():
        print(
            f"\n    SIGTERM with {len(held)} requests held upstream, "
            f"PINAUTH_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT}: "
            f"{[r.status_code for r in responses]} {[r.json()['error'] for r in responses]} "
            f"after {answered:.1f} s, Retry-After {responses[0].headers['retry-after']}, "
            f"Connection: {responses[0].headers['connection']}; process exited "
            f"{exit_status} after {stopped:.1f} s; {output.count('Traceback')} tracebacks"
        )


async def test_a_cancellation_before_shutdown_is_not_swallowed() -> None:
    """Guards the shutdown flag: until the server says it is shutting down, a cancelled
    request stays cancelled (nothing answered on its behalf, the CancelledError raised)."""
    entered = asyncio.Event()

    async def endpoint(_scope: Scope, _receive: Receive, _send: Send) -> None:
        entered.set()
        await asyncio.Event().wait()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "GET", "path": "/me", "headers": []}
    shutdown = Shutdown()
    middleware = ShutdownMiddleware(endpoint, shutdown=shutdown)
    request = asyncio.create_task(middleware(scope, receive, send))
    await entered.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert sent == []

    # The same cancellation once the shutdown has begun: a 503 instead.
    entered.clear()
    shutdown.started = True
    request = asyncio.create_task(middleware(scope, receive, send))
    await entered.wait()
    request.cancel()
    await request
    assert sent[0]["status"] == 503
    assert (b"connection", b"close") in sent[0]["headers"]
