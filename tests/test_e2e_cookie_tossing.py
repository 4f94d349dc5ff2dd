"""Cookie tossing in Debian's Chromium: a page on a sibling subdomain sets `Domain=` cookies.

pinauth is deployed at auth.example.test and the attacker has a page at evil.example.test,
both resolved to loopback by Chromium's host resolver rules, so the browser applies its
real cookie rules across the two names (one registrable domain, example.test). The page
sets `pinauth_session` or `pinauth_login` for all of example.test; the victim's next
request to pinauth carries two of that cookie, and is refused with 400
`ambiguous_session` instead of acting for the attacker's connection or finishing the
attacker's login. Over https (a self-signed certificate Chromium is told to accept) the
cookies are `__Host-` ones: Chromium refuses the sibling's `Domain=` one outright, and the
plain-named one it can set is not read by pinauth.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pinauth.sandbox import SandboxConfig
from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PinauthProcess,
    clean_env,
    free_port,
    require_chromium,
    wait_until_serving,
)

require_chromium()

playwright_sync = pytest.importorskip("playwright.sync_api")

DOMAIN = "example.test"
AMBIGUOUS = "ambiguous_session"


@dataclass(frozen=True)
class Sites:
    pinauth: str  # http://auth.example.test:<port>, pinauth's public origin
    evil: str  # http://evil.example.test:<port>, the attacker's sibling subdomain


@contextmanager
def sibling_page(port: int, tls: ssl.SSLContext | None = None) -> Iterator[None]:
    """The attacker's site: an empty page, from which the test runs the page's script."""
    page = b"<!doctype html><title>A sibling subdomain</title><p>nothing to see</p>"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name for it
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    """`pinauth serve` at auth.example.test (its sandbox on 127.0.0.1), and evil.example.test."""
    tmp_path: Path = tmp_path_factory.mktemp("tossing")
    port, sandbox_port, evil_port = free_port(), free_port(), free_port()
    pinauth = f"http://auth.{DOMAIN}:{port}"
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    config = SandboxConfig()
    sandbox = PinauthProcess(
        ["sandbox", "--port", str(sandbox_port), "--redirect-uri", f"{pinauth}/auth/callback"],
        clean_env(),
        tmp_path,
        f"{sandbox_url}/_sandbox/counters",
    )
    env = clean_env(
        PINTEREST_CLIENT_ID=config.client_id,
        PINTEREST_CLIENT_SECRET=config.client_secret,
        PINTEREST_REDIRECT_URI=f"{pinauth}/auth/callback",
        PINTEREST_AUTHORIZE_URL=f"{sandbox_url}/oauth/",
        PINTEREST_API_URL=f"{sandbox_url}/v5",
        PINAUTH_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'tossing.db'}",
        PINAUTH_SECRET_KEY="tossing-test-secret-" + "t" * 32,
        PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )
    service = PinauthProcess(
        ["serve", "--port", str(port)], env, tmp_path, f"http://127.0.0.1:{port}/healthz"
    )
    try:
        sandbox.start()
        service.start()
        with sibling_page(evil_port):
            yield Sites(pinauth=pinauth, evil=f"http://evil.{DOMAIN}:{evil_port}")
    finally:
        service.stop()
        sandbox.stop()
        print(service.output())  # pytest shows it when a test failed


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for auth. and evil.example.test (Chromium is told to accept it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{DOMAIN}")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(f"auth.{DOMAIN}"), x509.DNSName(f"evil.{DOMAIN}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# pinauth as `pinauth serve` runs it (migration, pinauth's uvicorn options), over TLS.
SERVE_TLS = """
import sys, uvicorn
from pinauth import preflight
from pinauth.app import create_app
from pinauth.server import uvicorn_options
from pinauth.settings import Settings
settings = Settings()
preflight.migrate(settings)
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3], **uvicorn_options(settings))
"""


@pytest.fixture(scope="module")
def https_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    """pinauth at https://auth.example.test (so its cookies are Secure and `__Host-`), and an
    https page at evil.example.test, which may set Secure cookies too."""
    tmp_path: Path = tmp_path_factory.mktemp("tossing-https")
    cert, key = self_signed(tmp_path)
    port, sandbox_port, evil_port = free_port(), free_port(), free_port()
    pinauth = f"https://auth.{DOMAIN}:{port}"
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    config = SandboxConfig()
    sandbox = PinauthProcess(
        ["sandbox", "--port", str(sandbox_port), "--redirect-uri", f"{pinauth}/auth/callback"],
        clean_env(),
        tmp_path,
        f"{sandbox_url}/_sandbox/counters",
    )
    env = clean_env(
        PINTEREST_CLIENT_ID=config.client_id,
        PINTEREST_CLIENT_SECRET=config.client_secret,
        PINTEREST_REDIRECT_URI=f"{pinauth}/auth/callback",
        PINTEREST_AUTHORIZE_URL=f"{sandbox_url}/oauth/",
        PINTEREST_API_URL=f"{sandbox_url}/v5",
        PINAUTH_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'tossing.db'}",
        PINAUTH_SECRET_KEY="tossing-test-secret-" + "t" * 32,
        PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    sandbox.start()
    service = subprocess.Popen(
        [sys.executable, "-c", SERVE_TLS, str(port), str(cert), str(key)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(f"https://127.0.0.1:{port}/healthz", service, verify=False)
        with sibling_page(evil_port, tls):
            yield Sites(pinauth=pinauth, evil=f"https://evil.{DOMAIN}:{evil_port}")
    finally:
        service.kill()
        print(service.communicate()[0])  # pytest shows it when a test failed
        sandbox.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                *CHROMIUM_ARGS,
                f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
                "--ignore-certificate-errors",  # the test's self-signed certificate
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def new_page(chromium: Any) -> Any:
    """A page in a browser profile of its own (its own cookies)."""
    page = chromium.new_context().new_page()
    page.set_default_timeout(15_000)
    return page


def to_consent(page: Any, sites: Sites, username: str) -> None:
    """From /auth/login to the sandbox's consent page, `username` chosen."""
    page.goto(f"{sites.pinauth}/auth/login")
    playwright_sync.expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
    page.get_by_label(username).check()


