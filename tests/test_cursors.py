"""Pagination cursors (issues 18.7 and 20.6): bound to the listing and filters that issued
them, expiring after 24 hours, sealed under a key derived for cursors only, and refused
(400 invalid_cursor) when they are anything else: another listing's, another filter's,
a plain integer, one bit off."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
import pytest
import respx
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pinauth.cache import ConnectionCache
from pinauth.connections import ConnectionService
from pinauth.crypto import (
    CURSOR_TTL_SECONDS,
    CursorCodec,
    TokenCipher,
    TokenDecryptionError,
    cursor_binding,
)
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import InvalidCursor
from pinauth.models import WebhookEventStatus
from pinauth.settings import Settings
from pinauth.webhooks import WebhookEvents
from tests.helpers import (
    ManualClock,
    RotatingTokenEndpoint,
    browsers,
    connect_end_user,
    create_api_key,
    seed_connections,
)

# A wall-clock moment for the manual clock (cursors carry Unix seconds).
NOW = 1_800_000_000.0
BINDING = cursor_binding("connections", end_user_id=None, status=None)


def cipher_of(settings: Settings) -> TokenCipher:
    return TokenCipher([k.get_secret_value() for k in settings.encryption_keys])


def unb64(cursor: str) -> bytes:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def flipped(cursor: str, bit: int) -> str:
    raw = bytearray(unb64(cursor))
    raw[bit // 8] ^= 1 << (bit % 8)
    return b64(bytes(raw))


@asynccontextmanager
async def backend_with_connections(
    settings: Settings, pinterest: respx.MockRouter
) -> AsyncIterator[httpx.AsyncClient]:
    """A backend (API key) on an app holding three connections, two of end user "ada",
    and their three connection.created events."""
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, 4) as [backend, *people]:
        backend.headers["Authorization"] = f"Bearer {key}"
        for n, (browser, end_user) in enumerate(zip(people, ["ada", "ada", "grace"], strict=True)):
            account = {"id": f"9{n}", "username": f"user{n}"}
            await connect_end_user(
                backend, browser, pinterest, end_user, account, f"pina_{n}", f"pinr_{n}"
            )
        yield backend


async def next_cursor(backend: httpx.AsyncClient, path: str, **params: str) -> str:
    page = await backend.get(path, params={"limit": "1", **params})
    assert page.status_code == 200, page.text
    cursor = page.json()["next_cursor"]
    assert isinstance(cursor, str)
    return cursor


def refused(response: httpx.Response) -> bool:
    return response.status_code == 400 and response.json()["error"] == "invalid_cursor"


async def test_a_cursor_is_accepted_only_by_the_listing_and_filters_that_issued_it(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the binding (the associated data): without it a /v1/webhook-events cursor
    pages /v1/connections, and a cursor of one end user's listing pages another's."""
    async with backend_with_connections(settings, pinterest) as backend:
        connections = await next_cursor(backend, "/v1/connections")
        adas = await next_cursor(backend, "/v1/connections", end_user_id="ada")
        active = await next_cursor(backend, "/v1/connections", status="active")
        events = await next_cursor(backend, "/v1/webhook-events")
        pending = await next_cursor(backend, "/v1/webhook-events", status="pending")

        async def listing(path: str, cursor: str, **params: str) -> httpx.Response:
            return await backend.get(path, params={"limit": "1", "cursor": cursor, **params})

        # Each where it came from: accepted.
        assert (await listing("/v1/connections", connections)).status_code == 200
        assert (await listing("/v1/connections", adas, end_user_id="ada")).status_code == 200
        assert (await listing("/v1/connections", active, status="active")).status_code == 200
        assert (await listing("/v1/webhook-events", events)).status_code == 200
        assert (await listing("/v1/webhook-events", pending, status="pending")).status_code == 200
        # Anywhere else: refused.
        elsewhere = [
            await listing("/v1/connections", events),
            await listing("/v1/webhook-events", connections),
            await listing("/v1/connections", adas),
            await listing("/v1/connections", adas, end_user_id="grace"),
            await listing("/v1/connections", adas, end_user_id="ada", status="active"),
            await listing("/v1/connections", connections, end_user_id="ada"),
            await listing("/v1/connections", active),
            await listing("/v1/connections", active, status="reauthorization_required"),
            await listing("/v1/webhook-events", pending),
            await listing("/v1/webhook-events", events, status="pending"),
        ]
    assert [refused(r) for r in elsewhere] == [True] * len(elsewhere), [r.text for r in elsewhere]


