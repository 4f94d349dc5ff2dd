"""The HTTP server: uvicorn as `pinauth serve` runs it, with limits no ASGI layer can impose.

An ASGI app first hears of a request once the server has parsed its whole head, so
neither a cap on the head's size nor a deadline for a slowly sent request can live in
middleware. Uvicorn's httptools protocol (the fastest it has) enforces neither, and
httptools itself buffers a header of any length; the h11 protocol caps the head but
answers 400, not 431, and is slower. So both limits live in a small subclass of the
httptools protocol, which sees every byte before the parser does; so do the limits on
connections that send nothing (a deadline for the first byte, a cap per client address
on those still sending a request), which keep idle sockets from using up the process's
file descriptors.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import platform
import sys
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from pinauth.errors import PinauthError, RequestHeadTooLarge, RequestTimeout
from pinauth.security_headers import ALWAYS, LOCKED_DOWN_CSP
from pinauth.settings import Settings

log = logging.getLogger(__name__)

# How long a refused connection keeps reading (and discarding) after the answer.
_LINGER_SECONDS = 2.0

_REFUSAL_HEADERS = b"".join(
    name + b": " + value + b"\r\n"
    for name, value in (
        (b"content-type", b"application/json"),
        (b"connection", b"close"),
        *ALWAYS,
        LOCKED_DOWN_CSP,
    )
)


# At most one log line in this many seconds about connections closed over the cap.
_PENDING_LOG_SECONDS = 60.0


class PendingHeads:
    """Per client address, the connections that have not sent a whole request yet.

    Counted from connecting (or from the first byte of a later request on a kept-alive
    connection) until the request, head and body, is complete or the connection ends; one
    instance per process's protocol class, touched only on its event loop.

    The body counts too: a head followed by silence holds its socket just as long as a
    head that never ends (until the read timeout), so without it one address could hold
    any number of sockets by sending heads that declare a body. Uploads still arriving
    count as well; that is fine, since a client that sends 64 (the default cap) large
    bodies at once from one address is rare, and an extra one is refused, not lost: it
    can be retried, or the cap raised for such a client.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.refused = 0  # connections closed over the cap since the last log line
        self.logged_at: float | None = None

    def acquire(self, client: str) -> bool:
        """Count one more for `client`, unless it already has `limit`."""
        count = self.counts.get(client, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self.counts[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self.counts[client] - 1
        if count:
            self.counts[client] = count
        else:
            del self.counts[client]


# The base methods the per-request overrides call, bound once: on CPython 3.11 a
# `super().x()` call costs more than the rest of these overrides (measured with callgrind).
_data_received = HttpToolsProtocol.data_received
_on_headers_complete = HttpToolsProtocol.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol, plus a cap on the head, deadlines and a cap on
    connections still sending their head.

    Head: a head that completes is measured (URL plus header names and values) before
    the app is called; one that has not completed yet is bounded by the bytes received
    since it began, before the parser buffers more. Over `max_head_bytes`, 431. (The
    second count can only undercount, by at most one read, where one request ends and
    the next begins in the same read; the first is exact.)

    Deadline: a request must arrive in full, line, headers and body, within
    `read_timeout` seconds of its first byte; otherwise 408 (or, if its response has
    started, just close). The timer is armed only while a request is incomplete at the
    end of a read, so a request that arrives in one read costs no timer at all. A new
    connection must send its first byte within `first_byte_timeout` seconds of opening,
    or it is closed without a word (between requests, uvicorn's keep-alive timeout does
    the same).

    Pending connections: at most `pending.limit` connections per client address may be
    between connecting (or a later request's first byte) and a complete request (head and
    body); one more is closed at once. The count is given back when the request completes
    and whenever the connection ends (closed, refused, broken, upgraded to a WebSocket).

    Either way the connection is done: pinauth sends FIN and discards what still comes
    for a moment, so that the client reads the answer rather than a reset.
    """

    max_head_bytes: ClassVar[int] = 16 * 1024
    read_timeout: ClassVar[float] = 30.0
    first_byte_timeout: ClassVar[float] = 5.0
    pending: ClassVar[PendingHeads | None] = None  # no cap

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests, or inside a request's line and headers
        self._head_bytes = 0  # of the head being received (at most); 0 between requests
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False  # answered and hung up: nothing more reaches the app
        self._answer_later: PinauthError | None = None
        self._first_byte = True  # nothing received yet: the first-byte timer runs
        self._pending_client: str | None = None  # counted in `pending` under this address

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._count_pending():
            return
        self._arm(min(self.first_byte_timeout, self.read_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._release_pending()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._first_byte:
                self._first_byte = False
                self._disarm()  # the first-byte timer; the request's own is armed below
            elif not self._head_bytes and not self._count_pending():
                return  # a later request's head begins, over the cap
            self._head_bytes += len(data)
        _data_received(self, data)
        if self._refused or self.transport.is_closing():
            return  # refused while parsing, here or by uvicorn (400)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(self._head_too_large(), request_cycle=None)
        elif self._deadline is None and (self._head_bytes or not self._in_head):
            self._arm()  # a request has begun and is not complete yet

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._refused:
            return
        size = len(self.url)
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        if size > self.max_head_bytes:
            # Before the app hears of it; the parser's remaining callbacks see _refused.
            self._refuse(self._head_too_large(), request_cycle=None)
            return
        _on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._pending_client is not None:
            self._release_pending()
        if self._refused:
            return
        _on_message_complete(self)
        self._in_head = True
        self._head_bytes = 0
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._answer_later is not None and not self.pipeline:
            self._unset_keepalive_if_required()
            self._answer(self._answer_later)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is the WebSocket protocol's from here on
        self._release_pending()
        super().handle_websocket_upgrade()

    def _head_too_large(self) -> RequestHeadTooLarge:
        return RequestHeadTooLarge(
            f"The request line and headers exceed {self.max_head_bytes} bytes."
        )

    def _arm(self, seconds: float | None = None) -> None:
        self._deadline = self.loop.call_later(
            self.read_timeout if seconds is None else seconds, self._deadline_passed
        )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _count_pending(self) -> bool:
        """Count this connection as pending for its client address; if that address has
        as many as allowed already, close the connection instead and return False."""
        pending = self.pending
        if pending is None or self.client is None:  # no cap, or a Unix socket's peer
            return True
        client = self.client[0]
        if pending.acquire(client):
            self._pending_client = client
            return True
        self._refused = True
        self._disarm()
        self.transport.close()
        now = self.loop.time()
        if pending.logged_at is None or now - pending.logged_at >= _PENDING_LOG_SECONDS:
            log.warning(
                "closed %d connection(s) over PINAUTH_MAX_PENDING_PER_CLIENT (%d) from "
                "client addresses such as %s",
                pending.refused,
                pending.limit,
                client,
            )
            pending.logged_at, pending.refused = now, 0
        return False

    def _release_pending(self) -> None:
        client = self._pending_client
        if client is not None and self.pending is not None:
            self._pending_client = None
            self.pending.release(client)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._refused:
            return
        if self._in_head and not self._head_bytes:
            self.transport.close()  # connected, but never sent a byte of a request
            return
        self._refuse(
            RequestTimeout(f"The request did not arrive within {self.read_timeout:g} s."),
            request_cycle=None if self._in_head else self.cycle,
        )

    def _refuse(self, error: PinauthError, *, request_cycle: RequestResponseCycle | None) -> None:
        """Answer with pinauth's JSON error unless a response is under way, then hang up.

        `request_cycle` is the refused request's cycle, if the app already has it.
        """
        self._refused = True
        self._disarm()
        self._release_pending()
        log.info("request refused by the server", extra={"status": error.status_code})
        if request_cycle is None:
            if self.cycle is not None and not self.cycle.response_complete:
                # The app never saw this request, but is still answering an earlier,
                # pipelined one: this answer follows that one.
                self._answer_later = error
                return
        else:
            # The app may be waiting for this body: it gets http.disconnect, and whatever
            # it answers is dropped rather than written after this answer.
            request_cycle.disconnected = True
            request_cycle.message_event.set()
            if request_cycle.response_started:
                self.transport.close()
                return
        self._answer(error)

    def _answer(self, error: PinauthError) -> None:
        body = json.dumps(error.body()).encode()
        default_headers = b"".join(
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        )
        self.transport.write(
            STATUS_LINE[error.status_code]
            + default_headers
            + _REFUSAL_HEADERS
            + b"content-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        if self.transport.can_write_eof():
            # Closing with unread input would send a reset, which can overtake the answer.
            self.transport.write_eof()
            self.loop.call_later(_LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this configuration's limits (uvicorn instantiates it)."""

    class Configured(GuardedHttpToolsProtocol):
        max_head_bytes = settings.max_header_bytes
        read_timeout = settings.request_read_timeout_seconds
        first_byte_timeout = settings.first_byte_timeout_seconds
        pending = PendingHeads(settings.max_pending_per_client)

    return Configured


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to the hard limit.

    Every connection is a file descriptor, and the usual soft limit is 1,024: a few
    hundred idle sockets would otherwise leave no room for anyone else's. Logged either
    way; spawned workers inherit it.
    """
    if sys.platform == "win32":  # pragma: no cover - no RLIMIT_NOFILE there
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open-file limit (RLIMIT_NOFILE) is %s, its hard limit", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:  # macOS refuses an unlimited soft limit
        log.warning("could not raise the open-file limit from %s to %s: %s", soft, hard, e)
        return
    log.info("raised the open-file limit (RLIMIT_NOFILE) from %s to %s", soft, hard)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `pinauth serve` hands uvicorn besides the app, address and logging."""
    return {
        "http": guarded_protocol(settings),
        # pinauth logs each request itself (with request id, route and duration).
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout_seconds,
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        # Keeps `Server` banners off responses; the service's name is no one's business.
        "server_header": False,
    }


# glibc's mallopt parameter number, and the size from which allocations get pages of
# their own (the proxied bodies, up to PINAUTH_MAX_BODY_BYTES).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1024 * 1024


def map_large_allocations() -> None:
    """Give every allocation of 1 MiB or more (request bodies) pages of its own, which go
    back to the system when it is freed.

    glibc otherwise raises that threshold to the largest block freed so far, so after the
    first large upload, bodies come from the heap, and uploads arriving together leave it
    fragmented: with 40 concurrent 9 MB uploads, peak memory grew some 15-25 MiB more.
    Only under glibc, and not if MALLOC_MMAP_THRESHOLD_ is set (the operator's choice).
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES):
        log.warning("could not set malloc's mmap threshold")
