"""The `pinauth` command."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import logging.config
import sys
from collections.abc import Sequence
from datetime import datetime

from pinauth import preflight
from pinauth.errors import ConfigurationError, InvalidRequest
from pinauth.logs import logging_config
from pinauth.settings import Settings


def _load_settings(command: preflight.Command) -> Settings:
    """The settings, once nothing in them is wrong for `command` (else every problem)."""
    settings, found = preflight.load_settings()
    preflight.require(found + preflight.problems(settings, command))
    return settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whoever resolves it can connect


def _serve(args: argparse.Namespace) -> None:
    from pinauth.workers import serve_many, serve_one

    settings, found = preflight.load_settings()
    sandbox = None
    if args.workers < 1:
        found.append("--workers must be at least 1")
    if args.demo:
        from pinauth.demo import demo_settings, public_base_url

        if args.workers > 1:
            found.append(
                "--demo serves with one worker: the sandbox keeps its state in one process"
            )
        logging.config.dictConfig(logging_config("info", settings.log_format))
        settings, sandbox = demo_settings(settings, args.host, args.port)
        log = logging.getLogger("pinauth")
        log.warning("=" * 72)
        log.warning("DEMO MODE: Pinterest is pinauth's built-in sandbox, not the real one.")
        log.warning(
            "Open %s/ to try it. Never run --demo in production.",
            public_base_url(args.host, args.port),
        )
        log.warning("=" * 72)
    # Every problem at once, and before anything (a database file, a migration) exists.
    found += preflight.problems(settings, "serve", demo=args.demo, workers=args.workers)
    preflight.require(found)
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    if not settings.metrics_token.get_secret_value() and not _is_loopback(args.host):
        logging.getLogger("pinauth").warning(
            "PINAUTH_METRICS_TOKEN is not set and pinauth listens on %s: anyone who can "
            "reach it can read /metrics. Set PINAUTH_METRICS_TOKEN and give Prometheus "
            "that bearer token.",
            args.host,
        )
    preflight.migrate(settings)
    if args.workers > 1:
        status = serve_many(settings, args.host, args.port, args.workers)
    else:
        status = serve_one(settings, args.host, args.port, sandbox)
    if status:
        sys.exit(status)


def _sandbox(args: argparse.Namespace) -> None:
    import uvicorn

    from pinauth.sandbox import SandboxConfig, create_sandbox_app

    config = SandboxConfig(redirect_uris=tuple(args.redirect_uri or SandboxConfig.redirect_uris))
    print(
        f"pinauth sandbox on http://{args.host}:{args.port}: client_id={config.client_id} "
        f"client_secret={config.client_secret} redirect_uris={','.join(config.redirect_uris)}",
        file=sys.stderr,
    )
    uvicorn.run(
        create_sandbox_app(config),
        host=args.host,
        port=args.port,
        log_config=logging_config("info"),
        server_header=False,
    )


def _migrate(_args: argparse.Namespace) -> None:
    settings = _load_settings("migrate")
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    preflight.migrate(settings)
    logging.getLogger("pinauth").info("database schema is at head")


def _api_keys(args: argparse.Namespace) -> None:
    import asyncio

    from pinauth.apikeys import ApiKeyService
    from pinauth.db import create_engine, create_sessionmaker

    settings = _load_settings("api-keys")
    preflight.migrate(settings)

    async def run() -> None:
        engine = create_engine(settings)
        try:
            keys = ApiKeyService(create_sessionmaker(engine), cache_ttl=0)
            if args.action == "create":
                created = await keys.create(args.name)
                print(f"Created API key {created.name!r}. It is shown only now; store it:")
                print(created.key)
            elif args.action == "list":
                print(f"{'NAME':<24} {'PREFIX':<20} {'CREATED':<20} {'LAST USED':<20} STATUS")
                for key in await keys.list():
                    print(
                        f"{key.name:<24} {key.prefix + '…':<20} {_when(key.created_at):<20} "
                        f"{_when(key.last_used_at):<20} "
                        f"{'revoked ' + _when(key.revoked_at) if key.revoked_at else 'active'}"
                    )
            elif not await keys.revoke(args.name):
                raise ConfigurationError(f"no active API key is named {args.name!r}")
            else:
                print(f"Revoked API key {args.name!r}.")
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except InvalidRequest as e:
        raise ConfigurationError(e.message) from e


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "never"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pinauth", description="Pinterest OAuth and API proxy service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="migrate the database, then run the service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="use the built-in Pinterest sandbox (mounted at /sandbox) instead of Pinterest",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes sharing the port, to use N cores (needs PostgreSQL)",
    )
    serve.set_defaults(handler=_serve)

    sandbox = commands.add_parser("sandbox", help="run the Pinterest sandbox on its own")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8001)
    sandbox.add_argument(
        "--redirect-uri",
        action="append",
        help="a redirect URI the sandbox app accepts (repeatable; default "
        "http://localhost:8000/auth/callback)",
    )
    sandbox.set_defaults(handler=_sandbox)

    migrate = commands.add_parser("migrate", help="bring the database schema to head")
    migrate.set_defaults(handler=_migrate)

    api_keys = commands.add_parser("api-keys", help="create, list and revoke API keys")
    actions = api_keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; it is printed once, last")
    create.add_argument("--name", required=True, help="a unique name, e.g. the app's backend")
    actions.add_parser("list", help="names, prefixes, created and last-used times")
    revoke = actions.add_parser("revoke", help="revoke a key by name, at once")
    revoke.add_argument("name")
    api_keys.set_defaults(handler=_api_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigurationError as e:
        print(f"pinauth: cannot start: {e}", file=sys.stderr)
        return 2
    return 0
