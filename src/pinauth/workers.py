"""`pinauth serve`'s server, in one process or in several sharing one listening socket.

The parent binds the socket once and spawns the workers; each builds its own app (its
own HTTP client, engine and caches, as a replica would) and runs pinauth's uvicorn
`Server` with the guarded protocol on the inherited socket, so the kernel spreads
connections over them. Workers are replicas on one machine: what holds across replicas
(one refresh per connection, logout noticed within the cache TTL) holds across workers,
which is why they need PostgreSQL. uvicorn's own `--workers` is not used: it pickles its
`Config` into each child, and pinauth's configured protocol class and `Server` subclass
do not travel that way.
"""

from __future__ import annotations

import gc
import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.context import SpawnProcess
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from pinauth.logs import logging_config
from pinauth.sandbox import SandboxConfig
from pinauth.server import uvicorn_options
from pinauth.settings import Settings
from pinauth.shutdown import Server, Shutdown

log = logging.getLogger(__name__)

# How often the parent looks for a worker that died (between signals).
_WATCH_SECONDS = 0.5


def build_server(
    settings: Settings,
    host: str,
    port: int,
    sandbox: SandboxConfig | None = None,
    *,
    demo_backend_url: str | None = None,
) -> Server:
    """The app and the uvicorn server that runs it, as `pinauth serve` configures them."""
    from pinauth.app import create_app

    shutdown = Shutdown()
    app = create_app(
        settings, sandbox=sandbox, shutdown=shutdown, demo_backend_url=demo_backend_url
    )
    # Everything built so far (modules, routes, models) lives as long as the process;
    # freezing it keeps the cyclic GC from re-scanning it in every full collection,
    # which showed up as latency spikes under load (see bench/).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=logging_config(settings.log_level, settings.log_format),
        **uvicorn_options(settings),
    )
    # uvicorn.run() with a server that flags the shutdown, so requests it cancels at the
    # timeout answer 503 (see shutdown.py).
    return Server(config, shutdown)


def serve_one(
    settings: Settings,
    host: str,
    port: int,
    sandbox: SandboxConfig | None,
    *,
    demo_backend_url: str | None = None,
) -> int:
    """Serve in this process; the exit status."""
    server = build_server(settings, host, port, sandbox, demo_backend_url=demo_backend_url)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


def _worker(settings: Settings, host: str, port: int, listener: socket.socket) -> None:
    """A worker process's body (spawned: a fresh interpreter, so logging is set up anew)."""
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    server = build_server(settings, host, port)
    server.run(sockets=[listener])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve_many(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run `workers` processes on one socket until SIGTERM or SIGINT; the exit status.

    A worker that dies while serving is replaced; one that fails to start stops them
    all, since its replacement would fail the same way.
    """
    config = uvicorn.Config("pinauth", host=host, port=port, log_config=None)
    listener = config.bind_socket()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    spawn = multiprocessing.get_context("spawn")

    def start() -> SpawnProcess:
        process = spawn.Process(
            target=_worker, args=(settings, host, port, listener), name="pinauth-worker"
        )
        process.start()
        return process

    status = 0
    processes = [start() for _ in range(workers)]
    log.info("pinauth serving with %d workers (pids %s)", workers, [p.pid for p in processes])
    while not stop.wait(_WATCH_SECONDS):
        for index, process in enumerate(processes):
            if process.exitcode is None:
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s failed to start; stopping the others", process.pid)
                status = STARTUP_FAILURE
                stop.set()
                break
            log.warning("worker %s exited (%s); starting another", process.pid, process.exitcode)
            processes[index] = start()
    # Each worker drains its requests within PINAUTH_SHUTDOWN_TIMEOUT, as one process does.
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join()
    listener.close()
    log.info("all workers stopped")
    return status
