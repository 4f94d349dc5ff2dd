"""Demo-mode settings: pinauth wired to its own sandbox."""

from __future__ import annotations

import pytest

from pinauth.demo import demo_settings
from pinauth.sandbox.pages import page_policy
from pinauth.settings import Settings


@pytest.mark.parametrize(
    ("host", "browser", "itself"),
    [
        ("127.0.0.1", "http://localhost:8000", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://localhost:8000", "http://127.0.0.1:8000"),
        ("10.1.2.3", "http://10.1.2.3:8000", "http://10.1.2.3:8000"),
    ],
)
def test_demo_settings_point_at_the_mounted_sandbox(host: str, browser: str, itself: str) -> None:
    settings, sandbox = demo_settings(Settings(_env_file=None), host, 8000)

    assert settings.authorize_url == f"{browser}/sandbox/oauth/"
    assert settings.redirect_uri == f"{browser}/auth/callback"
    assert sandbox.redirect_uris == (settings.redirect_uri,)
    assert settings.api_url == f"{itself}/sandbox/v5"
    assert settings.client_id == sandbox.client_id
    assert settings.client_secret.get_secret_value() == sandbox.client_secret
    assert settings.scopes == [
        "user_accounts:read",
        "boards:read",
        "pins:read",
        "boards:write",
        "pins:write",
    ]
    assert settings.demo_page  # / is the demo page only in demo mode
    assert sandbox.landing_origins == ()
    settings.validate_for_serving()  # temporary keys fill in what is missing


def test_the_demo_consent_page_lets_the_browser_on_to_a_frontend_elsewhere() -> None:
    """Guards the sandbox's form-action for a frontend on another origin: Chromium checks
    it on every redirect after the consent form, the callback's on to the frontend too."""
    configured = Settings(
        _env_file=None,
        PINAUTH_FRONTEND_URL="http://localhost:5173/app/",
        PINAUTH_CORS_ORIGINS="http://localhost:5174",
    )
    _, sandbox = demo_settings(configured, "127.0.0.1", 8000)
    policy = page_policy((*sandbox.redirect_uris, *sandbox.landing_origins))

    assert "form-action 'self' http://localhost:5173 http://localhost:5174 " in policy + " "
