"""Reference forwarders for the benchmark: the same bare FastAPI route, two HTTP clients.

Run as `python bench/forwarders.py httpx|aiohttp PORT UPSTREAM_URL`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
import uvicorn
from fastapi import FastAPI, Response


def httpx_app(upstream: str) -> FastAPI:
    client: httpx.AsyncClient

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal client
        async with httpx.AsyncClient() as client:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/forward")
    async def forward() -> Response:
        upstream_response = await client.get(upstream)
        return Response(
            upstream_response.content,
            upstream_response.status_code,
            media_type=upstream_response.headers.get("content-type"),
        )

    return app


def aiohttp_app(upstream: str) -> FastAPI:
    session: aiohttp.ClientSession

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal session
        async with aiohttp.ClientSession() as session:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/forward")
    async def forward() -> Response:
        async with session.get(upstream) as upstream_response:
            body = await upstream_response.read()
            return Response(
                body, upstream_response.status, media_type=upstream_response.content_type
            )

    return app


if __name__ == "__main__":
    kind, port, upstream = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    app = {"httpx": httpx_app, "aiohttp": aiohttp_app}[kind](upstream)
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")