def log_in(page: Any, sites: Sites, username: str) -> None:
    to_consent(page, sites, username)
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(f"{sites.pinauth}/")
    assert me(page, sites) == (200, username)


def approved_login(sites: Sites, username: str) -> tuple[str, str]:
    """The attacker's own login up to Pinterest's redirect, which it does not follow: its
    login cookie, and the callback URL (code and state) that would finish the login."""
    public = urlsplit(sites.pinauth)
    with httpx.Client(
        base_url=f"http://127.0.0.1:{public.port}", headers={"Host": public.netloc}
    ) as attacker:
        login = attacker.get("/auth/login")
        assert login.status_code == 302, login.text
        nonce = login.cookies["pinauth_login"]
        consent = urlsplit(login.headers["location"])
        fields = {k: v[0] for k, v in parse_qs(consent.query).items() if k != "response_type"}
        decision = httpx.post(
            consent._replace(query="").geturl(),
            data=fields | {"decision": "allow", "account": username},
        )
    callback = decision.headers["location"]
    assert callback.startswith(f"{sites.pinauth}/auth/callback?code="), callback
    return nonce, callback


def me(page: Any, sites: Sites) -> tuple[int, str]:
    """GET /me in the page's browser: its status, and the username or the error code."""
    response = page.goto(f"{sites.pinauth}/me")
    body = json.loads(page.locator("body").inner_text())
    return response.status, body.get("username") or body["error"]


def cookie(page: Any, name: str) -> str:
    [found] = [c["value"] for c in page.context.cookies() if c["name"] == name]
    return str(found)


def set_for_the_domain(page: Any, sites: Sites, name: str, value: str) -> None:
    """The attacker's page, opened in the victim's browser, sets a cookie for the whole
    registrable domain (Secure when the page is https)."""
    page.goto(f"{sites.evil}/")
    page.evaluate(
        "([name, value, domain]) => { document.cookie = `${name}=${value}; Domain=${domain}; "
        "Path=/; Max-Age=600${location.protocol === 'https:' ? '; Secure' : ''}`; }",
        [name, value, DOMAIN],
    )


