"""Connections that send nothing: a deadline for the first byte (PINAUTH_FIRST_BYTE_TIMEOUT)
and a cap per client address on connections still sending their head
(PINAUTH_MAX_PENDING_PER_CLIENT), in pinauth's uvicorn protocol (server.py).

The protocol runs here on fake transports and an event loop whose timers run on a clock
the test moves, so every path is driven in order and no test waits for time to pass; one
test checks the cap over real sockets against uvicorn as `pinauth serve` runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import respx
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from pinauth.app import create_app
from pinauth.server import GuardedHttpToolsProtocol, guarded_protocol
from pinauth.settings import Settings
from tests.helpers import raw_connection, served_like_pinauth_serve, status_of

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Timer:
    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualTimers:
    """The running event loop, but `call_later` and `time` run on a clock the test moves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 0.0
        self.timers: list[Timer] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due, in order."""
        self.now += seconds
        while due := sorted(
            (t for t in self.timers if not t.cancelled and t.when <= self.now),
            key=lambda t: t.when,
        ):
            self.timers.remove(due[0])
            due[0].callback(*due[0].args)


class FakeTransport(asyncio.Transport):
    """A connection from `peer` that records what the server writes; closing it ends the
    protocol's connection soon after, as asyncio's own transports do."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closing = False
        self.protocol: GuardedHttpToolsProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing and self.protocol is not None:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Server:
    """pinauth's configured protocol class, making connections on fake transports."""

    def __init__(self, settings: Settings) -> None:
        self.protocol = guarded_protocol(settings)
        self.config = uvicorn.Config(ok, log_config=None)
        self.state = ServerState()
        self.timers = VirtualTimers(asyncio.get_running_loop())

    @property
    def pending(self) -> dict[str, int]:
        assert self.protocol.pending is not None
        return dict(self.protocol.pending.counts)

    def connect(self, host: str, port: int) -> FakeTransport:
        protocol = self.protocol(
            config=self.config,
            server_state=self.state,
            app_state={},
            _loop=self.timers,
        )
        transport = FakeTransport((host, port))
        transport.protocol = protocol
        protocol.connection_made(transport)
        return transport

    def send(self, transport: FakeTransport, data: bytes) -> None:
        assert transport.protocol is not None
        transport.protocol.data_received(data)

    async def settle(self) -> None:
        """Let the app answer what it was given, and closed connections end."""
        await asyncio.gather(*self.state.tasks)
        await asyncio.sleep(0)  # one loop pass: the connection_lost calls closing queued


async def test_the_pending_count_is_capped_per_address_and_given_back_on_every_path(
    settings: Settings,
) -> None:
    """Guards the cap and its release: a third silent connection from one address is
    closed at once (another address is not affected), and the count comes back when a
    head completes, when the peer hangs up, after a 400, a 431 and the first-byte timeout;
    a later request's head on a kept-alive connection counts again, and is refused at the
    cap too. In the end nothing is left counted."""
    server = Server(settings.model_copy(update={"max_pending_per_client": 2}))
    a = server.connect("10.0.0.1", 1001)
    b = server.connect("10.0.0.1", 1002)
    over = server.connect("10.0.0.1", 1003)
    other = server.connect("10.0.0.2", 1001)
    assert over.closing
    assert over.written == b""
    assert not (a.closing)
    assert not (b.closing)
    assert not other.closing
    await server.settle()
    assert server.pending == {"10.0.0.1": 2, "10.0.0.2": 1}

    server.send(a, REQUEST)  # a complete head
    assert server.pending == {"10.0.0.1": 1, "10.0.0.2": 1}
    await server.settle()
    assert status_of(bytes(a.written)) == 200

    server.send(b, b"GET / HT")  # part of a head still counts
    assert server.pending["10.0.0.1"] == 1
    assert b.protocol is not None
    b.protocol.connection_lost(None)  # the peer hung up
    assert server.pending == {"10.0.0.2": 1}

    broken = server.connect("10.0.0.1", 1004)
    server.send(broken, b"\x00 not http \r\n\r\n")  # uvicorn answers 400 and closes
    await server.settle()
    assert status_of(bytes(broken.written)) == 400
    huge = server.connect("10.0.0.1", 1005)
    server.send(huge, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000)
    assert status_of(bytes(huge.written)) == 431
    assert server.pending == {"10.0.0.2": 1}  # given back at the refusal, not the close
    await server.settle()

    silent = server.connect("10.0.0.1", 1006)
    assert server.pending["10.0.0.1"] == 1
    server.timers.advance(settings.first_byte_timeout_seconds)
    await server.settle()
    assert silent.closing
    assert silent.written == b""
    assert server.pending == {}  # `other` (10.0.0.2) timed out too

    # A kept-alive connection's next head counts from its first byte; at the cap, the
    # connection is closed instead.
    kept = server.connect("10.0.0.1", 1007)
    server.send(kept, REQUEST)
    await server.settle()
    server.send(kept, b"GET / HT")
    assert server.pending == {"10.0.0.1": 1}
    server.send(kept, b"TP/1.1\r\nHost: x\r\n\r\n")
    assert server.pending == {}
    await server.settle()
    assert bytes(kept.written).count(b"HTTP/1.1 200") == 2
    held = [server.connect("10.0.0.1", port) for port in (2001, 2002)]
    server.send(kept, REQUEST)
    await server.settle()
    assert kept.closing
    assert bytes(kept.written).count(b"HTTP/1.1 200") == 2
    for transport in held:
        transport.close()
    await server.settle()
    assert server.pending == {}


