"""Tokens and secrets never leak: not to the database in plaintext, responses or logs."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.app import create_app
from pinauth.cli import main
from pinauth.errors import ConfigurationError
from pinauth.logs import JsonFormatter, StripQueryFilter, TextFormatter
from pinauth.settings import Settings
from tests.helpers import (
    ALL_TOKENS,
    API,
    CLIENT_SECRET,
    TOKEN_URL,
    browsers,
    create_api_key,
    log_in,
    make_settings,
    mock_login_upstream,
    serve_app,
    start_login,
    token_json,
)


async def test_no_token_or_secret_in_database_responses_or_logs(
    app: FastAPI,
    pinterest: respx.MockRouter,
    settings: Settings,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    async with serve_app(app) as client:

        def record(response: httpx.Response) -> None:
            bodies.append(str(response.headers) + response.text)

        record(await log_in(client, pinterest))
        record(await client.get("/me"))
        pinterest.post(TOKEN_URL).respond(
            200, json=token_json("pina_ACCESS-TWO-a93b01", "pinr_REFRESH-TWO-c4e6f2")
        )
        record(await client.post("/auth/refresh"))
        # Failures log too: a transient failure and a rejected refresh token.
        pinterest.post(TOKEN_URL).respond(502, text="upstream broke")
        record(await client.post("/auth/refresh"))
        state = await start_login(client)
        pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "bad code"})
        record(await client.get("/auth/callback", params={"code": "c", "state": state}))

    raw = await stored_bytes(database_url)
    logs = caplog.text
    assert bodies
    for secret in (*ALL_TOKENS, CLIENT_SECRET, settings.secret_key.get_secret_value()):
        assert secret.encode() not in raw, f"{secret} stored in plaintext"
        assert secret not in logs, f"{secret} logged"
        for body in bodies:
            assert secret not in body, f"{secret} in a response"


async def stored_bytes(database_url: str) -> bytes:
    """Everything the database holds: every row as text, and for SQLite the raw files
    (WAL and free pages included, where deleted values linger)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = [
                repr(row).encode()
                for table in (
                    "connections",
                    "sessions",
                    "login_states",
                    "api_keys",
                    "connect_sessions",
                    "proxy_tokens",
                )
                for row in (await connection.execute(text(f"SELECT * FROM {table}"))).all()
            ]
    finally:
        await engine.dispose()
    assert rows, "the flow should have stored something"
    if database_url.startswith("sqlite"):
        path = Path(database_url.split("///", 1)[1])
        rows += [p.read_bytes() for p in path.parent.glob(path.name + "*")]
    return b"".join(rows)


