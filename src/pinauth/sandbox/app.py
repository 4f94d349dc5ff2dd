"""A local Pinterest that speaks v5's real wire format, for demos and tests.

Mounted by `pinauth serve --demo` at /sandbox, or standalone with `pinauth sandbox`.
Test controls live under /_sandbox/ and exist only here, never in pinauth itself.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pinauth.sandbox.api import api_router
from pinauth.sandbox.controls import controls_router
from pinauth.sandbox.errors import PinterestError, error
from pinauth.sandbox.oauth import oauth_router
from pinauth.sandbox.state import Fault, SandboxConfig, StateHolder


def create_sandbox_app(config: SandboxConfig | None = None) -> FastAPI:
    holder = StateHolder(config or SandboxConfig())
    app = FastAPI(
        title="pinauth sandbox",
        summary="A local Pinterest API v5 for demos and tests.",
        version="5.23.0",
        # A trailing-slash redirect would take its host from the Host header.
        redirect_slashes=False,
    )

    @app.exception_handler(PinterestError)
    async def pinterest_error(_request: Request, exc: PinterestError) -> Response:
        return error(exc.status, exc.code, exc.message)

    @app.middleware("http")
    async def count_and_inject_faults(request: Request, call_next: Any) -> Response:
        path = request.url.path[len(request.scope.get("root_path", "")) :]
        state = holder.state
        if path.startswith("/v5/"):
            if path != "/v5/oauth/token":
                state.api_requests[f"{request.method} {path}"] += 1
            fault = state.take_fault(path)
            if fault is not None:
                return await _fault_response(fault)
        response: Response = await call_next(request)
        return response

    # Order matters: the API router ends with a catch-all under /v5/.
    app.include_router(oauth_router(holder))
    app.include_router(api_router(holder))
    app.include_router(controls_router(holder))
    return app


async def _fault_response(fault: Fault) -> Response:
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.body is None:
        content = b""
    elif isinstance(fault.body, str):
        content = fault.body.encode()
    else:
        content = json.dumps(fault.body).encode()
    headers = {"content-type": "application/json"} | fault.headers
    return Response(content, status_code=fault.status, headers=headers)
