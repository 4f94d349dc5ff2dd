"""`pinauth serve --workers 2` as real processes on PostgreSQL: both workers serve."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from tests.helpers import (
    POSTGRES_ADMIN_URL,
    Process,
    clean_env,
    free_port,
    new_postgres_database,
    wait_until_serving,
)

pytestmark = pytest.mark.skipif(
    not POSTGRES_ADMIN_URL, reason="workers need PostgreSQL (PINAUTH_TEST_POSTGRES_URL)"
)


def worker_pids(parent: int) -> list[int]:
    """The parent's spawned workers (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def wait_for(condition: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {condition}")
        time.sleep(0.2)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, Process]]:
    port = free_port()
    with new_postgres_database("pinauth_workers") as url:
        env = clean_env(
            PINTEREST_CLIENT_ID="cid",
            PINTEREST_CLIENT_SECRET="csecret",
            PINTEREST_REDIRECT_URI=f"http://127.0.0.1:{port}/auth/callback",
            PINAUTH_DATABASE_URL=url,
            PINAUTH_SECRET_KEY="workers-secret-" + "w" * 32,
            PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
            PINAUTH_LOG_FORMAT="json",
        )
        base = f"http://127.0.0.1:{port}"
        process = Process(
            ["serve", "--workers", "2", "--port", str(port)], env, tmp_path, f"{base}/readyz"
        )
        process.start()
        assert process.popen is not None
        try:
            # Spawned interpreters start slowly on a busy machine: wait for both.
            wait_until_serving(f"{base}/readyz", process.popen, timeout=120)
            wait_for(
                "both workers started",
                lambda: process.output().count("Application startup complete") == 2,
            )
            yield base, process
        finally:
            process.stop()


def test_two_workers_each_serve_alone(two_workers: tuple[str, Process]) -> None:
    """Guards that both workers accept on the shared socket: with either one stopped
    (SIGSTOP), the other still answers every new connection, database included."""
    base, process = two_workers
    assert process.popen is not None
    workers = worker_pids(process.popen.pid)
    assert len(workers) == 2, process.output()
    for paused in workers:
        os.kill(paused, signal.SIGSTOP)
        try:
            for _ in range(5):  # a new connection each time: no keep-alive to one worker
                answer = httpx.get(f"{base}/readyz", timeout=10)
                assert answer.status_code == 200, answer.text
        finally:
            os.kill(paused, signal.SIGCONT)

    assert process.terminate() == 0
    output = process.output()
    assert output.count("Application shutdown complete") == 2, output
    assert "Traceback" not in output
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_worker_that_dies_is_replaced(two_workers: tuple[str, Process]) -> None:
    """Guards the parent's watch: a killed worker is replaced and serving goes on."""
    base, process = two_workers
    assert process.popen is not None
    first, second = worker_pids(process.popen.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(
        "a replacement worker",
        lambda: process.output().count("Application startup complete") == 3,
    )
    replacement = set(worker_pids(process.popen.pid)) - {second}
    assert len(replacement) == 1
    assert first not in replacement
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    assert process.terminate() == 0
