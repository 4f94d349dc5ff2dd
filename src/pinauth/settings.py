"""Configuration, read from the environment and an optional `.env` file.

Settings are built once by the entry point and passed into `create_app`; nothing
reads the environment at import time, so tests can build as many apps as they like.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urljoin, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pinauth.errors import ConfigurationError

MIN_SECRET_KEY_LENGTH = 32

# Pinterest retired the v1 scopes; sending one gets the whole authorize request refused.
DEAD_V1_SCOPES = frozenset(
    {"read_public", "write_public", "read_relationships", "write_relationships"}
)

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        # No setting means "forever" by infinity: an infinite timeout or interval is a
        # typo or a misunderstanding, and one (PINAUTH_KEEPER_INTERVAL=inf) silently
        # stopped the keeper.
        allow_inf_nan=False,
    )

    # Each field's validation_alias is its environment variable; populate_by_name lets
    # code and tests pass the field name instead.

    client_id: str = Field("", validation_alias="PINTEREST_CLIENT_ID")
    client_secret: SecretStr = Field(SecretStr(""), validation_alias="PINTEREST_CLIENT_SECRET")
    redirect_uri: str = Field(
        "http://localhost:8000/auth/callback",
        validation_alias="PINTEREST_REDIRECT_URI",
    )
    scopes: CommaList = Field(
        ["user_accounts:read", "boards:read", "pins:read"],
        validation_alias="PINTEREST_SCOPES",
    )
    authorize_url: str = Field(
        "https://www.pinterest.com/oauth/",
        validation_alias="PINTEREST_AUTHORIZE_URL",
    )
    api_url: str = Field("https://api.pinterest.com/v5", validation_alias="PINTEREST_API_URL")

    database_url: str = Field(
        "sqlite+aiosqlite:///./pinauth.db", validation_alias="PINAUTH_DATABASE_URL"
    )
    # How long a request may wait for a free pooled connection, or to connect (PostgreSQL;
    # asyncpg alone would wait 60 s), before it answers 503 database_unavailable.
    database_timeout_seconds: float = Field(5.0, gt=0, validation_alias="PINAUTH_DATABASE_TIMEOUT")
    secret_key: SecretStr = Field(SecretStr(""), validation_alias="PINAUTH_SECRET_KEY")
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], validation_alias="PINAUTH_ENCRYPTION_KEYS"
    )
    frontend_url: str = Field("/", validation_alias="PINAUTH_FRONTEND_URL")
    cors_origins: CommaList = Field([], validation_alias="PINAUTH_CORS_ORIGINS")
    # GET / serves the demo page (a working frontend with a "Create board" form) only
    # when asked to; `pinauth serve --demo` does. Otherwise / is a JSON index.
    demo_page: bool = Field(False, validation_alias="PINAUTH_DEMO_PAGE")
    # Redirect a browser that reaches / or /auth/login by another host name to the
    # redirect URI's, so the login cookie and the callback share one origin. Off only
    # for a reverse proxy that cannot pass the public Host header on.
    canonical_redirect: bool = Field(True, validation_alias="PINAUTH_CANONICAL_REDIRECT")

    session_max_age_seconds: int = Field(
        30 * 24 * 3600, gt=0, validation_alias="PINAUTH_SESSION_MAX_AGE"
    )
    state_max_age_seconds: int = Field(600, gt=0, le=600, validation_alias="PINAUTH_STATE_MAX_AGE")
    # How long a connect session minted by the app's backend stays usable.
    connect_session_ttl_seconds: int = Field(
        1800, gt=0, le=86400, validation_alias="PINAUTH_CONNECT_SESSION_TTL"
    )
    # How long the app's backend has to confirm a connect session's login
    # (POST /v1/connections/confirm) before the pending connection is deleted.
    connect_result_ttl_seconds: int = Field(
        600, gt=0, le=86400, validation_alias="PINAUTH_CONNECT_RESULT_TTL"
    )
    # Refresh this long before the access token expires, so a request never races expiry.
    refresh_margin_seconds: int = Field(300, ge=0, validation_alias="PINAUTH_REFRESH_MARGIN")
    http_connect_timeout: float = Field(5.0, gt=0, validation_alias="PINAUTH_HTTP_CONNECT_TIMEOUT")
    http_read_timeout: float = Field(30.0, gt=0, validation_alias="PINAUTH_HTTP_READ_TIMEOUT")
    http_pool_timeout: float = Field(5.0, gt=0, validation_alias="PINAUTH_HTTP_POOL_TIMEOUT")
    # How long a request waits for another replica's refresh of the same connection.
    refresh_lock_timeout_seconds: float = Field(
        10.0, gt=0, validation_alias="PINAUTH_REFRESH_LOCK_TIMEOUT"
    )
    # A refresh's lease on its connection lasts this long and is renewed every third of
    # it while the token call is in flight, so a process killed mid-refresh holds the
    # connection (callers get 503) for at most this long.
    refresh_lease_seconds: float = Field(
        15.0, ge=3, le=60, validation_alias="PINAUTH_REFRESH_LEASE"
    )
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, validation_alias="PINAUTH_MAX_BODY_BYTES")
    # Proxied request bodies this process holds at once, from their first byte read until
    # Pinterest has answered; past it, 503 busy (with Retry-After) before a body is read.
    max_inflight_body_bytes: int = Field(
        64 * 1024 * 1024, gt=0, validation_alias="PINAUTH_MAX_INFLIGHT_BODY_BYTES"
    )
    # The request line and headers together; beyond this the server answers 431 before
    # the app sees the request (an ASGI app only hears of a request once it is parsed).
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, validation_alias="PINAUTH_MAX_HEADER_BYTES"
    )
    # A client has this long from its request's first byte (or from connecting) to send
    # all of it, line, headers and body; then 408. Trickling a byte now and then does not
    # reset it: slow senders cannot hold connections and buffers open.
    request_read_timeout_seconds: float = Field(
        30.0, gt=0, validation_alias="PINAUTH_REQUEST_READ_TIMEOUT"
    )
    # A new connection has this long to send its request's first byte (at most the read
    # timeout), or it is closed without a word: idle sockets cannot pile up.
    first_byte_timeout_seconds: float = Field(
        5.0, gt=0, validation_alias="PINAUTH_FIRST_BYTE_TIMEOUT"
    )
    # Connections from one client address that have not sent a whole request head yet;
    # beyond this, a new one from that address is closed at once.
    max_pending_per_client: int = Field(64, ge=1, validation_alias="PINAUTH_MAX_PENDING_PER_CLIENT")
    # Automatic retries of idempotent proxied calls on 429/502/503/504 and connection errors.
    max_retries: int = Field(2, ge=0, le=10, validation_alias="PINAUTH_MAX_RETRIES")
    # Total seconds a proxied call may spend waiting between retries (incl. Retry-After).
    retry_budget_seconds: float = Field(10.0, ge=0, validation_alias="PINAUTH_RETRY_BUDGET")
    # How long a process trusts its cached session and connection before re-reading the
    # database: bounds how late another replica's logout or disconnect is noticed here.
    cache_ttl_seconds: float = Field(5.0, ge=0, validation_alias="PINAUTH_CACHE_TTL")
    # Rows anyone can make are bounded, the oldest evicted (see the README's security notes):
    # a browser's sessions per Pinterest connection, and logins started but not finished.
    max_sessions_per_connection: int = Field(
        20, ge=1, validation_alias="PINAUTH_MAX_SESSIONS_PER_CONNECTION"
    )
    max_pending_logins: int = Field(10_000, ge=1, validation_alias="PINAUTH_MAX_PENDING_LOGINS")
    # How often each process deletes expired sessions and pending logins.
    purge_interval_seconds: float = Field(600.0, gt=0, validation_alias="PINAUTH_PURGE_INTERVAL")
    # The keeper (keeper.py): a background task of `pinauth serve` (or `pinauth keeper`)
    # that refreshes connections whose refresh token expires within PINAUTH_KEEPALIVE_DAYS,
    # waking every PINAUTH_KEEPER_INTERVAL seconds, at most PINAUTH_KEEPER_CONCURRENCY
    # refreshes at a time per process. Refresh tokens live 60 days.
    keeper: bool = Field(True, validation_alias="PINAUTH_KEEPER")
    # Finite: an interval of inf would make the keeper never wake.
    keeper_interval_seconds: float = Field(600.0, ge=1, validation_alias="PINAUTH_KEEPER_INTERVAL")
    keepalive_days: int = Field(14, validation_alias="PINAUTH_KEEPALIVE_DAYS")
    keeper_concurrency: int = Field(4, ge=1, le=100, validation_alias="PINAUTH_KEEPER_CONCURRENCY")
    # /boards?all=true stops after this many pages (and returns the bookmark to go on).
    boards_max_pages: int = Field(20, ge=1, le=1000, validation_alias="PINAUTH_BOARDS_MAX_PAGES")
    log_level: str = Field("info", validation_alias="PINAUTH_LOG_LEVEL")
    access_log: bool = Field(True, validation_alias="PINAUTH_ACCESS_LOG")
    log_format: Literal["json", "text"] = Field("json", validation_alias="PINAUTH_LOG_FORMAT")
    # If set, GET /metrics requires `Authorization: Bearer <this>`.
    metrics_token: SecretStr = Field(SecretStr(""), validation_alias="PINAUTH_METRICS_TOKEN")
    # On SIGTERM, in-flight requests get this long to finish before the process exits.
    shutdown_timeout_seconds: int = Field(20, ge=0, validation_alias="PINAUTH_SHUTDOWN_TIMEOUT")
    # Comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto to trust
    # (uvicorn's forwarded_allow_ips). Empty: nobody's, and no per-request cost.
    forwarded_allow_ips: str = Field("", validation_alias="PINAUTH_FORWARDED_ALLOW_IPS")
    # FastAPI's native OpenTelemetry hooks; they cost an environment lookup per request.
    opentelemetry: bool = Field(False, validation_alias="PINAUTH_OPENTELEMETRY")
    # Lifecycle webhooks (webhooks.py): where events are POSTed, and the secrets that sign
    # them, comma-separated; the first signs, all are listed while a secret is rotated.
    webhook_url: str = Field("", validation_alias="PINAUTH_WEBHOOK_URL")
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        [], validation_alias="PINAUTH_WEBHOOK_SECRETS"
    )
    # One delivery attempt, connecting and waiting for the answer's status line included;
    # a slower receiver counts as down and is retried later.
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=60, validation_alias="PINAUTH_WEBHOOK_TIMEOUT"
    )
    # Deliveries one dispatcher has in flight at once, each independent of the others: a
    # slow receiver path holds one slot (per connection it is slow for), not the rest.
    webhook_concurrency: int = Field(
        8, ge=1, le=100, validation_alias="PINAUTH_WEBHOOK_CONCURRENCY"
    )

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> Settings:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"PINAUTH_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes}) is below "
                f"PINAUTH_MAX_BODY_BYTES ({self.max_body_bytes}): a body of the largest "
                "accepted size would always be refused as busy"
            )
        return self

    @field_validator("scopes", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("encryption_keys", "webhook_secrets", mode="before")
    @classmethod
    def _comma_separated_secrets(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return _split_commas(value)

    @field_validator("keepalive_days")
    @classmethod
    def _within_refresh_token_life(cls, days: int) -> int:
        if not 1 <= days <= 59:
            raise ValueError(
                f"{days} is outside 1-59: refresh tokens live 60 days, so the keeper must "
                "refresh at least a day before they expire"
            )
        return days

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(
                    f"{origin!r} is not an origin; write it as scheme://host[:port] "
                    "with no path or trailing slash"
                )
        return origins

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str) -> str:
        url = url.strip()
        if not url:
            return url
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed [IPv6 address
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{url!r} is not an http(s) URL; webhooks are POSTed to an absolute "
                "http:// or https:// address"
            )
        # What no request can ever reach: refused now rather than failing every delivery.
        if any(not c.isprintable() for c in url):
            raise ValueError(f"{url!r} holds a control character")
        host = parts.hostname or ""
        if not host or any(c.isspace() or c in "%<>" for c in host):
            raise ValueError(f"{url!r} has no usable host name; check the address for typos")
        try:
            port = parts.port
        except ValueError:  # beyond 65535, or not a number
            port = 0
        if port == 0:
            raise ValueError(f"{url!r} has no usable port; a port is a number from 1 to 65535")
        return url

    @field_validator("webhook_secrets")
    @classmethod
    def _webhook_secrets(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        for position, secret in enumerate(secrets, start=1):
            if len(secret.get_secret_value()) < MIN_SECRET_KEY_LENGTH:
                raise ValueError(
                    f"secret #{position} is shorter than {MIN_SECRET_KEY_LENGTH} characters; "
                    "generate one with: "
                    'python -c "import secrets; print(secrets.token_urlsafe(48))"'
                )
        return secrets

    @field_validator("scopes")
    @classmethod
    def _v5_scopes(cls, scopes: list[str]) -> list[str]:
        dead = sorted(DEAD_V1_SCOPES.intersection(scopes))
        if dead:
            raise ValueError(
                f"{', '.join(dead)} are Pinterest v1 scopes that v5 rejects; "
                "use v5 names such as boards:read or pins:read"
            )
        if not scopes:
            raise ValueError("at least one scope is required")
        return scopes

    @field_validator("api_url", "authorize_url")
    @classmethod
    def _absolute_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed [IPv6 address
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} must be an absolute http(s) URL")
        return url

    @field_validator("api_url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @property
    def token_url(self) -> str:
        return f"{self.api_url}/oauth/token"

    @property
    def login_url(self) -> str:
        # The callback sits beside the login route, so this also works under a path prefix.
        return urljoin(self.redirect_uri, "login")

    @property
    def secure_cookies(self) -> bool:
        return self.redirect_uri.startswith("https://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def validate_for_serving(self) -> None:
        """Refuse configurations that would run but be unsafe or unable to keep tokens."""
        problems = self.serving_problems()
        if problems:
            raise ConfigurationError("\n".join(problems))

    def serving_problems(self) -> list[str]:
        """What makes these settings unsafe to serve with, one fix per line."""
        problems: list[str] = []
        secret = self.secret_key.get_secret_value()
        if len(secret) < MIN_SECRET_KEY_LENGTH:
            problems.append(
                f"PINAUTH_SECRET_KEY is {'missing' if not secret else 'too short'}: it signs "
                f"session cookies and OAuth state and needs at least {MIN_SECRET_KEY_LENGTH} "
                "random characters. Generate one with: "
                'python -c "import secrets; print(secrets.token_urlsafe(48))"'
            )
        if not self.encryption_keys:
            problems.append(
                "PINAUTH_ENCRYPTION_KEYS is missing: tokens are encrypted at rest with it. "
                "Generate a key with: python -c "
                '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
            )
        if self.webhook_url and not self.webhook_secrets:
            problems.append(
                "PINAUTH_WEBHOOK_URL is set but PINAUTH_WEBHOOK_SECRETS is not: every webhook "
                f"is signed. Set at least one secret of {MIN_SECRET_KEY_LENGTH}+ characters."
            )
        return problems