async def test_api_keys_and_connect_sessions_never_leak(
    settings: Settings, pinterest: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the app's own credentials: after creation, an API key, a connect-session
    token, a connect result and a proxy token appear in no response, log line, metric or
    database column in plain text (the proxy token used, refused and expired included,
    and each of them put into a request's path by mistake)."""
    caplog.set_level(logging.DEBUG)
    key = await create_api_key(settings)
    bodies: list[str] = []
    async with browsers(settings, pinterest, 2) as [backend, browser]:
        backend.headers["Authorization"] = f"Bearer {key}"
        minted = await backend.post(
            "/v1/connect-sessions", json={"end_user_id": "u1", "return_to": "/x"}
        )
        token = minted.json()["token"]
        pending = await backend.post("/v1/connect-sessions", json={"end_user_id": "u2"})
        unused_token = pending.json()["token"]
        login = await browser.get(minted.json()["connect_url"])
        bodies.append(str(login.headers) + login.text)
        state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
        mock_login_upstream(pinterest)
        callback = await browser.get("/auth/callback", params={"code": "c", "state": state})
        # The connect result is handed to the browser once (in this Location), then only
        # its hash exists.
        landed = parse_qs(urlsplit(callback.headers["location"]).query)
        connect_result = landed["pinauth_connect_result"][0]
        confirmed = await backend.post(
            "/v1/connections/confirm", json={"result": connect_result, "end_user_id": "u1"}
        )
        for response in (
            confirmed,
            await backend.post(
                "/v1/connections/confirm", json={"result": connect_result, "end_user_id": "u1"}
            ),
            await browser.get("/auth/login", params={"connect_session": token}),  # used
            await browser.get("/me"),
            await backend.get("/v1/connections"),
            await backend.get("/v1/connections", params={"end_user_id": "u1"}),
            await backend.get("/pinterest/boards"),
        ):
            bodies.append(str(response.headers) + response.text)
        connection_id = confirmed.json()["id"]
        minted_proxy = await backend.post(f"/v1/connections/{connection_id}/proxy-tokens")
        proxy_token = minted_proxy.json()["token"]
        as_proxy = {"Authorization": f"Bearer {proxy_token}"}
        pinterest.get(f"{API}/boards").respond(200, json={"items": [], "bookmark": None})
        pinterest.get(f"{API}/user_account").respond(401, json={"code": 2, "message": "no"})
        for response in (
            await browser.get("/pinterest/boards", headers=as_proxy),
            await browser.get("/boards", headers=as_proxy),
            await browser.get("/pinterest/user_account", headers=as_proxy),
            await browser.get(
                "/pinterest/boards", headers=as_proxy | {"Pinauth-Connection-Id": "conn_x"}
            ),
            await browser.get("/v1/connections", headers=as_proxy),
            await browser.get("/me", headers=as_proxy),
            await browser.get(
                "/pinterest/boards", headers={"Authorization": "Bearer " + proxy_token[:-1] + "x"}
            ),
            await browser.get("/metrics"),
            # Credentials pasted into paths: a proxy token where its `pt_…` id belongs,
            # an API key where a connection id does.
            await backend.delete(f"/v1/connections/{connection_id}/proxy-tokens/{proxy_token}"),
            await backend.get(f"/v1/connections/{key}"),
            await browser.get(f"/auth/login/{token}"),
        ):
            bodies.append(str(response.headers) + response.text)

    raw = await stored_bytes(settings.database_url)
    # httpx logs each request of the test's own browser (which does carry the token in
    # its URL); everything pinauth logged must not.
    # Each record pinauth's logging config lets through (its own and uvicorn's at any
    # level, every other library's from WARNING up: aiosqlite's DEBUG lines quote SQL
    # parameters), as both of its formats write it (the access log's path is a field).
    # httpx logs each request of the test's own browser, which does carry the token in
    # its URL; everything pinauth logged must not.
    text_format, json_format = TextFormatter("%(message)s"), JsonFormatter()
    logs = "\n".join(
        text_format.format(record) + json_format.format(record)
        for record in caplog.records
        if record.name.startswith(("pinauth", "uvicorn")) or record.levelno >= logging.WARNING
    )
    for secret in (key, token, unused_token, proxy_token, connect_result):
        assert secret.encode() not in raw, f"{secret} stored in plaintext"
        assert secret not in logs, f"{secret} logged"
        for body in bodies:
            assert secret not in body, f"{secret} in a response"


def test_weak_secret_key_is_refused(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="PINAUTH_SECRET_KEY is too short"):
        create_app(make_settings(database_url, secret_key="short"))
    with pytest.raises(ConfigurationError, match="PINAUTH_SECRET_KEY is missing"):
        create_app(make_settings(database_url, secret_key=""))


def test_missing_encryption_key_is_refused(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="PINAUTH_ENCRYPTION_KEYS is missing"):
        create_app(make_settings(database_url, encryption_keys=""))
    with pytest.raises(ConfigurationError, match="Fernet keys"):
        create_app(make_settings(database_url, encryption_keys="not-a-fernet-key"))


def test_cli_refuses_to_serve_with_a_weak_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("PINTEREST_CLIENT_ID", "cid")
    monkeypatch.setenv("PINTEREST_CLIENT_SECRET", "csecret")
    monkeypatch.setenv("PINAUTH_SECRET_KEY", "too-short")
    monkeypatch.setenv("PINAUTH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/x.db")

    assert main(["serve", "--port", "1"]) == 2

    err = capsys.readouterr().err
    assert "PINAUTH_SECRET_KEY is too short" in err
    assert "too-short" not in err
    assert not (tmp_path / "x.db").exists()


def test_access_log_drops_the_query_string() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/auth/callback?code=SECRET&state=STATE", "1.1", 303),
        None,
    )
    assert StripQueryFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /auth/callback HTTP/1.1" 303'


def test_cli_refuses_to_serve_without_credentials_unless_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("PINTEREST_CLIENT_ID", "PINTEREST_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PINAUTH_SECRET_KEY", "k" * 40)
    monkeypatch.setenv("PINAUTH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/x.db")

    assert main(["serve", "--port", "1"]) == 2

    err = capsys.readouterr().err
    assert "PINTEREST_CLIENT_ID and PINTEREST_CLIENT_SECRET are not set" in err
    assert "pinauth serve --demo" in err
    assert not (tmp_path / "x.db").exists()
