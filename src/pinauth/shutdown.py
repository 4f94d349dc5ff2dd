"""Shutdown past its timeout: requests still running get a clean 503, not a 500 and a traceback.

On SIGTERM uvicorn stops accepting connections and gives in-flight requests
`PINAUTH_SHUTDOWN_TIMEOUT` seconds. When that runs out, `uvicorn.Server.shutdown` (0.54)
calls `task.cancel()` on every request task still running and goes on to the lifespan
shutdown without waiting for them. The CancelledError rises through the app (Starlette's
error middleware catches `Exception`, not cancellations) into uvicorn's `run_asgi`, which
logs "Exception in ASGI application" with a traceback and answers a plain-text 500.

`ShutdownMiddleware` catches that cancellation, answers 503 `shutting_down` with
`Retry-After` and `Connection: close` if the response has not started, and ends the request
there, so uvicorn has nothing to log. It acts only once `Server` has flagged the shutdown:
any other cancellation propagates as before. Work that must outlive the request (a token
refresh whose answer has to be stored) belongs in a task of its own that the lifespan
shutdown waits for: cancelling the request does not cancel such a task.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pinauth.api.responses import error_response
from pinauth.errors import ShuttingDown


class Shutdown:
    """Set when the server begins to shut down; the middleware reads it."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


class Server(uvicorn.Server):
    """uvicorn's server, flagging `shutdown` before it starts to drain and cancel requests."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self._flag = shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._flag.started = True
        await super().shutdown(sockets)


class ShutdownMiddleware:
    """Turns the shutdown's cancellation of a request into a 503 the client can act on."""

    def __init__(self, app: ASGIApp, *, shutdown: Shutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_watched(message: Message) -> None:
            nonlocal response_started
            response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except asyncio.CancelledError:
            if not self.shutdown.started:
                raise
            # Not re-raised: uvicorn cancelled this task and waits for nothing from it; a
            # re-raised cancellation is what it logs as a traceback. A response that had
            # already started cannot change its status; uvicorn closes that connection.
            if not response_started:
                await error_response(ShuttingDown())(scope, receive, send)
