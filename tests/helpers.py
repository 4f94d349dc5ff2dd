"""Helpers for tests with real processes: ports, `pinauth` subprocesses, a PostgreSQL of
the test's own that it can stop and start."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pinauth.logs import JsonFormatter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Poll `url` until it answers 200; fail early, with its output, if `process` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} did not answer {url} within {timeout} s")
        time.sleep(0.1)


@contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[io.StringIO]:
    """Everything logged meanwhile, as JSON lines formatted like `pinauth serve` does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def events(stream: io.StringIO, text: str) -> list[dict[str, Any]]:
    """The captured JSON log lines whose event contains `text`."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if text in line["event"]]


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any PINAUTH_/PINTEREST_ setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    return env | values


class PinauthProcess:
    """`python -m pinauth <args>` with its output (stdout and stderr) in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, ready_url: str) -> None:
        self.args, self.env, self.cwd, self.ready_url = args, env, cwd, ready_url
        self.log = cwd / f"{args[0]}-{free_port()}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pinauth", *self.args],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_serving(self.ready_url, self.popen)
        except BaseException:
            print(self.output())  # pytest shows it with the failure
            raise

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (PINAUTH_LOG_FORMAT=json); anything else fails the test."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]


def sandbox_login(browser: httpx.Client, base: str, sandbox: str) -> None:
    """A user logs in through pinauth at `base` and consents on the sandbox at `sandbox`."""
    login = browser.get(f"{base}/auth/login")
    assert login.status_code == 302, login.text
    params = parse_qs(urlsplit(login.headers["location"]).query)
    fields = {k: v[0] for k, v in params.items() if k != "response_type"}
    decision = httpx.post(f"{sandbox}/oauth/", data=fields | {"decision": "allow"})
    callback = urlsplit(decision.headers["location"]).query
    assert browser.get(f"{base}/auth/callback?{callback}").status_code == 303


def postgres_bin() -> Path | None:
    """Where PostgreSQL's server programs are (Debian's layout), if they are installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own, on a free port, that it can stop and start.

    Its data directory is a copy of a template cluster (`initdb` once per test session).
    The server refuses to run as root, so its programs run as the `postgres` OS user, in
    a directory under /tmp that user can reach (pytest's tmp_path is private to root).
    """

    def __init__(self, template: Path) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.directory = _postgres_tempdir()
        self.data = self.directory / "data"
        self.port = free_port()
        _as_postgres("cp", "-a", str(template), str(self.data))

    @staticmethod
    def template() -> Path:
        """A fresh cluster (trust authentication, superuser postgres) to copy from."""
        bin_dir = postgres_bin()
        assert bin_dir is not None
        data = _postgres_tempdir() / "template"
        _as_postgres(
            str(bin_dir / "initdb"),
            *("-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"),
        )
        return data

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        log = str(self.directory / "server.log")
        _as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, as when a server goes down."""
        _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new database on this server; returns its URL."""
        _as_postgres(
            str(self.bin / "psql"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q"),
            *("-c", f'CREATE DATABASE "{name}"'),
        )
        return self.url(name)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its directory."""
        _as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
        )
        shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_tempdir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pinauth-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    return directory


def _as_postgres(*command: str, check: bool = True) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr}")
