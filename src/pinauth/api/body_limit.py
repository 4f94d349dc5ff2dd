"""A small request body limit for every route but the proxy's."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pinauth.api.responses import error_response
from pinauth.errors import PayloadTooLarge
from pinauth.numbers import ascii_int

# pinauth's own routes take JSON of a few hundred bytes (an end user id, a return_to URL
# of at most 2 KiB, a TTL). FastAPI reads and parses a route's body before resolving any
# dependency, the API key check included, so without a limit anyone could make pinauth
# buffer and parse megabytes unauthenticated. 64 KiB is far above any real body.
MAX_BODY_BYTES = 64 * 1024
MESSAGE = f"The request body is larger than {MAX_BODY_BYTES} bytes."


class BodyTooLarge(HTTPException):
    """Raised by `receive` once the body passes the limit.

    An HTTPException so that FastAPI's body reading re-raises it instead of answering
    400 "error parsing the body"; app.py's handler renders its 413 as payload_too_large.
    """

    def __init__(self) -> None:
        super().__init__(status_code=413, detail=MESSAGE)


class BodyLimit:
    """Refuses a declared Content-Length over MAX_BODY_BYTES before the app runs, and
    stops a chunked body as soon as it passes the limit.

    Installed inside ProxyFastPath, which answers the proxy itself (with its own, larger
    PINAUTH_MAX_BODY_BYTES), so the proxy's hot path never reaches this. `exempt`: path
    prefixes that take the proxy's bodies (the sandbox it calls in demo mode).
    """

    def __init__(self, app: ASGIApp, *, exempt: tuple[str, ...]) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            # Refused unread; a malformed length is the HTTP server's to refuse.
            declared = ascii_int(value.decode("latin-1")) if name == b"content-length" else None
            if declared is not None and declared > MAX_BODY_BYTES:
                await error_response(PayloadTooLarge(MESSAGE))(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)
