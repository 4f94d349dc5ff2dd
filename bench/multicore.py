"""`make bench`'s workers table: `pinauth serve --workers N` for each N, side by side.

Same proxy path, same upstream (the nginx stand-in run.py starts) and same wrk load as
the main table, with PostgreSQL (workers refuse SQLite): a database of its own on
PINAUTH_BENCH_POSTGRES_URL (default: the test server's), dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.preflight import postgres_unreachable

ADMIN_URL = os.environ.get(
    "PINAUTH_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


@dataclass
class WorkersResult:
    workers: int
    rps: float
    p50_ms: float
    p99_ms: float


def worker_counts(value: str) -> list[int]:
    """`--workers 1,2` (empty: no workers table)."""
    return [int(part) for part in value.split(",") if part.strip()]


@contextmanager
def bench_database(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """A fresh PostgreSQL database on the server of `admin_url`, dropped afterwards."""
    admin = make_url(admin_url)
    name = f"pinauth_bench_{uuid.uuid4().hex[:8]}"

    async def run(statement: str) -> None:
        engine = create_async_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def compare(
    args: argparse.Namespace,
    env: dict[str, str],
    cwd: str,
    free_port: Callable[[], int],
    log_in: Callable[[str], tuple[str, str]],
    wrk: Callable[..., Any],
) -> list[WorkersResult]:
    """Serve with each count in `args.workers`, log in through the real OAuth flow and
    drive the cookie path with wrk (run.py's `log_in` and `wrk`)."""
    counts = worker_counts(args.workers)
    if not counts:
        return []
    unreachable = asyncio.run(postgres_unreachable(ADMIN_URL, 3))
    if unreachable:
        print(f"workers table skipped (set PINAUTH_BENCH_POSTGRES_URL): {unreachable}")
        return []
    results: list[WorkersResult] = []
    with bench_database() as url:
        for count in counts:
            port = free_port()
            log = Path(cwd, f"workers-{count}.log")
            served_env = env | {
                "PINAUTH_DATABASE_URL": url,
                "PINTEREST_REDIRECT_URI": f"http://127.0.0.1:{port}/auth/callback",
                "PINAUTH_LOG_LEVEL": "info",
            }
            with log.open("wb") as output:
                server = subprocess.Popen(
                    [sys.executable, "-m", "pinauth", "serve", "--workers", str(count),
                     "--port", str(port)],
                    env=served_env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                # Every worker up before the load starts, or the first ones take it all.
                deadline = time.monotonic() + 120
                while log.read_text(errors="replace").count("startup complete") < count:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"--workers {count} did not start:\n{log.read_text()}")
                    time.sleep(0.2)
                base = f"http://127.0.0.1:{port}"
                cookie, _connection = log_in(base)
                measured = wrk(
                    f"pinauth --workers {count}",
                    f"{base}/pinterest/boards",
                    args,
                    [f"Cookie: {cookie}"],
                )
                results.append(WorkersResult(count, measured.rps, measured.p50_ms, measured.p99_ms))
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    return results


def report(results: list[WorkersResult]) -> None:
    if not results:
        return
    base = results[0]
    print(f"\npinauth serve --workers N, PostgreSQL, {os.cpu_count()} cores, same load:")
    print(f"| {'workers':>7} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'vs first':>8} |")
    print(f"|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
    for r in results:
        print(
            f"| {r.workers:>7} | {r.rps:>7.0f} | {r.p50_ms:>7.1f} | {r.p99_ms:>7.1f} | "
            f"{r.rps / base.rps:>8.2f} |"
        )
