"""The last branches of the security-critical modules that no other test takes.

`make test` requires 100% branch coverage of api/deps.py, apikeys.py, cache.py, crypto.py
and security_headers.py (see the Makefile); each test here names the branch it takes
(tokens.py's are on the way there: the credential's own branches are here).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx
import pytest
import respx
from cryptography.fernet import Fernet

from pinauth.apikeys import ApiKeyService
from pinauth.app import create_app
from pinauth.cache import ConnectionCache
from pinauth.crypto import TokenCipher, TokenDecryptionError
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import ConfigurationError, InvalidRequest, ReauthorizationRequired
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics
from pinauth.pinterest.oauth import PinterestOAuth
from pinauth.security_headers import ALWAYS, LOCKED_DOWN_CSP, secured
from pinauth.settings import Settings
from pinauth.tokens import Credential, TokenManager
from tests.helpers import (
    captured_logs,
    log_in,
    make_settings,
    mock_login_upstream,
    serve_app,
    start_login,
    token_json,
)


async def test_a_same_origin_request_on_another_host_name_passes_the_origin_check(
    client: httpx.AsyncClient,
) -> None:
    """deps.check_origin: an Origin that is not a configured one but is the request's own
    (pinauth reached as 127.0.0.1 instead of its public name) is not cross-site."""
    same = await client.post(
        "/auth/logout", headers={"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}
    )
    assert same.status_code == 204
    other = await client.post(
        "/auth/logout", headers={"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8001"}
    )
    assert other.status_code == 403
    assert other.json()["error"] == "forbidden_origin"


def _connection(version: int) -> Connection:
    now = datetime.now(UTC)
    return Connection(
        public_id="conn_cached",
        version=version,
        pinterest_user_id="u1",
        username=f"v{version}",
        access_token_expires_at=now,
        created_at=now,
        updated_at=now,
    )


def test_the_connection_cache_keeps_the_newer_row() -> None:
    """cache.remember_connection: a row read late, older than the cached one, loses."""
    cache = ConnectionCache(ttl=60)
    assert cache.remember_connection(_connection(2))
    assert cache.remember_connection(_connection(1))  # accepted, but not stored
    cached = cache.cached_connection("conn_cached")
    assert cached is not None
    assert cached.version == 2


def test_a_proxy_token_of_a_connection_deleted_here_is_never_cached() -> None:
    """cache.remember_proxy_token: a token looked up after its connection was deleted in
    this process (the lookup's generation is current, its row read from a replica that
    had not seen the delete yet) must not bring the connection back."""
    cache = ConnectionCache(ttl=60)
    cache.forget_connection("conn_cached")
    cache.remember_proxy_token("token-hash", _connection(1), 1e12, cache.generation())
    assert cache.proxy_token("token-hash") is None
    assert cache.cached_connection("conn_cached") is None


def test_a_cipher_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match="at least one encryption key"):
        TokenCipher([])


def test_secured_reads_any_iterable_of_headers_once() -> None:
    """security_headers.secured: headers that are not a list are read once, not twice."""
    request_id = (b"x-request-id", b"r1")
    headers = iter([(b"content-type", b"application/json")])
    assert secured(headers, request_id) == [
        (b"content-type", b"application/json"),
        request_id,
        *ALWAYS,
        LOCKED_DOWN_CSP,
    ]


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "tab\there"])
async def test_an_api_key_name_must_be_printable_and_short(settings: Settings, name: str) -> None:
    engine = create_engine(settings)
    try:
        service = ApiKeyService(create_sessionmaker(engine), cache_ttl=0)
        with pytest.raises(InvalidRequest, match="1 to 100 printable"):
            await service.create(name)
    finally:
        await engine.dispose()


async def test_recording_a_keys_last_use_never_fails_the_request(tmp_path: object) -> None:
    """apikeys._touch: a failed last-used write is logged, not raised (bookkeeping only)."""
    # A database without pinauth's tables: the write fails.
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    engine = create_engine(settings)
    try:
        service = ApiKeyService(create_sessionmaker(engine), cache_ttl=0)
        with captured_logs(logging.WARNING) as logs:
            await service._touch("0" * 64)
        assert "could not record an API key's last use: OperationalError" in logs.getvalue()
    finally:
        await engine.dispose()


async def test_a_token_no_configured_key_decrypts_means_a_new_login(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """tokens.credential: an access token encrypted with a key since removed from
    PINAUTH_ENCRYPTION_KEYS is a 401 reauthorization_required, never a 500 or a call to
    Pinterest with garbage."""
    transport = httpx.MockTransport(pinterest.async_handler)
    async with serve_app(create_app(settings, transport=transport)) as before:
        await log_in(before, pinterest)
        cookies = before.cookies
    rotated = make_settings(settings.database_url, encryption_keys=Fernet.generate_key().decode())
    async with serve_app(create_app(rotated, transport=transport)) as after:
        after.cookies = cookies
        response = await after.get("/pinterest/boards")
    assert response.status_code == 401
    assert response.json()["error"] == "reauthorization_required"
    assert not pinterest.calls


def test_a_credential_never_shows_its_token() -> None:
    """tokens.Credential.__repr__: what a log line or a traceback would print."""
    credential = Credential(_connection(3), "pina_secret_access_token")
    assert repr(credential) == "Credential(connection=conn_cached, version=3)"


async def test_no_credential_for_a_connection_that_needs_a_new_login(settings: Settings) -> None:
    """tokens.credential: a row marked reauthorization_required yields no token at all."""
    engine = create_engine(settings)
    metrics = Metrics()
    async with httpx.AsyncClient() as http:
        tokens = TokenManager(
            settings,
            create_sessionmaker(engine),
            PinterestOAuth(http, settings, metrics),
            TokenCipher([key.get_secret_value() for key in settings.encryption_keys]),
            ConnectionCache(ttl=60),
            metrics,
        )
        connection = _connection(1)
        connection.status = ConnectionStatus.REAUTHORIZATION_REQUIRED
        try:
            with pytest.raises(ReauthorizationRequired) as raised:
                tokens.credential(connection)
            assert raised.value.body()["login_url"] == settings.login_url
        finally:
            await engine.dispose()


async def test_a_new_login_without_scopes_from_pinterest_records_the_requested_ones(
    pinterest: respx.MockRouter, database_url: str
) -> None:
    """auth._upsert_connection: renewing a connection whose token answer names no scopes
    records the scopes pinauth asked for, not the previous login's."""
    requested = ["user_accounts:read", "boards:read", "boards:write"]
    settings = make_settings(database_url, scopes=",".join(requested))
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with serve_app(app) as client:
        await log_in(client, pinterest)  # Pinterest names its scopes: those are recorded
        assert (await client.get("/me")).json()["scopes"] != requested
        unscoped = token_json()
        del unscoped["scope"]
        mock_login_upstream(pinterest, unscoped)
        state = await start_login(client)
        callback = await client.get(
            "/auth/callback", params={"code": "auth-code-2", "state": state}
        )
        assert callback.status_code == 303, callback.text
        assert (await client.get("/me")).json()["scopes"] == requested


def test_secured_drops_an_inner_request_id_with_no_vary_and_skips_empty_vary_fields() -> None:
    ours = (b"x-request-id", b"ours")

    only_inner_id = secured([(b"x-request-id", b"inner"), (b"content-type", b"text/plain")], ours)
    trailing_comma = secured([(b"vary", b"Origin,, Accept,")], ours)

    assert [v for k, v in only_inner_id if k == b"x-request-id"] == [b"ours"]
    assert not any(k == b"vary" for k, _ in only_inner_id)
    assert [v for k, v in trailing_comma if k == b"vary"] == [b"Origin, Accept"]


def test_rotating_a_token_no_key_decrypts_is_refused() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    ciphertext = TokenCipher([old]).encrypt("pina_secret")

    assert TokenCipher([new, old]).key_count == 2
    assert TokenCipher([new]).key_index(ciphertext) is None
    with pytest.raises(TokenDecryptionError):
        TokenCipher([new]).rotate(ciphertext)
    rotated = TokenCipher([new, old]).rotate(ciphertext)
    assert TokenCipher([new]).decrypt(rotated) == "pina_secret"
