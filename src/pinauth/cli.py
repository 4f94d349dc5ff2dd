"""The `pinauth` command."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import logging.config
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

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
    from pinauth.server import map_large_allocations, raise_open_file_limit
    from pinauth.workers import serve_many, serve_one

    settings, found = preflight.load_settings()
    sandbox = None
    demo_backend_url = None
    if args.workers < 1:
        found.append("--workers must be at least 1")
    if args.demo:
        from pinauth.demo import demo_settings, public_base_url, self_url

        if args.workers > 1:
            found.append(
                "--demo serves with one worker: the sandbox keeps its state in one process"
            )
        logging.config.dictConfig(logging_config("info", settings.log_format))
        settings, sandbox = demo_settings(settings, args.host, args.port)
        demo_backend_url = self_url(args.host, args.port)
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
    found += preflight.listen_problems(args.host, args.port)
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
    # Each connection is a descriptor: the usual soft limit (1,024) is too few to serve
    # through a crowd of idle sockets. Workers inherit it.
    raise_open_file_limit()
    # Request bodies get pages of their own, returned when freed (see server.py).
    map_large_allocations()
    if args.workers > 1:
        status = serve_many(settings, args.host, args.port, args.workers)
    else:
        status = serve_one(
            settings, args.host, args.port, sandbox, demo_backend_url=demo_backend_url
        )
    if status:
        sys.exit(status)


def _sandbox(args: argparse.Namespace) -> None:
    import uvicorn

    from pinauth.demo import loopback_hosts
    from pinauth.sandbox import SandboxConfig, create_sandbox_app

    config = SandboxConfig(
        redirect_uris=tuple(args.redirect_uri or SandboxConfig.redirect_uris),
        control_hosts=loopback_hosts(args.host, args.port),
    )
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


def _keeper(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    from pinauth.cache import ConnectionCache
    from pinauth.crypto import TokenCipher
    from pinauth.db import create_engine, create_sessionmaker
    from pinauth.keeper import Keeper
    from pinauth.observability import Metrics
    from pinauth.pinterest.http import create_http_client, create_transport
    from pinauth.pinterest.oauth import PinterestOAuth
    from pinauth.tokens import TokenManager

    settings = _load_settings("keeper")
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    preflight.migrate(settings)
    log = logging.getLogger("pinauth")

    async def run() -> None:
        engine = create_engine(settings)
        sessionmaker = create_sessionmaker(engine)
        metrics = Metrics()
        http = create_http_client(settings, create_transport())
        cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
        tokens = TokenManager(
            settings,
            sessionmaker,
            PinterestOAuth(http, settings, metrics),
            cipher,
            ConnectionCache(settings.cache_ttl_seconds),
            metrics,
        )
        keeper = Keeper(settings, sessionmaker, tokens, metrics)
        try:
            if args.once:
                done = await keeper.run_once()
                print(
                    f"refreshed {done.refreshed}, failed {done.failed}, "
                    f"need reauthorization {done.reauthorization_required}"
                )
                if tokens.client_credentials.rejected:
                    raise CommandFailed(
                        "Pinterest refuses this app's client credentials (PINTEREST_CLIENT_ID "
                        "/ PINTEREST_CLIENT_SECRET); no connection was changed. Fix them and "
                        "run this again."
                    )
                return
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            log.info(
                "keeper running: every %ss, connections expiring within %d days",
                settings.keeper_interval_seconds,
                settings.keepalive_days,
            )
            keeper.start()
            await stop.wait()
            log.info("keeper stopping")
            await keeper.stop()
        finally:
            await tokens.aclose()
            await http.aclose()
            await engine.dispose()

    asyncio.run(run())


def _rotate_keys(args: argparse.Namespace) -> None:
    import asyncio

    from pinauth.crypto import TokenCipher
    from pinauth.db import create_engine, create_sessionmaker
    from pinauth.rotation import KeyRotator, fingerprint

    settings = _load_settings("maintenance")
    settings.validate_for_serving()
    logging.config.dictConfig(logging_config("warning", settings.log_format))
    preflight.migrate(settings)
    keys = [key.get_secret_value() for key in settings.encryption_keys]
    if args.batch_size < 1:
        raise ConfigurationError("--batch-size must be at least 1")

    async def run() -> int:
        engine = create_engine(settings)
        try:
            rotator = KeyRotator(
                create_sessionmaker(engine), TokenCipher(keys), batch_size=args.batch_size
            )
            if not args.check:
                report = await rotator.rotate()
                print(
                    f"re-encrypted {report.rotated} rows under key 1 ({fingerprint(keys[0])}); "
                    f"{report.already_current} were already; {report.retried} written "
                    f"meanwhile were read again"
                )
                if report.undecryptable:
                    print(
                        f"{report.undecryptable} rows no configured key decrypts; "
                        f"{report.marked} of them now need a new login"
                    )
                if report.gave_up:
                    print(f"{report.gave_up} rows kept changing: run rotate-keys again")
            usage = await rotator.check()
            print(f"{usage.rows} connections:")
            for index, key in enumerate(keys):
                role = " (first: encrypts new tokens)" if index == 0 else ""
                print(f"  key {index + 1} {fingerprint(key)}{role}: {usage.by_key.get(index, 0)}")
            print(f"  no configured key: {usage.undecryptable}")
            if usage.undecryptable_active:
                print(
                    f"{usage.undecryptable_active} active rows no configured key decrypts: was "
                    "a key removed too early? Put it back, or run rotate-keys to mark them "
                    "for a new login."
                )
                return 1
            if usage.outdated:
                print("Some rows still need a key other than the first: keep it configured.")
                return 1
            if len(keys) > 1:
                print(
                    "Only key 1 is in use: the others can be removed from PINAUTH_ENCRYPTION_KEYS."
                )
            return 0
        finally:
            await engine.dispose()

    status = asyncio.run(run())
    if args.check and status:
        sys.exit(status)


def _webhooks(args: argparse.Namespace) -> None:
    import asyncio

    from pinauth.db import create_engine, create_sessionmaker
    from pinauth.errors import WebhookEventNotFound
    from pinauth.models import WebhookEventStatus
    from pinauth.webhooks import WebhookEvents, looks_like_event_id

    if args.action == "list" and not 1 <= args.limit <= 10_000:
        raise ConfigurationError("--limit must be between 1 and 10000")
    since = None
    if args.action == "redeliver":
        since = _redelivery_check(args)
    if args.action == "redeliver" and args.event_id and not looks_like_event_id(args.event_id):
        # ascii(): the argument may hold bytes that are not UTF-8 (surrogate escapes).
        raise CommandFailed(
            f"{args.event_id!a} is not a webhook event id; ids look like evt_ followed by "
            "26 lowercase letters and digits (see `pinauth webhooks list`)."
        )
    settings = _load_settings("migrate")  # the outbox holds no secrets: the database is enough
    preflight.migrate(settings)

    async def run() -> None:
        engine = create_engine(settings)
        try:
            events = WebhookEvents(create_sessionmaker(engine))
            if args.action == "list":
                status = WebhookEventStatus.FAILED if args.failed else None
                rows, _ = await events.page(limit=args.limit, status=status)
                print(
                    f"{'EVENT':<34} {'TYPE':<38} {'CONNECTION':<34} {'STATUS':<10} "
                    f"{'TRIES':>5} {'CREATED':<20} LAST ERROR"
                )
                for e in rows:
                    # A delivered event's last error is history: shown, it reads as a fault.
                    delivered = e.status is WebhookEventStatus.DELIVERED
                    error = "" if delivered else e.last_error or ""
                    print(
                        f"{e.public_id:<34} {e.type:<38} {e.connection_id:<34} {e.status:<10} "
                        f"{e.attempts:>5} {_when(e.created_at):<20} {error}"
                    )
            elif args.failed:
                count, connections = await events.redeliver_failed(since)
                if not count:
                    print(f"No failed webhook events{_since_words(since)} to redeliver.")
                    return
                print(
                    f"{count} failed webhook event{'s' if count != 1 else ''} of {connections} "
                    f"connection{'s' if connections != 1 else ''}{_since_words(since)} "
                    "queued for delivery again, in order per connection; a running "
                    "`pinauth serve` sends them within seconds."
                )
            else:
                found = await events.redeliver(args.event_id)
                print(
                    f"Event {found.event.public_id} ({found.event.type}) is queued for delivery "
                    "again; a running `pinauth serve` sends it within seconds."
                )
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except WebhookEventNotFound as e:
        raise CommandFailed(f"{e.message.rstrip('.')}: {args.event_id!r}.") from e


def _redelivery_check(args: argparse.Namespace) -> datetime | None:
    """What `webhooks redeliver` was asked for, or one line saying what is wrong."""
    if args.event_id and args.failed:
        raise CommandFailed("give an EVENT_ID or --failed, not both.")
    if not args.event_id and not args.failed:
        raise CommandFailed(
            "give the EVENT_ID to send again, or --failed [--since TIME] for every failed event."
        )
    if args.since is None:
        return None
    if not args.failed:
        raise CommandFailed("--since goes with --failed: which failed events to send again.")
    return _parse_time("--since", args.since)


def _parse_time(option: str, value: str) -> datetime:
    """An ISO 8601 date or time; without an offset, UTC."""
    try:
        moment = datetime.fromisoformat(value.strip())
        # Converting to UTC can leave the years datetime holds (0001-01-01T00:00+01:00).
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise CommandFailed(
            f"{option} {value!a} is not a time; write it in ISO 8601, e.g. 2026-12-07 or "
            "2026-12-07T09:30:00Z (UTC unless it has an offset)."
        ) from None
    except OverflowError:
        raise CommandFailed(
            f"{option} {value!a} is out of range: in UTC it falls outside the years 1 to 9999."
        ) from None


def _since_words(since: datetime | None) -> str:
    return "" if since is None else f" created since {_when(since)} UTC"


def _connections(args: argparse.Namespace) -> None:
    if args.action == "recheck":
        _recheck(args)
        return
    import asyncio

    from pinauth.cache import ConnectionCache
    from pinauth.connections import ConnectionService
    from pinauth.crypto import CursorCodec, TokenCipher
    from pinauth.db import create_engine, create_sessionmaker
    from pinauth.errors import ConnectionNotFound

    settings = _load_settings("maintenance")
    if not settings.encryption_keys:
        raise ConfigurationError("PINAUTH_ENCRYPTION_KEYS is missing")
    preflight.migrate(settings)
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])

    async def run() -> None:
        engine = create_engine(settings)
        try:
            service = ConnectionService(
                create_sessionmaker(engine), ConnectionCache(0), CursorCodec(cipher)
            )
            await service.delete(args.connection_id)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except ConnectionNotFound as e:
        # Not a reason the command "cannot start": it ran, and found nothing to delete.
        raise CommandFailed(f"{e.message.rstrip('.')}: {args.connection_id!a}.") from e
    print(
        f"Deleted connection {args.connection_id}: its tokens are gone and its sessions ended "
        "(other replicas notice within PINAUTH_CACHE_TTL)."
    )


def _recheck(args: argparse.Namespace) -> None:
    """`pinauth connections recheck`: try marked connections' stored refresh tokens once."""
    import asyncio

    from pinauth.cache import ConnectionCache
    from pinauth.crypto import TokenCipher
    from pinauth.db import create_engine, create_sessionmaker
    from pinauth.errors import (
        NotAuthenticated,
        PinterestClientRejected,
        UpstreamError,
        UpstreamTimeout,
    )
    from pinauth.observability import Metrics
    from pinauth.pinterest.http import create_http_client, create_transport
    from pinauth.pinterest.oauth import PinterestOAuth
    from pinauth.repository import ConnectionRepository
    from pinauth.tokens import RecheckOutcome, TokenManager
    from pinauth.webhooks import EventType

    since = _parse_time("--since", args.since) if args.since is not None else None
    settings = _load_settings("keeper")  # it calls Pinterest's token endpoint, as the keeper
    logging.config.dictConfig(logging_config("warning", settings.log_format))
    preflight.migrate(settings)

    async def run() -> int:
        engine = create_engine(settings)
        sessionmaker = create_sessionmaker(engine)
        metrics = Metrics()
        http = create_http_client(settings, create_transport())
        tokens = TokenManager(
            settings,
            sessionmaker,
            PinterestOAuth(http, settings, metrics),
            TokenCipher([key.get_secret_value() for key in settings.encryption_keys]),
            ConnectionCache(0),
            metrics,
        )
        try:
            if since is not None:
                async with sessionmaker() as db:
                    ids = await ConnectionRepository(db).marked_since(
                        since, EventType.REAUTHORIZATION_REQUIRED.value
                    )
            else:
                ids = [args.id]
            outcomes: dict[str, int] = {}
            for public_id in ids:
                try:
                    outcome: str = await tokens.recheck(public_id)
                except NotAuthenticated as e:
                    raise CommandFailed(f"No connection has that id: {public_id!a}.") from e
                except PinterestClientRejected as e:
                    done = outcomes.get(RecheckOutcome.RECOVERED, 0)
                    raise CommandFailed(
                        "Pinterest refuses this app's client credentials (PINTEREST_CLIENT_ID "
                        f"/ PINTEREST_CLIENT_SECRET); {done} recovered before that, the rest "
                        "unchanged. Fix them and run this again."
                    ) from e
                except (UpstreamError, UpstreamTimeout, TimeoutError):
                    outcome = "not checked: Pinterest is unavailable, run this again"
                print(f"{public_id}: {outcome}")
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            recovered = outcomes.get(RecheckOutcome.RECOVERED, 0)
            rejected = outcomes.get(RecheckOutcome.STILL_REJECTED, 0)
            print(
                f"rechecked {len(ids)}: {recovered} recovered (connection.recovered sent), "
                f"{rejected} still need a new login, {len(ids) - recovered - rejected} other"
            )
            unchecked = sum(
                n
                for o, n in outcomes.items()
                if o.startswith("not checked") or o == RecheckOutcome.BUSY
            )
            return 1 if unchecked else 0
        finally:
            await tokens.aclose()
            await http.aclose()
            await engine.dispose()

    status = asyncio.run(run())
    if status:
        sys.exit(status)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "never"