async def test_a_plain_integer_or_a_cursor_one_bit_off_is_refused(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards authentication of cursors (issue 20.6): `cursor=1` (a position, as a plain
    integer cursor would carry it) and a real cursor with one bit flipped, anywhere in
    it, are 400 invalid_cursor on both listings, never a page."""
    async with backend_with_connections(settings, pinterest) as backend:
        answers: list[httpx.Response] = []
        for path in ("/v1/connections", "/v1/webhook-events"):
            real = await next_cursor(backend, path)
            bits = len(unb64(real)) * 8
            # The version byte, the nonce, the sealed position and issue time, the tag.
            candidates = ["1", "0", "-1", "12345678901234567890", real + "A", real[:-1]]
            candidates += [flipped(real, bit) for bit in (0, 9, 8 * 13 + 3, 8 * 20, bits - 1)]
            for cursor in candidates:
                answers.append(await backend.get(path, params={"cursor": cursor}))
            assert (await backend.get(path, params={"cursor": real})).status_code == 200
    assert all(refused(r) for r in answers), [(r.status_code, r.text) for r in answers]


def test_every_single_bit_flip_and_every_other_spelling_is_refused(settings: Settings) -> None:
    codec = CursorCodec(cipher_of(settings))
    cursor = codec.dumps(42, BINDING)
    assert codec.loads(cursor, BINDING) == 42
    raw = unb64(cursor)
    for bit in range(len(raw) * 8):
        assert codec.loads(flipped(cursor, bit), BINDING) is None, bit
    # The same bytes spelt otherwise (padding, the standard alphabet, a non-canonical last
    # character) are not the cursor either.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    others = [cursor + "=", cursor + "==", " " + cursor, cursor[:-1] + "\u00e9"]
    others += [cursor[:-1] + c for c in last if c != cursor[-1]]
    for other in others:
        assert codec.loads(other, BINDING) is None, other
    assert codec.loads("1", BINDING) is None
    assert codec.loads("", BINDING) is None
    assert codec.loads("A" * 10_000, BINDING) is None


async def test_a_cursor_expires_24_hours_after_it_was_issued(settings: Settings) -> None:
    """Guards expiry: a cursor opens until 24 h after its issue and never after, on the
    injected clock; a cursor issued by a replica whose clock runs ahead is fine within
    five minutes of skew."""
    ids = await seed_connections(
        settings, RotatingTokenEndpoint(), 3, refresh_expires_in=timedelta(days=50)
    )
    clock = ManualClock(start=NOW)
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        service = ConnectionService(
            sessionmaker, ConnectionCache(0), CursorCodec(cipher_of(settings), clock=clock)
        )
        page = dict(limit=1, end_user_id=None, status=None)
        _, cursor = await service.page(cursor=None, **page)  # type: ignore[arg-type]
        assert cursor is not None
        clock.advance(CURSOR_TTL_SECONDS - 1)
        rows, _ = await service.page(cursor=cursor, **page)  # type: ignore[arg-type]
        assert [r.public_id for r in rows] == ids[1:2]
        clock.advance(1)
        with pytest.raises(InvalidCursor):
            await service.page(cursor=cursor, **page)  # type: ignore[arg-type]

        events = WebhookEvents(sessionmaker, CursorCodec(cipher_of(settings), clock=clock))
        with pytest.raises(InvalidCursor):
            await events.page(limit=1, cursor=cursor)  # another listing's, though fresh
    finally:
        await engine.dispose()

    ahead = ManualClock(start=NOW + 300)
    behind = CursorCodec(cipher_of(settings), clock=ManualClock(start=NOW))
    assert behind.loads(CursorCodec(cipher_of(settings), clock=ahead).dumps(7, BINDING), BINDING)
    ahead.advance(1)
    issued_ahead = CursorCodec(cipher_of(settings), clock=ahead).dumps(7, BINDING)
    assert behind.loads(issued_ahead, BINDING) is None


def test_cursors_are_sealed_under_a_key_derived_for_them_only(settings: Settings) -> None:
    """Guards the derived key: a cursor opens under HKDF-SHA256(encryption key, info
    "pinauth cursor key v1"), not under the encryption key itself, and the token cipher
    cannot read it (nor can the cursor codec read what the token cipher writes)."""
    key = settings.encryption_keys[0].get_secret_value()
    material = base64.urlsafe_b64decode(key)
    cipher = cipher_of(settings)
    codec = CursorCodec(cipher)
    cursor = codec.dumps(42, BINDING)
    raw = unb64(cursor)
    nonce, sealed, aad = raw[1:13], raw[13:], raw[:1] + BINDING.encode()

    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"pinauth cursor key v1"
    ).derive(material)
    assert AESGCM(derived).decrypt(nonce, sealed, aad)[:8] == (42).to_bytes(8, "big")
    for other in (material, material[:16] * 2, material[16:] * 2):
        with pytest.raises(InvalidTag):
            AESGCM(other).decrypt(nonce, sealed, aad)
    assert cipher.derived_keys(b"another purpose") != cipher.derived_keys(b"pinauth cursor key v1")

    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(cursor)
    # What cursors used to be: the position under the token key. No longer a cursor.
    assert codec.loads(cipher.encrypt("42"), BINDING) is None


def test_key_rotation_keeps_cursors_while_the_old_key_is_listed(settings: Settings) -> None:
    old = settings.encryption_keys[0].get_secret_value()
    new = Fernet.generate_key().decode()
    before = CursorCodec(TokenCipher([old]))
    during = CursorCodec(TokenCipher([new, old]))
    after = CursorCodec(TokenCipher([new]))
    issued_before = before.dumps(5, BINDING)
    issued_during = during.dumps(6, BINDING)

    assert during.loads(issued_before, BINDING) == 5  # the new key first: nothing breaks
    assert during.loads(issued_during, BINDING) == 6
    assert after.loads(issued_during, BINDING) == 6  # sealed under the new key
    assert after.loads(issued_before, BINDING) is None  # the old key gone: list again


def test_bindings_of_different_listings_or_filters_never_coincide(settings: Settings) -> None:
    """The bindings the two listings use differ, whatever their filters."""
    bindings = {
        cursor_binding("connections", end_user_id=None, status=None),
        cursor_binding("connections", end_user_id="ada", status=None),
        cursor_binding("connections", end_user_id=None, status="active"),
        cursor_binding("webhook-events", status=None),
        cursor_binding("webhook-events", status=WebhookEventStatus.PENDING.value),
        # A value that mimics another's spelling stays distinct.
        cursor_binding("connections", end_user_id='","status":"active', status=None),
    }
    assert len(bindings) == 6
