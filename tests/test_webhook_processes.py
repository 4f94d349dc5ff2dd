"""The outbox survives kill -9: real `pinauth serve` and `pinauth sandbox` processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import sandbox_login, sandboxed_pinauth

SECRET = "kill-test-webhook-secret-" + "w" * 32


class Receiver:
    """A webhook receiver on loopback: holds the first delivery it gets, answers the rest."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, bytes]] = []
        self.first_held = asyncio.Event()
        self.second = asyncio.Event()
        self.release = asyncio.Event()
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                headers = dict(
                    (name.strip().lower(), value.strip())
                    for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
                    if name
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.deliveries.append((headers["pinauth-event-id"], body))
                if len(self.deliveries) == 1:
                    self.first_held.set()
                    await self.release.wait()  # the sender is killed while it waits
                self.second.set()
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def receiving() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    try:
        yield receiver, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    finally:
        server.close()
        # The held handler answers its (dead) sender and ends, so no task or socket is
        # left behind for the garbage collector to complain about.
        receiver.release.set()
        await asyncio.gather(*receiver.handlers, return_exceptions=True)


async def outbox_rows(database_url: str) -> list[tuple[str, str, int]]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT public_id, status, attempts FROM webhook_events ORDER BY id")
            )
            return [(row[0], row[1], row[2]) for row in rows]
    finally:
        await engine.dispose()


async def test_an_event_committed_before_kill_9_is_delivered_after_restart(
    tmp_path: Path, database_url: str
) -> None:
    """connection.created commits with the login; the process is killed while the
    receiver holds its delivery (so nothing recorded it as sent); the restarted process
    delivers it. Without the lease running out (or without the outbox) it never would."""
    async with receiving() as (receiver, url):
        rig = sandboxed_pinauth(
            tmp_path,
            database_url,
            "/readyz",
            PINAUTH_WEBHOOK_URL=url,
            PINAUTH_WEBHOOK_SECRETS=SECRET,
            PINAUTH_WEBHOOK_TIMEOUT="1",
        )
        await asyncio.to_thread(rig.sandbox.start)
        try:
            await asyncio.to_thread(rig.service.start)
            with httpx.Client(timeout=30) as browser:
                await asyncio.to_thread(sandbox_login, browser, rig.base, rig.sandbox_url)
            async with asyncio.timeout(30):
                await receiver.first_held.wait()
            await asyncio.to_thread(rig.service.kill)  # SIGKILL: no shutdown, no cleanup
            [(event_id, status, attempts)] = await outbox_rows(database_url)
            assert (status, attempts) == ("pending", 0)

            await asyncio.to_thread(rig.service.start)
            async with asyncio.timeout(60):
                await receiver.second.wait()
            await asyncio.to_thread(rig.service.stop)
        finally:
            await asyncio.to_thread(rig.service.kill)
            await asyncio.to_thread(rig.sandbox.stop)

    assert [event for event, _ in receiver.deliveries] == [event_id, event_id]
    assert json.loads(receiver.deliveries[1][1])["type"] == "connection.created"
    assert await outbox_rows(database_url) == [(event_id, "delivered", 1)]
