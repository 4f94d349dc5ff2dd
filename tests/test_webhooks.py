"""Lifecycle webhooks (issue 13): the outbox, its events, signing and delivery."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx
from pydantic import ValidationError
from sqlalchemy import select

from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import ConfigurationError
from pinauth.models import Connection, WebhookEvent, WebhookEventStatus
from pinauth.settings import Settings
from pinauth.webhooks import record_event
from tests.helpers import (
    ACCESS_1,
    ACCESS_2,
    ALL_TOKENS,
    REFRESH_1,
    REFRESH_2,
    SERVICE,
    TOKEN_URL,
    USER_ACCOUNT,
    browsers,
    connect_end_user,
    create_api_key,
    log_in,
    make_settings,
    run_client,
)

SECRET_A = "whsec-" + "a" * 40
SECRET_B = "whsec-" + "b" * 40
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def a_connection(**overrides: object) -> Connection:
    values: dict[str, object] = {
        "pinterest_user_id": "549755885175",
        "username": "ada_pins",
        "scopes": "boards:read,pins:read",
        "access_token_encrypted": "encrypted-" + ALL_TOKENS[0],
        "refresh_token_encrypted": "encrypted-" + ALL_TOKENS[1],
        "access_token_expires_at": NOW + timedelta(days=30),
        "refresh_token_expires_at": NOW + timedelta(days=60),
        "end_user_id": "user_42",
    } | overrides
    return Connection(**values)


async def outbox(settings: Settings) -> list[WebhookEvent]:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            stmt = select(WebhookEvent).order_by(WebhookEvent.id)
            return list((await db.execute(stmt)).scalars())
    finally:
        await engine.dispose()


# --- the outbox API ---------------------------------------------------------------


async def test_record_event_commits_with_the_callers_transaction(settings: Settings) -> None:
    """The row exists when the caller commits, and not when it rolls back."""
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as db, db.begin():
            connection = a_connection()
            db.add(connection)
            await db.flush()
            await record_event(db, "connection.created", connection, now=NOW)
        async with sessionmaker() as db:
            db.add(a_connection(end_user_id="user_43"))
            await db.flush()
            await record_event(db, "connection.created", connection, now=NOW)
            await db.rollback()
    finally:
        await engine.dispose()

    [event] = await outbox(settings)
    body = json.loads(event.body)
    assert event.status is WebhookEventStatus.PENDING
    assert event.connection_id == connection.public_id
    assert body["id"] == event.public_id
    assert body["id"].startswith("evt_")
    assert body["type"] == "connection.created"
    assert body["created_at"] == "2026-11-29T12:00:00Z"
    shown = body["data"]["connection"]
    assert shown["id"] == connection.public_id
    assert shown["end_user_id"] == "user_42"
    assert shown["status"] == "active"
    assert shown["created_at"] is not None  # a server default, read back in the transaction
    for token in ALL_TOKENS:
        assert token not in event.body
    assert "encrypted" not in event.body


async def test_record_event_refuses_unknown_types(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            with pytest.raises(ValueError, match=r"connection\.exploded"):
                await record_event(db, "connection.exploded", a_connection())
    finally:
        await engine.dispose()


# --- settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"webhook_url": "ftp://example.com/hook"}, r"not an http\(s\) URL"),
        ({"webhook_url": "example.com/hook"}, r"not an http\(s\) URL"),
        ({"webhook_secrets": f"{SECRET_A},short"}, "secret #2 is shorter than 32"),
    ],
)
def test_bad_webhook_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings("sqlite+aiosqlite://", **overrides)


def test_a_webhook_url_without_secrets_is_refused() -> None:
    settings = make_settings("sqlite+aiosqlite://", webhook_url="https://app.example/hooks")
    with pytest.raises(ConfigurationError, match="PINAUTH_WEBHOOK_SECRETS is not"):
        settings.validate_for_serving()


def test_webhook_secrets_are_comma_separated() -> None:
    settings = make_settings(
        "sqlite+aiosqlite://",
        webhook_url="https://app.example/hooks",
        webhook_secrets=f" {SECRET_A} , {SECRET_B} ",
    )
    settings.validate_for_serving()
    assert [s.get_secret_value() for s in settings.webhook_secrets] == [SECRET_A, SECRET_B]


# --- every change commits its event -----------------------------------------------


def types_of(events: list[WebhookEvent]) -> list[str]:
    return [event.type for event in events]


async def test_login_events_created_then_updated(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    await log_in(client, pinterest)

    events = await outbox(settings)
    assert types_of(events) == ["connection.created", "connection.updated"]
    me = (await client.get("/me")).json()
    assert {event.connection_id for event in events} == {me["connection_id"]}
    for event in events:
        assert all(token not in event.body for token in ALL_TOKENS)


async def test_rejected_refresh_reports_once_across_replicas_then_recovered(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Two replicas meet the same dead refresh token: one event; a new login: recovered."""
    pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "Authentication failed."})
    async with run_client(settings, pinterest) as one, run_client(settings, pinterest) as two:
        await log_in(one, pinterest)
        pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "dead"})
        two.cookies = one.cookies
        answers = await asyncio.gather(
            *(replica.post("/auth/refresh") for replica in (one, two, one, two))
        )
        again = await two.post("/auth/refresh")
        await log_in(one, pinterest)

    assert {a.json()["error"] for a in [*answers, again]} == {"reauthorization_required"}
    assert types_of(await outbox(settings)) == [
        "connection.created",
        "connection.reauthorization_required",
        "connection.recovered",
    ]
    body = json.loads((await outbox(settings))[1].body)
    assert body["data"]["connection"]["status"] == "reauthorization_required"


async def test_deletes_report_deleted(settings: Settings, pinterest: respx.MockRouter) -> None:
    """Through the API (an API key) and the browser's disconnect alike."""
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, 3) as (backend, ada, grace):
        backend.headers["Authorization"] = f"Bearer {key}"
        first = await connect_end_user(
            backend, ada, pinterest, "user_1", USER_ACCOUNT, ACCESS_1, REFRESH_1
        )
        second = await connect_end_user(
            backend, grace, pinterest, "user_2", USER_ACCOUNT, ACCESS_2, REFRESH_2
        )
        assert (await backend.delete(f"/v1/connections/{first}")).status_code == 204
        disconnect = await grace.delete("/auth/connection", headers={"Origin": SERVICE})
        assert disconnect.status_code == 204, disconnect.text

    events = await outbox(settings)
    deleted = [e for e in events if e.type == "connection.deleted"]
    assert [e.connection_id for e in deleted] == [first, second]
    assert json.loads(deleted[0].body)["data"]["connection"]["end_user_id"] == "user_1"