class CommandFailed(Exception):
    """A command that started but cannot do what it was asked (not a configuration
    problem): one line on stderr, exit status 2."""


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

    keeper = commands.add_parser(
        "keeper", help="refresh connections before their refresh tokens expire (alone)"
    )
    keeper.add_argument("--once", action="store_true", help="one pass, then exit")
    keeper.set_defaults(handler=_keeper)

    rotate = commands.add_parser(
        "rotate-keys", help="re-encrypt stored tokens with the first PINAUTH_ENCRYPTION_KEYS key"
    )
    rotate.add_argument(
        "--check",
        action="store_true",
        help="only count the rows each key encrypts (exit 1 if any needs a key but the first)",
    )
    rotate.add_argument("--batch-size", type=int, default=200, help="rows per transaction")
    rotate.set_defaults(handler=_rotate_keys)
    webhooks = commands.add_parser("webhooks", help="list webhook events, redeliver them")
    webhook_actions = webhooks.add_subparsers(dest="action", required=True)
    listing = webhook_actions.add_parser("list", help="the newest events, newest first")
    listing.add_argument("--failed", action="store_true", help="only events that gave up")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    redeliver = webhook_actions.add_parser(
        "redeliver", help="send an event again, now; or every failed one (--failed)"
    )
    redeliver.add_argument("event_id", metavar="EVENT_ID", nargs="?")
    redeliver.add_argument(
        "--failed",
        action="store_true",
        help="every failed event, each connection's in order (not with EVENT_ID)",
    )
    redeliver.add_argument(
        "--since",
        metavar="TIME",
        help="with --failed: only events created at or after TIME (ISO 8601; UTC unless "
        "it has an offset), e.g. 2026-12-07T09:30:00Z",
    )
    webhooks.set_defaults(handler=_webhooks)

    connections = commands.add_parser(
        "connections", help="delete a connection, recheck marked ones"
    )
    connection_actions = connections.add_subparsers(dest="action", required=True)
    delete = connection_actions.add_parser(
        "delete", help="delete its tokens and end its sessions (reports connection.deleted)"
    )
    delete.add_argument("connection_id", metavar="CONNECTION_ID")
    recheck = connection_actions.add_parser(
        "recheck",
        help="try the stored refresh token of connections marked reauthorization_required "
        "once: those Pinterest still takes become active (reports connection.recovered)",
    )
    which = recheck.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--since",
        metavar="TIME",
        help="every connection marked since TIME (ISO 8601, UTC unless it has an offset), "
        "as far back as the webhook outbox keeps events (30 days past their retries)",
    )
    which.add_argument("--id", metavar="CONNECTION_ID", help="this one connection")
    connections.set_defaults(handler=_connections)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigurationError as e:
        print(f"pinauth: cannot start: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"pinauth: {e}", file=sys.stderr)
        return 2
    return 0
