"""Configuration from the environment, and encryption key rotation."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from pinauth.crypto import TokenCipher, TokenDecryptionError
from pinauth.settings import Settings


def test_environment_variables_are_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "PINTEREST_CLIENT_ID": "cid",
        "PINTEREST_CLIENT_SECRET": "csecret",
        "PINTEREST_REDIRECT_URI": "https://auth.example.com/auth/callback",
        "PINTEREST_SCOPES": "boards:read, pins:read ,boards:write",
        "PINTEREST_AUTHORIZE_URL": "https://www.pinterest.com/oauth/",
        "PINTEREST_API_URL": "https://api-sandbox.pinterest.com/v5/",
        "PINAUTH_DATABASE_URL": "postgresql+asyncpg://u@db/pinauth",
        "PINAUTH_SECRET_KEY": "s" * 40,
        "PINAUTH_ENCRYPTION_KEYS": "k1,k2",
        "PINAUTH_FRONTEND_URL": "https://app.example.com/",
        "PINAUTH_CORS_ORIGINS": "https://app.example.com,http://localhost:3000",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = Settings(_env_file=None)

    assert settings.client_id == "cid"
    assert settings.client_secret.get_secret_value() == "csecret"
    assert settings.scopes == ["boards:read", "pins:read", "boards:write"]
    assert settings.api_url == "https://api-sandbox.pinterest.com/v5"
    assert settings.token_url == "https://api-sandbox.pinterest.com/v5/oauth/token"
    assert [k.get_secret_value() for k in settings.encryption_keys] == ["k1", "k2"]
    assert settings.cors_origins == ["https://app.example.com", "http://localhost:3000"]
    assert settings.secure_cookies
    assert settings.login_url == "https://auth.example.com/auth/login"
    assert "csecret" not in repr(settings)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PINTEREST_SCOPES", "PINAUTH_DATABASE_URL", "PINTEREST_API_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.scopes == ["user_accounts:read", "boards:read", "pins:read"]
    assert settings.database_url == "sqlite+aiosqlite:///./pinauth.db"
    assert settings.token_url == "https://api.pinterest.com/v5/oauth/token"
    assert settings.redirect_uri == "http://localhost:8000/auth/callback"
    assert settings.frontend_url == "/"
    assert settings.cors_origins == []


def test_dead_v1_scope_is_refused() -> None:
    with pytest.raises(ValidationError, match="read_public"):
        Settings(_env_file=None, scopes="read_public,boards:read")


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "*"])
def test_cors_origins_must_be_exact_origins(origin: str) -> None:
    with pytest.raises(ValidationError, match="not an origin"):
        Settings(_env_file=None, cors_origins=origin)


def test_encryption_keys_rotate() -> None:
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stored = TokenCipher([old_key]).encrypt("pina_token")

    rotated = TokenCipher([new_key, old_key])
    assert rotated.decrypt(stored) == "pina_token"  # old tokens still read
    fresh = rotated.encrypt("pina_new")
    assert TokenCipher([new_key]).decrypt(fresh) == "pina_new"  # new ones use the first key
    with pytest.raises(TokenDecryptionError):
        TokenCipher([new_key]).decrypt(stored)


def test_keeper_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PINAUTH_KEEPER", "PINAUTH_KEEPER_INTERVAL", "PINAUTH_KEEPALIVE_DAYS"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings(_env_file=None)
    assert (defaults.keeper, defaults.keeper_interval_seconds, defaults.keepalive_days) == (
        True,
        600,
        14,
    )
    monkeypatch.setenv("PINAUTH_KEEPER", "false")
    monkeypatch.setenv("PINAUTH_KEEPER_INTERVAL", "1")
    monkeypatch.setenv("PINAUTH_KEEPALIVE_DAYS", "59")
    settings = Settings(_env_file=None)
    assert (settings.keeper, settings.keeper_interval_seconds, settings.keepalive_days) == (
        False,
        1,
        59,
    )
    for name, value in (("PINAUTH_KEEPALIVE_DAYS", "60"), ("PINAUTH_KEEPER_INTERVAL", "0.5")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match="PINAUTH_KEEP"):
            Settings(_env_file=None)
        monkeypatch.setenv(name, "1")


@pytest.mark.parametrize(
    "name",
    [
        "PINAUTH_KEEPER_INTERVAL",
        "PINAUTH_CACHE_TTL",
        "PINAUTH_DATABASE_TIMEOUT",
        "PINAUTH_HTTP_READ_TIMEOUT",
        "PINAUTH_RETRY_BUDGET",
        "PINAUTH_PURGE_INTERVAL",
        "PINAUTH_REFRESH_LOCK_TIMEOUT",
        "PINAUTH_REQUEST_READ_TIMEOUT",
        "PINAUTH_WEBHOOK_TIMEOUT",
    ],
)
@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "1e309"])
def test_intervals_must_be_finite(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """An interval of inf made the keeper never wake (and cached entries never expire);
    no timeout, interval or budget means "forever" by infinity."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=rf"(?s){name}.*finite number"):
        Settings(_env_file=None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://exa mple.com/", "has no usable host name"),
        ("http://:8080/hook", "has no usable host name"),
        ("http://user@/hook", "has no usable host name"),
        ("http://127.0.0.1:99999/hook", "has no usable port"),
        ("http://127.0.0.1:0/hook", "has no usable port"),
        ("http://app.example:http/hook", "has no usable port"),
        ("http://app\texample/hook", "holds a control character"),
        ("http://[::1/hook", r"is not an http\(s\) URL"),
    ],
)
def test_a_webhook_url_that_can_never_work_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.setenv("PINAUTH_WEBHOOK_URL", url)
    with pytest.raises(ValidationError, match=rf"(?s)PINAUTH_WEBHOOK_URL.*{message}"):
        Settings(_env_file=None)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:65535/hook", "https://[::1]:8443/hook", "https://app.example/a b"]
)
def test_webhook_urls_that_can_work_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("PINAUTH_WEBHOOK_URL", url)
    assert Settings(_env_file=None).webhook_url == url
