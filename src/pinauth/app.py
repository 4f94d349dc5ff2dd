"""The application factory and its lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypedDict

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from pinauth import __version__
from pinauth.api import auth as auth_routes
from pinauth.api import demo as demo_routes
from pinauth.api import docs as docs_routes
from pinauth.api import me as me_routes
from pinauth.api import ops as ops_routes
from pinauth.api import pinterest as pinterest_routes
from pinauth.api import v1 as v1_routes
from pinauth.api import webhook_events as webhook_event_routes
from pinauth.api.body_limit import BodyLimit
from pinauth.api.demo_backend import demo_backend_router
from pinauth.api.deps import Services
from pinauth.api.pinterest import ProxyFastPath, is_proxy_request
from pinauth.api.responses import client_disconnected_response, error_response
from pinauth.apikeys import ApiKeyService
from pinauth.auth import AuthService, CookieNames
from pinauth.cache import ConnectionCache
from pinauth.clientstate import ClientCredentialsProbe
from pinauth.connect import ConnectSessions
from pinauth.connections import ConnectionService
from pinauth.crypto import CursorCodec, TokenCipher
from pinauth.db import create_engine, create_sessionmaker
from pinauth.demo import SANDBOX_PREFIX, DemoReceiver
from pinauth.demobackend import DemoBackend
from pinauth.errors import DatabaseUnavailable, PinauthError
from pinauth.frontend import CORS_ALLOWED_HEADERS, CORS_EXPOSED_HEADERS
from pinauth.governor import RateGovernor
from pinauth.housekeeping import ExpiredRowPurger
from pinauth.keeper import Keeper
from pinauth.migrations import schema_head
from pinauth.observability import Metrics, RequestContextMiddleware
from pinauth.outage import OutageTracker
from pinauth.pinterest.api import PinterestAPI
from pinauth.pinterest.client import PinterestClient
from pinauth.pinterest.http import create_http_client, create_transport
from pinauth.pinterest.oauth import PinterestOAuth
from pinauth.proxy import InflightBodies, ProxyService
from pinauth.proxytokens import ProxyTokenService
from pinauth.revalidation import CacheRevalidator
from pinauth.sandbox import SandboxConfig, create_sandbox_app
from pinauth.settings import Settings
from pinauth.shutdown import Shutdown, ShutdownMiddleware
from pinauth.tokens import TokenManager
from pinauth.webhooks import WebhookDispatcher, WebhookEvents, create_webhook_client

log = logging.getLogger(__name__)


class State(TypedDict):
    services: Services


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    sandbox: SandboxConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
    shutdown: Shutdown | None = None,
    demo_backend_url: str | None = None,
) -> FastAPI:
    """Build the service.

    `transport` replaces the network under the Pinterest client (tests); `sandbox`
    mounts the built-in Pinterest sandbox at /sandbox (demo mode); `clock` is the
    monotonic clock of the rate governor and of the token manager's cooldowns (tests move
    it instead of waiting); `shutdown` is
    flagged by the server when it starts shutting down (see shutdown.py);
    `demo_backend_url`, where pinauth reaches itself, adds the demo page's backend
    panel (demo mode; see demobackend.py).
    """
    settings.validate_for_serving()
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
    metrics = Metrics()
    outage = OutageTracker()
    head = schema_head()
    demo_backend = DemoBackend(demo_backend_url) if demo_backend_url else None

    @asynccontextmanager
    async def lifespan(served: FastAPI) -> AsyncIterator[State]:
        engine = create_engine(settings)
        outage.watch(engine)
        sessionmaker = create_sessionmaker(engine)
        network = transport or create_transport()
        http = create_http_client(settings, network)
        oauth = PinterestOAuth(http, settings, metrics)
        cache = ConnectionCache(settings.cache_ttl_seconds)
        tokens = TokenManager(settings, sessionmaker, oauth, cipher, cache, metrics, clock=clock)
        api_keys = ApiKeyService(sessionmaker, settings.cache_ttl_seconds)
        governor = RateGovernor(metrics, clock=clock)
        connections = ConnectionService(sessionmaker, cache, CursorCodec(cipher))
        services = Services(
            settings=settings,
            sessionmaker=sessionmaker,
            auth=AuthService(
                settings,
                sessionmaker,
                oauth,
                PinterestAPI(http, settings),
                cipher,
                cache,
                client_credentials=tokens.client_credentials,
            ),
            api_keys=api_keys,
            connect_sessions=ConnectSessions(settings, sessionmaker, cache),
            connections=connections,
            tokens=tokens,
            proxy=ProxyService(
                tokens,
                PinterestClient(network, settings, metrics=metrics, rate_limits=governor),
                governor,
            ),
            metrics=metrics,
            schema_head=head,
            proxy_tokens=ProxyTokenService(sessionmaker, cache, connections),
            webhook_events=WebhookEvents(sessionmaker, CursorCodec(cipher)),
            bodies=InflightBodies(settings.max_inflight_body_bytes),
        )
        if not settings.client_id:
            log.warning("PINTEREST_CLIENT_ID is not set: /auth/login will answer 503 until it is")
        purger = ExpiredRowPurger(sessionmaker, settings.purge_interval_seconds)
        served.state.purger = purger  # for tests and anyone inspecting the running app
        purger.start()
        revalidator = None
        if settings.cache_ttl_seconds > 0:
            revalidator = CacheRevalidator(sessionmaker, cache, settings.cache_ttl_seconds)
            served.state.cache_revalidator = revalidator
            revalidator.start()
        # Keeper or not: it is what ends the refused-credentials state on an idle replica.
        probe = ClientCredentialsProbe.of(tokens.client_credentials, oauth)
        served.state.client_credentials_probe = probe
        probe.start()
        keeper = None
        if settings.keeper:
            keeper = Keeper(settings, sessionmaker, tokens, metrics)
            served.state.keeper = keeper
            keeper.start()
        dispatcher = None
        if settings.webhook_url:
            webhook_http = create_webhook_client(settings)
            dispatcher = WebhookDispatcher(settings, sessionmaker, webhook_http, metrics=metrics)
            served.state.webhook_dispatcher = dispatcher
            dispatcher.start()
        try:
            if demo_backend is not None:
                await demo_backend.start(api_keys)
            yield {"services": services}
        finally:
            if demo_backend is not None:
                await demo_backend.aclose()
            if keeper is not None:
                await keeper.stop()
            if revalidator is not None:
                await revalidator.stop()
            await probe.stop()
            await purger.stop()
            if dispatcher is not None:
                await dispatcher.stop()
                await webhook_http.aclose()
            # Token calls in flight and unsaved tokens first: they need both the HTTP
            # client and the database, and are the only copy of a user's refresh token.
            await tokens.aclose()
            await api_keys.aclose()
            await http.aclose()
            await engine.dispose()

    app = PinauthApp(
        title="pinauth",
        version=__version__,
        summary="Connect users' Pinterest accounts and call Pinterest API v5 on their behalf.",
        lifespan=lifespan,
        # Replaced by api/docs.py, which adds each page's Content-Security-Policy.
        docs_url=None,
        redoc_url=None,
        # Starlette builds a trailing-slash redirect's Location from the Host header,
        # which the client chooses; /me/ is a 404 rather than a redirect to anywhere.
        redirect_slashes=False,
        telemetry={
            "tracing": settings.opentelemetry,
            "metrics": settings.opentelemetry,
            "logs": settings.opentelemetry,
        },
    )
    # Inside the proxy's fast path, so /pinterest pays nothing for it and keeps its own
    # PINAUTH_MAX_BODY_BYTES; everything else gets a small limit before its body is read,
    # but the sandbox, which the demo's proxy forwards those larger bodies to.
    app.add_middleware(BodyLimit, exempt=(SANDBOX_PREFIX + "/",))
    proxy_route = pinterest_routes.proxy_route("GET")
    if settings.opentelemetry:
        # Inside FastAPI, so its telemetry sees every proxied call; innermost of the
        # middlewares but the body limit, so CORS and request context still wrap it.
        app.add_middleware(ProxyFastPath, route=proxy_route, outage=outage)
    edge = _edge_layers(settings, metrics, shutdown or Shutdown())
    for layer in edge:
        app.add_middleware(layer.cls, *layer.args, **layer.kwargs)
    if not settings.opentelemetry:
        # The same fast path and the same edge layers, without FastAPI's own outer ones:
        # with telemetry off they do nothing for the proxy but cost each of its suspensions
        # a pass through their frames (make bench, 1 connection, medians of 3 alternating
        # runs: 4,534 -> 4,750 req/s, 219 -> 210 us of CPU a request).
        stack: ASGIApp = ProxyFastPath(_never, route=proxy_route, outage=outage)
        for layer in edge:
            stack = layer.cls(stack, *layer.args, **layer.kwargs)
        app.proxy_stack = ServerErrorMiddleware(stack, handler=unexpected_error)
    _install_error_handlers(app, outage)
    app.include_router(auth_routes.router)
    app.include_router(me_routes.router)
    app.include_router(v1_routes.router)
    app.include_router(webhook_event_routes.router)
    app.include_router(ops_routes.router)
    app.include_router(demo_routes.router)
    if demo_backend is not None:
        app.include_router(demo_backend_router(demo_backend))
    app.include_router(
        docs_routes.docs_router(title=app.title, openapi_url=app.openapi_url or "/openapi.json")
    )
    docs_routes.install_openapi(app, CookieNames.of(settings).session)
    if settings.demo_page:
        # The demo page's own files: nothing else serves from here.
        app.mount("/static", StaticFiles(directory=demo_routes.STATIC_DIR), name="static")
    if sandbox is not None:
        app.mount(SANDBOX_PREFIX, create_sandbox_app(sandbox))
        app.state.demo_receiver = DemoReceiver(settings)
        app.include_router(demo_routes.receiver_router)
    # The proxy's APIRoutes define and document the operation; ProxyFastPath serves the
    # same endpoint ahead of the router, and they would answer if it stepped aside.
    app.router.routes[0:0] = pinterest_routes.router.routes
    return app


class PinauthApp(FastAPI):
    """FastAPI, with the proxy's requests handed to `proxy_stack` when it is set."""

    proxy_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stack = self.proxy_stack
        if stack is not None and is_proxy_request(scope):
            scope["app"] = self
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _edge_layers(settings: Settings, metrics: Metrics, shutdown: Shutdown) -> list[Middleware]:
    """What every response passes through, innermost first."""
    layers = [
        # Outside every route, the fast path included, and inside CORS and request
        # context, so a request cut short by the shutdown is still logged, counted and
        # CORS-readable.
        Middleware(ShutdownMiddleware, shutdown=shutdown),
    ]
    if settings.cors_origins:
        layers.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_credentials=True,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=CORS_ALLOWED_HEADERS,
                expose_headers=CORS_EXPOSED_HEADERS,
            )
        )
    # Outermost: every response gets a request id, is counted, and is logged once.
    layers.append(
        Middleware(RequestContextMiddleware, metrics=metrics, log_requests=settings.access_log)
    )
    return layers


async def _never(scope: Scope, receive: Receive, send: Send) -> None:
    """Behind the proxy stack's fast path, which serves every request routed to it."""
    raise RuntimeError(f"not a proxy request: {scope['method']} {scope['path']}")


async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(
        {"error": "internal_error", "message": "Something went wrong inside pinauth."},
        status_code=500,
    )


def _install_error_handlers(app: FastAPI, outage: OutageTracker) -> None:
    @app.exception_handler(PinauthError)
    async def pinauth_error(_request: Request, exc: PinauthError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DatabaseUnavailable)
    async def database_unavailable(_request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        outage.refused()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse(
            {"error": "invalid_request", "message": f"Invalid request: {problems}"},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 413: the body limit (api/body_limit.py) stopping a body as it arrives.
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return JSONResponse(
            {"error": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(_request: Request, _exc: ClientDisconnect) -> Response:
        return client_disconnected_response()

    app.add_exception_handler(Exception, unexpected_error)