def toss(page: Any, sites: Sites, name: str, value: str) -> None:
    """The cookie tossed: Chromium keeps it beside pinauth's own host-only one."""
    set_for_the_domain(page, sites, name, value)
    jar = [c for c in page.context.cookies() if c["name"] == name]
    assert sorted(c["domain"] for c in jar) == [f".{DOMAIN}", f"auth.{DOMAIN}"], jar


def test_a_tossed_session_cookie_is_refused_not_served(chromium: Any, sites: Sites) -> None:
    """Guards the duplicate check against the real thing: the victim's requests carry the
    attacker's session cookie beside their own, and pinauth serves neither (without the
    check, Starlette kept the last, the attacker's, and the victim saw its account)."""
    attacker = new_page(chromium)
    log_in(attacker, sites, "sandbox_studio")
    victim = new_page(chromium)
    log_in(victim, sites, "sandbox_pinner")

    toss(victim, sites, "pinauth_session", cookie(attacker, "pinauth_session"))

    assert me(victim, sites) == (400, AMBIGUOUS)
    # The proxy too (its fast path): the victim's boards are not the attacker's.
    boards = victim.goto(f"{sites.pinauth}/pinterest/boards")
    assert boards.status == 400
    assert json.loads(victim.locator("body").inner_text())["error"] == AMBIGUOUS
    # The attacker's own browser is unaffected, and so is the victim's session once the
    # tossed cookie is gone.
    assert me(attacker, sites) == (200, "sandbox_studio")
    victim.context.clear_cookies(domain=f".{DOMAIN}")
    assert me(victim, sites) == (200, "sandbox_pinner")


def test_a_tossed_login_cookie_does_not_finish_the_attackers_login(
    chromium: Any, sites: Sites
) -> None:
    """Guards the duplicate check on the login cookie: the attacker approves a login on
    Pinterest, stops before the callback, tosses its login cookie into the victim's browser
    (which has a login of its own under way) and sends the victim to its callback URL."""
    nonce, callback = approved_login(sites, "sandbox_studio")

    victim = new_page(chromium)
    victim.goto(f"{sites.pinauth}/auth/login")  # the victim's own login, under way
    playwright_sync.expect(
        victim.get_by_role("heading", name="Connect to Pinterest")
    ).to_be_visible()
    toss(victim, sites, "pinauth_login", nonce)

    response = victim.goto(callback)
    assert response.status == 400
    assert json.loads(victim.locator("body").inner_text())["error"] == AMBIGUOUS
    assert not [c for c in victim.context.cookies() if c["name"] == "pinauth_session"]
    assert me(victim, sites) == (401, "not_authenticated")


# --- https: __Host- cookies, which no sibling can set -----------------------------------


def test_over_https_a_sibling_cannot_toss_a_session_cookie_at_all(
    chromium: Any, https_sites: Sites
) -> None:
    """Guards the `__Host-` names in Chromium: the sibling page's `__Host-pinauth_session`
    with `Domain=` is dropped by the browser, and the plain `pinauth_session` it can set is
    not read by pinauth, so the victim stays the victim, and is not even locked out
    (with plain names over https the toss would make every request ambiguous)."""
    sites = https_sites
    attacker = new_page(chromium)
    log_in(attacker, sites, "sandbox_studio")
    victim = new_page(chromium)
    log_in(victim, sites, "sandbox_pinner")
    [own] = [c for c in victim.context.cookies() if c["name"] == "__Host-pinauth_session"]
    assert (own["domain"], own["secure"], own["path"]) == (f"auth.{DOMAIN}", True, "/")
    tossed = cookie(attacker, "__Host-pinauth_session")

    set_for_the_domain(victim, sites, "__Host-pinauth_session", tossed)
    set_for_the_domain(victim, sites, "pinauth_session", tossed)

    jar = {(c["name"], c["domain"]) for c in victim.context.cookies()}
    assert ("__Host-pinauth_session", f".{DOMAIN}") not in jar  # Chromium refused it
    assert ("pinauth_session", f".{DOMAIN}") in jar  # accepted, and ignored by pinauth
    assert me(victim, sites) == (200, "sandbox_pinner")
    assert me(attacker, sites) == (200, "sandbox_studio")
