"""docker-compose.yml and its nginx, checked without a Docker engine: the files agree
with each other and with .env.example, nginx accepts the configuration, and the same
configuration balances a login over two real replicas."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from cryptography.fernet import Fernet

from pinauth.sandbox import SandboxConfig
from tests.helpers import (
    POSTGRES_ADMIN_URL,
    Process,
    clean_env,
    free_port,
    new_postgres_database,
    sandbox_login,
    wait_until_serving,
)

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
REPLICAS = ("pinauth-a", "pinauth-b")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))


def nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not found:
        if os.environ.get("PINAUTH_REQUIRE_E2E") == "1":
            pytest.fail("PINAUTH_REQUIRE_E2E=1 but nginx is missing", pytrace=False)
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


def test_one_public_port_the_redirect_uri_names() -> None:
    services = compose()["services"]
    redirect = urlsplit(env_example()["PINTEREST_REDIRECT_URI"])
    balancer = services["nginx"]
    assert balancer["image"].startswith("nginx:")  # the official image
    assert balancer["ports"] == [f"{redirect.port}:{redirect.port}"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in balancer["volumes"]
    # Only the balancer is published; the replicas are reached through it alone.
    published = [name for name, service in services.items() if "ports" in service]
    assert published == ["nginx"]
    assert re.search(rf"^\s*listen {redirect.port};$", NGINX_CONF.read_text(), re.MULTILINE)


def test_the_balancer_sends_to_both_replicas_on_postgres() -> None:
    services = compose()["services"]
    upstream = re.findall(r"^\s*server (\S+?):(\d+)\b", NGINX_CONF.read_text(), re.MULTILINE)
    assert sorted(upstream) == [(name, "8000") for name in REPLICAS]
    image_port = re.search(r"^EXPOSE (\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert image_port is not None
    assert image_port.group(1) == "8000"
    for name in REPLICAS:
        replica = services[name]
        assert replica["build"] == "."
        assert replica["environment"]["PINAUTH_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services["nginx"]["depends_on"][name]["condition"] == "service_healthy"


def local_config(tmp_path: Path, listen: int, upstreams: dict[str, int]) -> Path:
    """deploy/nginx.conf as it would run here: replicas by address (their compose names
    resolve only inside Docker's network), files under tmp_path."""
    text = NGINX_CONF.read_text().replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    for name, port in upstreams.items():
        text = text.replace(f"server {name}:8000", f"server 127.0.0.1:{port}")
    temp = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    binary = nginx()
    conf = local_config(tmp_path, free_port(), {name: free_port() for name in REPLICAS})
    result = subprocess.run(
        [binary, "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """deploy/nginx.conf in front of two `pinauth serve` replicas on PostgreSQL, with
    `pinauth sandbox` as Pinterest."""
    binary = nginx()
    if not POSTGRES_ADMIN_URL:
        pytest.skip("replicas need PostgreSQL (PINAUTH_TEST_POSTGRES_URL)")
    public, sandbox_port = free_port(), free_port()
    ports = {name: free_port() for name in REPLICAS}
    base, sandbox = f"http://127.0.0.1:{public}", f"http://127.0.0.1:{sandbox_port}"
    app = SandboxConfig()
    started: list[Process] = []
    nginx_process: subprocess.Popen[bytes] | None = None
    with new_postgres_database("pinauth_deploy") as url:
        env = clean_env(
            PINTEREST_CLIENT_ID=app.client_id,
            PINTEREST_CLIENT_SECRET=app.client_secret,
            PINTEREST_REDIRECT_URI=f"{base}/auth/callback",
            PINTEREST_AUTHORIZE_URL=f"{sandbox}/oauth/",
            PINTEREST_API_URL=f"{sandbox}/v5",
            PINAUTH_DATABASE_URL=url,
            PINAUTH_SECRET_KEY="deploy-secret-" + "d" * 32,
            PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
            PINAUTH_FORWARDED_ALLOW_IPS="127.0.0.1",  # as compose trusts nginx
            PINAUTH_LOG_FORMAT="json",
        )
        try:
            pinterest = Process(
                ["sandbox", "--port", str(sandbox_port), "--redirect-uri", f"{base}/auth/callback"],
                clean_env(),
                tmp_path,
                f"{sandbox}/_sandbox/counters",
            )
            replicas = {
                name: Process(
                    ["serve", "--port", str(port)], env, tmp_path, f"http://127.0.0.1:{port}/readyz"
                )
                for name, port in ports.items()
            }
            for process in (pinterest, *replicas.values()):
                process.start()
                started.append(process)
            for process in started:
                assert process.popen is not None
                wait_until_serving(process.ready_url, process.popen, timeout=120)
            conf = local_config(tmp_path, public, ports)
            nginx_process = subprocess.Popen(
                [binary, "-c", str(conf), "-e", str(tmp_path / "error.log"), "-g", "daemon off;"]
            )
            wait_until_serving(f"{base}/healthz", nginx_process)
            yield {"base": base, "sandbox": sandbox, "replicas": replicas}
        finally:
            if nginx_process is not None:
                nginx_process.terminate()
                nginx_process.wait(timeout=10)
            for process in started:
                process.stop()


def test_a_login_through_the_balancer_is_served_by_both_replicas(
    balanced: dict[str, Any],
) -> None:
    base = balanced["base"]
    with httpx.Client(timeout=30) as browser:
        sandbox_login(browser, base, balanced["sandbox"])
        for _ in range(6):
            me = browser.get(f"{base}/me")
            assert me.status_code == 200, me.text
            assert me.json()["username"] == SandboxConfig().username
    for name, replica in balanced["replicas"].items():
        served = [
            line
            for line in replica.log_lines()
            if line.get("event") == "request" and line.get("path") == "/me"
        ]
        assert served, f"{name} served no /me"
        assert all(line["status"] == 200 for line in served)


def test_pinterest_failing_for_one_call_leaves_the_balancer_up(
    balanced: dict[str, Any],
) -> None:
    """Guards proxy_next_upstream: pinauth's 503 (Pinterest failing) is an answer, not a
    replica down. Counting it as one made nginx send the call to the other replica too
    (Pinterest called twice) and could mark both down, so that every route got nginx's
    own HTML 502 for fail_timeout (seen with stub replicas in the black-box review)."""
    base = balanced["base"]
    with httpx.Client(timeout=30) as browser:
        sandbox_login(browser, base, balanced["sandbox"])
        httpx.post(
            f"{balanced['sandbox']}/_sandbox/faults",
            # Enough for pinauth's own retries on both replicas.
            json={"path_prefix": "/v5/boards", "status": 503, "times": 20},
        ).raise_for_status()
        failed = browser.get(f"{base}/pinterest/boards")
        after = [browser.get(f"{base}/me") for _ in range(4)]
        httpx.delete(f"{balanced['sandbox']}/_sandbox/faults").raise_for_status()
    assert failed.status_code == 503, failed.text
    assert failed.headers["content-type"].startswith("application/json")
    for me in after:
        assert me.status_code == 200, me.text
    served = [
        name
        for name, replica in balanced["replicas"].items()
        for line in replica.log_lines()
        if line.get("event") == "request" and line.get("path") == "/pinterest/boards"
    ]
    assert len(served) == 1, served  # one replica answered; nginx did not try the other
