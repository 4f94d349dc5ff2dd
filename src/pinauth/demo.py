"""Demo mode: pinauth wired to its own sandbox, so it works with no Pinterest credentials."""

from __future__ import annotations

import json
import logging
import secrets
from collections import deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import SecretStr

from pinauth.sandbox import SandboxConfig
from pinauth.settings import Settings
from pinauth.webhooks import verify

# Where demo mode points its webhooks: a receiver built into the service itself.
DEMO_RECEIVER_PATH = "/demo/webhooks"
# What the demo page can show; older deliveries drop off.
DEMO_RECEIVER_KEEP = 50

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "/sandbox"
DEMO_DATABASE_URL = "sqlite+aiosqlite:///./pinauth-demo.db"


_LOCAL_OR_ANY = ("127.0.0.1", "0.0.0.0", "::", "localhost")


def public_base_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches the service.

    One name for every browser-facing URL matters: the login cookie set on `localhost`
    is not sent to `127.0.0.1`, so a mix would fail every state check.
    """
    return f"http://{'localhost' if host in _LOCAL_OR_ANY else host}:{port}"


def loopback_hosts(host: str, port: int) -> tuple[str, ...]:
    """The Host headers a client on this machine reaches a server bound to `host` with."""
    if host in _LOCAL_OR_ANY:
        return (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}")
    return (f"{host}:{port}",)


def self_url(host: str, port: int) -> str:
    """Where the service reaches itself: loopback, unless bound to one specific address."""
    return f"http://{'127.0.0.1' if host in _LOCAL_OR_ANY else host}:{port}"


def demo_settings(settings: Settings, host: str, port: int) -> tuple[Settings, SandboxConfig]:
    base = public_base_url(host, port)
    redirect_uri = f"{base}/auth/callback"
    frontend = urlsplit(settings.frontend_url)
    landing = [f"{frontend.scheme}://{frontend.netloc}"] if frontend.netloc else []
    sandbox = SandboxConfig(
        redirect_uris=(redirect_uri,),
        landing_origins=(*landing, *settings.cors_origins),
        # The controls, like every demo route, answer on the demo's public host only.
        control_hosts=(urlsplit(base).netloc,),
    )
    updates: dict[str, object] = {
        "client_id": sandbox.client_id,
        "client_secret": SecretStr(sandbox.client_secret),
        "redirect_uri": redirect_uri,
        "authorize_url": f"{base}{SANDBOX_PREFIX}/oauth/",
        # pinauth calls its own sandbox over HTTP, like it would call Pinterest.
        "api_url": f"{self_url(host, port)}{SANDBOX_PREFIX}/v5",
        # The demo page creates boards; a backend posts pins.
        "scopes": list(dict.fromkeys([*settings.scopes, "boards:write", "pins:write"])),
        "demo_page": True,
    }
    if "database_url" not in settings.model_fields_set:
        # Keep demo connections out of the database real ones will use.
        updates["database_url"] = DEMO_DATABASE_URL
    if len(settings.secret_key.get_secret_value()) < 32:
        log.warning("demo mode: no PINAUTH_SECRET_KEY, using a temporary one")
        updates["secret_key"] = SecretStr(secrets.token_urlsafe(48))
    if not settings.encryption_keys:
        log.warning("demo mode: no PINAUTH_ENCRYPTION_KEYS, using a temporary one")
        updates["encryption_keys"] = [SecretStr(Fernet.generate_key().decode())]
    if not settings.webhook_url:
        # The demo page shows lifecycle events with nothing to set up: they go to a
        # receiver inside this very service, signed and verified as a real one would be.
        updates["webhook_url"] = f"{self_url(host, port)}{DEMO_RECEIVER_PATH}"
        if not settings.webhook_secrets:
            updates["webhook_secrets"] = [SecretStr(secrets.token_urlsafe(48))]
    return settings.model_copy(update=updates), sandbox


class DemoReceiver:
    """The demo's webhook receiver: verifies each delivery and keeps the latest few."""

    def __init__(self, settings: Settings) -> None:
        self._secrets = [s.get_secret_value() for s in settings.webhook_secrets]
        self._events: deque[dict[str, Any]] = deque(maxlen=DEMO_RECEIVER_KEEP)

    def receive(self, body: bytes, signature: str | None) -> bool:
        """Keep a delivery if its signature verifies; False if it does not."""
        if not verify(body, signature, self._secrets):
            return False
        event = json.loads(body)
        # Delivery is at least once: a repeated id is the same event.
        if any(kept["id"] == event["id"] for kept in self._events):
            return True
        connection = event["data"]["connection"]
        self._events.appendleft(
            {
                "id": event["id"],
                "type": event["type"],
                "created_at": event["created_at"],
                "received_at": datetime.now(UTC).isoformat(),
                "connection": {
                    key: connection.get(key) for key in ("id", "username", "status", "end_user_id")
                },
            }
        )
        return True

    def events(self) -> list[dict[str, Any]]:
        """Newest first."""
        return list(self._events)
