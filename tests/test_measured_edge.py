"""Measured tests of issue 18's edge limits against a real `pinauth serve` process: idle
sockets from one address while another is served (about 35 s), and peak memory under 40
concurrent 9 MB proxied uploads. They measure time and memory as the issue asks, with
margins for a busy machine, and print their figures (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography.fernet import Fernet

from tests.helpers import clean_env, free_port, wait_until_serving

ATTACKER = "127.0.0.2"  # every idle socket comes from here
IDLE_SOCKETS = 1500
ATTACK_SECONDS = 30
MIB = 1024 * 1024

# A request head that declares a body which never comes (review A1).
HEAD_THEN_SILENCE = (
    b"POST /v1/connect-sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
)

# Holds IDLE_SOCKETS connections from ATTACKER, opening a new one for each the server
# closes, for ATTACK_SECONDS; each sends the (hex) bytes of its last argument once it is
# connected, if any, then nothing more. Says "holding" once all are open, then its
# figures as JSON.
ATTACK = """
import json, selectors, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
payload = bytes.fromhex(sys.argv[6]) if len(sys.argv) > 6 else b""
select = selectors.DefaultSelector()
live, opened, ended, failed = set(), 0, 0, 0
def open_one():
    global opened, failed
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((sys.argv[5], 0))
        s.connect_ex((host, port))
    except OSError:
        failed += 1
        s.close()
        return
    select.register(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if payload else 0))
    live.add(s)
    opened += 1
deadline = time.monotonic() + seconds
said = False
while time.monotonic() < deadline:
    while len(live) < count:
        open_one()
    if not said:
        print("holding", flush=True)
        said = True
    for key, events in select.select(timeout=0.05):
        s = key.fileobj
        if events & selectors.EVENT_WRITE:
            try:
                s.send(payload)
            except OSError:
                pass
            select.modify(s, selectors.EVENT_READ)
            continue
        try:
            if s.recv(4096):
                continue
        except BlockingIOError:
            continue
        except OSError:
            pass
        select.unregister(s)
        live.discard(s)
        s.close()
        ended += 1
print(json.dumps({"opened": opened, "closed_by_server": ended, "failed": failed,
                  "open_at_end": len(live)}), flush=True)
"""


def _serve_env(tmp: Path, port: int, api_url: str) -> dict[str, str]:
    return clean_env(
        PINTEREST_CLIENT_ID="measured",
        PINTEREST_CLIENT_SECRET="measured-secret",
        PINTEREST_API_URL=api_url,
        PINTEREST_REDIRECT_URI=f"http://127.0.0.1:{port}/auth/callback",
        PINAUTH_DATABASE_URL=f"sqlite+aiosqlite:///{tmp}/pinauth.db",
        PINAUTH_SECRET_KEY="m" * 48,
        PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        PINAUTH_KEEPER="false",
        PINAUTH_ACCESS_LOG="false",
        PINAUTH_LOG_FORMAT="text",
    )


@contextmanager
def pinauth_serve(
    tmp: Path, api_url: str = "http://127.0.0.1:9/v5", open_files: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`pinauth serve` on a free port (its soft open-file limit set to `open_files` before
    it starts): its base URL, process and log file."""
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    log = tmp / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pinauth", "serve", "--port", str(port)],
            env=_serve_env(tmp, port, api_url),
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(f"{base}/healthz", process, timeout=60)
        except BaseException:
            print(log.read_text(errors="replace"))
            raise
        yield base, process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_measured_1500_idle_sockets_from_one_address_leave_another_answered_within_1s(
    tmp_path: Path,
) -> None:
    """Issue 18 item 2, measured with real sockets: a server started under `ulimit -n
    1024`; 127.0.0.2 holds and reopens 1,500 idle sockets for 30 s; meanwhile 127.0.0.1
    sends a request on a new connection every 0.1 s. At least 99% are answered within
    1 s. (Before the fix, all failed until the idle sockets timed out.)"""
    _measure_attack(tmp_path, b"")


def test_measured_1500_heads_then_silence_from_one_address_leave_another_answered_within_1s(
    tmp_path: Path,
) -> None:
    """Review A1, the same rig: each of 127.0.0.2's 1,500 sockets sends a complete head
    that declares a 100-byte body, then nothing. The cap per address covers the body
    too, so at least 99% of 127.0.0.1's requests are still answered within 1 s. (When
    only heads were counted: 8% answered, the server at 1,024 open files.)"""
    _measure_attack(tmp_path, HEAD_THEN_SILENCE)


