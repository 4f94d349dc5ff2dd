"""`pinauth serve` and `pinauth migrate` as real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from pinauth.migrations import schema_head, upgrade_to_head
from tests.helpers import exchange, free_port, status_of, wait_until_serving


def service_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    return env | {
        "PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "PINAUTH_SECRET_KEY": "cli-test-secret-" + "x" * 32,
        "PINAUTH_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "PINTEREST_CLIENT_ID": "cid",
        "PINTEREST_CLIENT_SECRET": "csecret",
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=service_env(tmp_path)
        | {"PINTEREST_REDIRECT_URI": f"http://127.0.0.1:{port}/auth/callback"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/healthz", process)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()  # reaps it and closes its output pipe


def test_serve_migrates_then_serves_docs_and_stops_cleanly(
    served: tuple[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    base, process = served
    assert httpx.get(f"{base}/docs").status_code == 200
    login = httpx.get(f"{base}/auth/login")
    assert login.status_code == 302
    callback = httpx.get(f"{base}/auth/callback", params={"code": "SECRETCODE", "state": "STATE"})
    assert callback.status_code == 303
    assert callback.headers["location"] == "/?pinauth_error=invalid_state"

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=10)

    # Uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM), output
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert "Application shutdown complete." in [line["event"] for line in lines]
    callback_line = next(line for line in lines if line.get("path") == "/auth/callback")
    assert callback_line["event"] == "request"
    assert callback_line["status"] == 303
    assert callback_line["route"] == "/auth/callback"
    assert callback_line["request_id"] == callback.headers["x-request-id"]
    assert callback_line["duration_ms"] >= 0
    assert "SECRETCODE" not in output
    assert "STATE" not in output
    assert "PINAUTH_METRICS_TOKEN" not in output  # on loopback, an open /metrics is fine
    tables = sqlite3.connect(tmp_path / "cli.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'"
    )
    assert {"connections", "sessions", "login_states", "alembic_version"} <= {
        row[0] for row in tables
    }


def test_serve_creates_the_sqlite_database_for_its_user_only(tmp_path: Path) -> None:
    """Guards the file mode: `pinauth serve` on a fresh SQLite file, under the common umask
    022 that would make it 0644, creates the database, its -wal and its -shm 0600."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=service_env(tmp_path)
        | {"PINTEREST_REDIRECT_URI": f"http://127.0.0.1:{port}/auth/callback"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0o022,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", process)
        # A write (the pending login), so the write-ahead log and its index exist.
        assert httpx.get(f"http://127.0.0.1:{port}/auth/login").status_code == 302
        modes = {
            path.name: oct(path.stat().st_mode & 0o777)
            for path in tmp_path.iterdir()
            if path.name.startswith("cli.db") and not path.name.endswith(".lock")
        }
    finally:
        process.kill()
        process.wait()
    assert modes == {"cli.db": "0o600", "cli.db-wal": "0o600", "cli.db-shm": "0o600"}


def test_a_database_an_earlier_version_left_readable_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the upgrade path of the file mode: a database, -wal and -shm that an earlier
    pinauth created 0644 are made 0600 at the next start's migration, with a warning."""
    database = tmp_path / "old.db"
    sqlite3.connect(database).close()
    for path in (database, tmp_path / "old.db-wal", tmp_path / "old.db-shm"):
        path.touch()
        path.chmod(0o644)
    upgrade_to_head(f"sqlite+aiosqlite:///{database}")
    modes = {
        p.name: oct(p.stat().st_mode & 0o777)
        for p in tmp_path.glob("old.db*")
        if not p.name.endswith(".lock")
    }
    assert modes == {"old.db": "0o600", "old.db-wal": "0o600", "old.db-shm": "0o600"}
    assert caplog.text.count("readable by others: made it 600") == 3


def test_serve_caps_request_heads(served: tuple[str, subprocess.Popen[str]]) -> None:
    """Guards that `pinauth serve` runs uvicorn with pinauth's protocol: a 64 KiB header
    is refused with 431 by the real process, which goes on serving."""
    base, _process = served
    answer = exchange(
        base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    )
    assert status_of(answer) == 431, answer[:200]
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_serve_warns_when_metrics_are_open_beyond_loopback(tmp_path: Path) -> None:
    """Guards the start-up warning: listening on a non-loopback address without
    PINAUTH_METRICS_TOKEN says so in the log."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--host", "0.0.0.0", "--port", str(port)],
        cwd=tmp_path,
        env=service_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert any(
        "PINAUTH_METRICS_TOKEN is not set" in line["event"] and "0.0.0.0" in line["event"]
        for line in warnings
    ), output


def test_migrate_only_migrates(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", "migrate"],
        cwd=tmp_path,
        env=service_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    version = sqlite3.connect(tmp_path / "cli.db").execute(
        "SELECT version_num FROM alembic_version"
    )
    assert version.fetchone() == (schema_head(),)


def redeliver(tmp_path: Path, event_id: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable.encode(), b"-m", b"pinauth", b"webhooks", b"redeliver", event_id],
        cwd=tmp_path,
        env=service_env(tmp_path),
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "event_id",
    [b"evt_\xff\xfe", b"evt_\xc3\xa9", b"evt_", b"conn_abc", b"evt_a b", b"evt_" + b"a" * 37],
)
def test_webhooks_redeliver_refuses_what_cannot_be_an_event_id(
    tmp_path: Path, event_id: bytes
) -> None:
    """Bytes that are not UTF-8 made a UnicodeEncodeError traceback on SQLite (a DBAPIError
    on PostgreSQL): the id's shape is checked first, in one line, before any query."""
    result = redeliver(tmp_path, event_id)

    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("pinauth: "), err
    assert "is not a webhook event id" in err
    assert "cannot start" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "cli.db").exists()  # refused before the database was touched


def test_webhooks_redeliver_says_an_unknown_id_is_unknown(tmp_path: Path) -> None:
    result = redeliver(tmp_path, b"evt_aaaaaaaaaaaaaaaaaaaaaaaaaa")

    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err == "pinauth: No webhook event has that id: 'evt_aaaaaaaaaaaaaaaaaaaaaaaaaa'.\n"


def test_make_run_writes_a_fresh_env_once(tmp_path: Path) -> None:
    from pinauth.dotenv import write_env

    target = tmp_path / ".env"
    assert write_env(target)
    first = target.read_text()
    assert not write_env(target)  # never clobbers existing secrets
    assert target.read_text() == first
    assert target.stat().st_mode & 0o777 == 0o600

    values = dict(
        line.split("=", 1) for line in first.splitlines() if line and not line.startswith("#")
    )
    assert len(values["PINAUTH_SECRET_KEY"]) >= 32
    Fernet(values["PINAUTH_ENCRYPTION_KEYS"].encode())  # a valid key


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path)
    del env["PINTEREST_CLIENT_ID"], env["PINTEREST_CLIENT_SECRET"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/healthz", process)
        # A response the sandbox holds back for 1.5 s: a request in flight.
        httpx.post(
            f"{base}/sandbox/_sandbox/faults",
            json={"path_prefix": "/v5/boards", "status": 200, "body": {"items": []}, "delay": 1.5},
            headers={"Host": f"localhost:{port}"},  # the demo's public host
        ).raise_for_status()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.get, f"{base}/sandbox/v5/boards", timeout=10)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200
        assert response.json() == {"items": []}
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