async def test_the_first_byte_has_its_own_deadline_then_the_request_has_the_whole_read_timeout(
    settings: Settings,
) -> None:
    """Guards PINAUTH_FIRST_BYTE_TIMEOUT: a connection that sends nothing is closed without
    a word when it passes, not at the read timeout; one whose first byte came in time then
    has PINAUTH_REQUEST_READ_TIMEOUT from that byte to finish (408 after)."""
    settings = settings.model_copy(
        update={"first_byte_timeout_seconds": 5.0, "request_read_timeout_seconds": 30.0}
    )
    server = Server(settings)
    silent = server.connect("10.0.0.1", 1001)
    slow = server.connect("10.0.0.1", 1002)
    server.timers.advance(4.0)
    server.send(slow, b"G")
    server.timers.advance(0.75)  # (binary fractions: the clock adds up exactly)
    assert not silent.closing
    server.timers.advance(0.25)  # 5 s after connecting
    await server.settle()
    assert silent.closing
    assert silent.written == b""
    assert not slow.closing

    server.timers.advance(28.75)  # 29.75 s after its first byte
    assert not slow.closing
    assert slow.written == b""
    server.timers.advance(0.25)
    answer = bytes(slow.written)
    assert status_of(answer) == 408
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"


async def test_a_read_timeout_shorter_than_the_first_byte_timeout_bounds_both(
    settings: Settings,
) -> None:
    settings = settings.model_copy(
        update={"first_byte_timeout_seconds": 5.0, "request_read_timeout_seconds": 2.0}
    )
    server = Server(settings)
    silent = server.connect("10.0.0.1", 1001)
    server.timers.advance(2.0)
    await server.settle()
    assert silent.closing


async def test_over_real_sockets_the_extra_silent_connection_is_closed_at_once(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The cap with uvicorn as `pinauth serve` runs it: with two silent connections open
    from 127.0.0.1 (cap 2, first-byte timeout far off), a third is closed before any
    timer could; once one of the two has sent its request, a new one is served."""
    settings = settings.model_copy(
        update={"max_pending_per_client": 2, "first_byte_timeout_seconds": 25.0}
    )
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with served_like_pinauth_serve(app, settings) as base:
        async with raw_connection(base) as first, raw_connection(base) as second:
            async with raw_connection(base) as third:
                assert await third.wait_closed(timeout=10) == b""
            assert not first.closed
            assert not second.closed
            first.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await first.wait_for(b'{"status":"ok"}')
            async with raw_connection(base) as fourth:
                fourth.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert status_of(await fourth.wait_closed()) == 200


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_and_logged() -> None:
    """Guards raise_open_file_limit (which `pinauth serve` calls at start), in a process
    started with a soft limit of 256 under the same hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit here is {hard}")
    code = (
        "import logging, resource\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from pinauth.server import raise_open_file_limit\n"
        "raise_open_file_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == [str(hard), str(hard)]
    assert f"raised the open-file limit (RLIMIT_NOFILE) from 256 to {hard}" in done.stderr


def test_large_allocations_go_back_to_the_system_once_freed() -> None:
    """Guards map_large_allocations (which `pinauth serve` calls at start): after a 9 MB
    buffer has come and gone, glibc would serve a 5 MB one from its heap and keep it
    resident once freed; with the call, it gets pages of its own that are returned."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    code = (
        "import sys\n"
        "from pinauth.server import map_large_allocations\n"
        "if sys.argv[1] == 'on':\n"
        "    map_large_allocations()\n"
        "def rss():\n"
        "    with open('/proc/self/status') as status:\n"
        "        return int(next(l for l in status if l.startswith('VmRSS')).split()[1])\n"
        "b = b'x' * 9_000_000\n"
        "del b\n"
        "before = rss()\n"
        "b = b'y' * 5_000_000\n"
        "del b\n"
        "print(rss() - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def kept_kib(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", code, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(done.stdout)

    assert kept_kib("off") > 4000  # glibc's default: the freed 5 MB stays resident
    assert kept_kib("on") < 1000


async def echo_body(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


BODY_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


async def test_a_connection_stays_pending_until_its_body_has_arrived(settings: Settings) -> None:
    """Guards the count over the body (review A1): a head followed by silence still counts
    for its address, so heads that declare a body cannot hold sockets past the cap; the
    count comes back when the body completes, at the 408, when the peer hangs up mid-body,
    and at a refusal; in the end nothing is left counted."""
    settings = settings.model_copy(update={"max_pending_per_client": 2})
    server = Server(settings)
    server.config = uvicorn.Config(echo_body, log_config=None)
    a = server.connect("10.0.0.1", 1001)
    b = server.connect("10.0.0.1", 1002)
    server.send(a, BODY_HEAD)
    server.send(b, BODY_HEAD + b"01234")
    assert server.pending == {"10.0.0.1": 2}
    over = server.connect("10.0.0.1", 1003)
    assert over.closing  # the heads are complete, the bodies are not: still at the cap

    assert b.protocol is not None
    b.protocol.connection_lost(None)  # the peer hangs up mid-body
    assert server.pending == {"10.0.0.1": 1}
    server.send(a, b"0123456789")  # the body completes
    assert server.pending == {}
    await server.settle()
    assert b"\r\n0123456789\r\n" in bytes(a.written)

    slow = server.connect("10.0.0.1", 1004)
    server.send(slow, BODY_HEAD + b"0")
    server.timers.advance(settings.request_read_timeout_seconds)
    assert status_of(bytes(slow.written)) == 408
    assert server.pending == {}  # given back at the 408, not the close
    await server.settle()

    huge = server.connect("10.0.0.1", 1005)
    server.send(huge, b"POST / HTTP/1.1\r\nContent-Length: 10\r\nX: " + b"a" * 20_000)
    assert status_of(bytes(huge.written)) == 431
    assert server.pending == {}
    await server.settle()
    assert server.pending == {}
