"""The `pinauth` command."""

from __future__ import annotations

import argparse
import gc
import logging
import logging.config
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from pinauth.errors import ConfigurationError
from pinauth.logs import logging_config
from pinauth.settings import Settings


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigurationError(f"invalid configuration:\n{problems}") from e


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from pinauth.app import create_app
    from pinauth.migrations import upgrade_to_head

    settings = _load_settings()
    settings.validate_for_serving()
    logging.config.dictConfig(logging_config(settings.log_level))
    upgrade_to_head(settings.database_url)
    app = create_app(settings)
    # Everything built so far (modules, routes, models) lives as long as the process;
    # freezing it keeps the cyclic GC from re-scanning it in every full collection,
    # which showed up as latency spikes under load (see bench/).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=logging_config(settings.log_level),
        access_log=settings.access_log,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        # Keeps `Server` banners off responses; the service's name is no one's business.
        server_header=False,
    )


def _migrate(_args: argparse.Namespace) -> None:
    from pinauth.migrations import upgrade_to_head

    settings = _load_settings()
    logging.config.dictConfig(logging_config(settings.log_level))
    upgrade_to_head(settings.database_url)
    logging.getLogger("pinauth").info("database schema is at head")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pinauth", description="Pinterest OAuth and API proxy service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="migrate the database, then run the service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="bring the database schema to head")
    migrate.set_defaults(handler=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigurationError as e:
        print(f"pinauth: cannot start: {e}", file=sys.stderr)
        return 2
    return 0