def _measure_attack(tmp_path: Path, payload: bytes) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > IDLE_SOCKETS + 100, hard
    with pinauth_serve(tmp_path, open_files=1024) as (base, _process, log):
        port = urlsplit(base).port
        attack_args = [str(IDLE_SOCKETS), str(ATTACK_SECONDS), ATTACKER, payload.hex()]
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACK, "127.0.0.1", str(port), *attack_args],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
        )
        assert attacker.stdout is not None
        try:
            assert attacker.stdout.readline().strip() == "holding"
            latencies: list[float] = []
            failures: list[str] = []
            transport = httpx.HTTPTransport(local_address="127.0.0.1")
            limits = httpx.Limits(max_keepalive_connections=0)  # a new connection each time
            with httpx.Client(transport=transport, limits=limits, timeout=5) as client:
                while attacker.poll() is None:
                    started = time.monotonic()
                    try:
                        response = client.get(f"{base}/healthz")
                        if response.status_code != 200:
                            failures.append(str(response.status_code))
                    except httpx.HTTPError as e:
                        failures.append(type(e).__name__)
                    latencies.append(time.monotonic() - started)
                    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))  # the pace
            figures = json.loads(attacker.stdout.readline())
        finally:
            attacker.kill()
            attacker.wait()
            attacker.stdout.close()
        server_log = log.read_text(errors="replace")

    within = sum(1 for t in latencies if t <= 1.0) - len(failures)
    share = within / len(latencies)
    ordered = sorted(latencies)
    print(
        f"\n{'head-then-silence' if payload else 'idle-socket'} attack: {figures}; "
        f"legitimate requests: {len(latencies)}, "
        f"{share:.1%} answered within 1 s, failures {failures[:5]} ({len(failures)}), "
        f"p50 {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {ordered[int(len(ordered) * 0.99) - 1] * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms"
    )
    assert figures["opened"] >= IDLE_SOCKETS
    assert figures["closed_by_server"] > 0  # the cap and the first-byte deadline acted
    assert len(latencies) >= 100  # the client ran throughout the attack
    assert share >= 0.99
    assert "raised the open-file limit (RLIMIT_NOFILE) from 1024 to" in server_log


def _vm_hwm_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class SlowPinterest:
    """A loopback "Pinterest": the OAuth token and user account for the login, and a POST
    endpoint that reads each body and answers it 0.2 s later (a slow upstream), counting
    how many it holds at once."""

    def __init__(self) -> None:
        self.holding = 0
        self.most = 0
        self.received = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                status, answer = await self.answer(method, urlsplit(target).path, body)
                payload = json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if path.endswith("/oauth/token"):
            return 200, {
                "access_token": "pina_measured",
                "refresh_token": "pinr_measured",
                "token_type": "bearer",
                "expires_in": 2592000,
                "refresh_token_expires_in": 5184000,
                "scope": "boards:read,pins:read,user_accounts:read",
                "response_type": "authorization_code",
            }
        if path.endswith("/user_account"):
            return 200, {"id": "549755885175", "username": "measured"}
        self.holding += 1
        self.most = max(self.most, self.holding)
        self.received += len(body) if len(body) > 1000 else 0
        try:
            await asyncio.sleep(0.2)  # the slow upstream's own pace
        finally:
            self.holding -= 1
        return 201, {"id": "1", "size": len(body)}


@asynccontextmanager
async def slow_pinterest() -> AsyncIterator[tuple[str, SlowPinterest]]:
    upstream = SlowPinterest()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v5", upstream
    finally:
        server.close()
        for handler in upstream.handlers:
            handler.cancel()
        await asyncio.gather(*upstream.handlers, return_exceptions=True)


async def test_measured_40_concurrent_9_mb_uploads_raise_peak_memory_by_under_100_mib(
    tmp_path: Path,
) -> None:
    """Issue 18 item 4, measured: 40 concurrent 9 MB proxied POSTs to a real `pinauth
    serve` (a slow loopback upstream behind it) raise its peak RSS (VmHWM) by less than
    100 MiB. Clients answered 503 busy retry after Retry-After, so every upload gets
    through in the end. (Before the cap: from 140 to 613 MiB.)"""
    body = b"x" * (9 * 1000 * 1000)
    async with slow_pinterest() as (api_url, upstream):
        with pinauth_serve(tmp_path, api_url) as (base, process, _log):
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                login = await client.get("/auth/login")
                state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
                callback = await client.get(
                    "/auth/callback", params={"code": "measured", "state": state}
                )
                assert callback.status_code == 303, callback.text
                assert (await client.post("/pinterest/pins", json={})).status_code == 201
                before = _vm_hwm_mib(process.pid)
                busy = 0

                async def upload() -> int:
                    nonlocal busy
                    while True:
                        response = await client.post("/pinterest/pins", content=body)
                        if response.status_code != 503:
                            return response.status_code
                        assert response.json()["error"] == "busy"
                        busy += 1
                        # The client's pace, as the answer asks.
                        await asyncio.sleep(int(response.headers["retry-after"]))

                statuses = await asyncio.gather(*(upload() for _ in range(40)))
                after = _vm_hwm_mib(process.pid)

    print(
        f"\n40 concurrent 9 MB uploads: peak RSS {before:.0f} -> {after:.0f} MiB "
        f"(+{after - before:.0f}); {busy} answered 503 busy and retried; at most "
        f"{upstream.most} bodies upstream at once"
    )
    assert statuses == [201] * 40
    assert upstream.received == 40 * len(body)
    assert after - before < 100
