"""How pinauth's own errors become HTTP responses (shared by the app and the proxy)."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from pinauth.errors import PinauthError


def error_response(exc: PinauthError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def client_disconnected_response() -> Response:
    # The client hung up while sending its body; nobody is left to read an answer.
    return Response(status_code=400)
