"""`make bench`: pinauth's proxy path against two reference forwarders, at 1 connection
and at 100,000, on SQLite and PostgreSQL.

Starts nginx as a fast loopback "Pinterest" serving static JSON, the reference
forwarders (default httpx, plain aiohttp), and, for each database, `pinauth serve` on a
fresh database, logged in through its real OAuth flow against that nginx. It drives the
proxy with wrk through the cookie, API-key and proxy-token paths and times the
connections API; then seeds `--connections` connections (bench/seed.py: bulk inserts of
realistic encrypted rows), spreads the same load over `--spread` of them and measures
again. Prints a table per database and PASS/MISS for the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import multicore
from cryptography.fernet import Fernet
from seed import end_user_of, seed
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

HERE = Path(__file__).resolve().parent
BOARDS_JSON = (
    '{"items":['
    + ",".join(
        f'{{"id":"54975588517{i}","name":"Board {i}","privacy":"PUBLIC",'
        f'"description":"A board for benchmarking","pin_count":{i * 7}}}'
        for i in range(5)
    )
    + '],"bookmark":null}'
)
TOKEN_JSON = (
    '{"access_token":"pina_bench","refresh_token":"pinr_bench","expires_in":2592000,'
    '"refresh_token_expires_in":5184000,"scope":"boards:read,user_accounts:read",'
    '"token_type":"bearer","response_type":"authorization_code"}'
)
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location = /v5/oauth/token {{ return 200 '{token}'; }}
        location = /v5/user_account {{ return 200 '{{"id":"1","username":"bench"}}'; }}
        location /v5/ {{ return 200 '{boards}'; }}
    }}
}}
"""
# Every wrk run, reference forwarders included, goes through this script, so the client
# does the same work per request whether one header value repeats or thousands rotate.
WRK_SCRIPT = """
local name, values, i = nil, {}, 0
function init(args)
  name = args[1]
  for line in io.lines(args[2]) do values[#values + 1] = line end
end
function request()
  i = i % #values + 1
  wrk.headers[name] = values[i]
  return wrk.format()
end
"""
DEFAULT_POSTGRES_URL = multicore.ADMIN_URL
SECRET_KEY = "bench-secret-key-" + "b" * 32
PROXY_TOKEN_TTL = 86_400
# Targets of issue 11.
SCALE_RPS_RATIO = 0.9
LIST_P99_MS = 20.0
# Issue 13: the request path's numbers unchanged with the keeper and dispatcher running.
# "Unchanged" within what two identical builds differ by on this machine: medians of
# LIFECYCLE_ROUNDS interleaved runs each.
LIFECYCLE_RATIO = 0.95
LIFECYCLE_ROUNDS = 5
# Rounds of the scale rows, each preceded by a run of the one-connection cookie path.
SCALE_ROUNDS = 2


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    # The server's own CPU time per request: steadier than req/s on a shared machine.
    cpu_us: float | None = None
    target: bool = True


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


@dataclass
class Latency:
    name: str
    samples: list[float]
    cpu_ms: float | None = None

    def cpu_since(self, before: float | None, pid: int) -> None:
        after = cpu_seconds(pid)
        if before is not None and after is not None and self.samples:
            self.cpu_ms = (after - before) / len(self.samples) * 1000

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Phase:
    connections: int
    proxy: list[Result] = field(default_factory=list)
    lists: list[Latency] = field(default_factory=list)


def median_result(results: Sequence[Result], name: str | None = None) -> Result:
    """The median of each figure over runs of the same load."""
    cpu = [r.cpu_us for r in results if r.cpu_us is not None]
    return Result(
        name or results[0].name,
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        statistics.median(cpu) if len(cpu) == len(results) else None,
        results[0].target,
    )


@dataclass
class Lifecycle:
    """The same load on two servers over one database: keeper and dispatcher on, and off."""

    connections: int
    on: list[Result] = field(default_factory=list)
    off: list[Result] = field(default_factory=list)
    # The on server's keeper passes over the comparison: evidence it was running.
    keeper_passes: float = 0.0


@dataclass
class DatabaseRun:
    database: str
    phases: list[Phase] = field(default_factory=list)
    # The one-connection cookie figure the scale rows are held to: the median of its run
    # in the first round and its runs between the scale rounds.
    baseline: Result | None = None
    lifecycle: Lifecycle | None = None
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def require_tools() -> None:
    """wrk and nginx, installed with apt on a fresh machine (as root)."""
    tools = ("wrk", "nginx")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-qq", "wrk", "nginx-light"]
        # A fresh machine's package lists may be empty or stale: update once if needed.
        if subprocess.run(install, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(install, check=True)
        missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"make bench needs {', '.join(missing)}: apt-get install wrk nginx-light")


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


class Wrk:
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self._args = args
        self._tmp = Path(tmp)
        self._script = self._tmp / "rotate.lua"
        self._script.write_text(WRK_SCRIPT)
        self._runs = 0

    def __call__(
        self,
        name: str,
        url: str,
        rotate: tuple[str, Sequence[str]],
        headers: Sequence[str] = (),
        *,
        pid: int | None = None,
    ) -> Result:
        """Drive `url`, giving header rotate[0] each of the values rotate[1] in turn."""
        self._runs += 1
        values = self._tmp / f"values-{self._runs}.txt"
        values.write_text("\n".join(rotate[1]) + "\n")
        args = self._args
        command = ["wrk", f"-t{args.threads}", f"-c{args.concurrency}", "--latency"]
        for header in headers:
            command += ["-H", header]
        command += ["-s", str(self._script)]
        tail = [url, "--", rotate[0], str(values)]
        # A short warm-up fills connection pools and caches before the measured run.
        subprocess.run([*command, "-d2s", *tail], capture_output=True, check=True)
        cpu_before = None if pid is None else cpu_seconds(pid)
        output = subprocess.run(
            [*command, f"-d{args.duration}s", *tail], capture_output=True, text=True, check=True
        ).stdout
        cpu_after = None if pid is None else cpu_seconds(pid)
        if "Non-2xx" in output:  # pinauth refused or failed requests: show everything
            print(f"{name}:\n{output}", file=sys.stderr)
        elif "Socket errors" in output:  # timeouts on a busy machine: one line is enough
            errors = re.search(r"Socket errors:.*", output).group(0)  # type: ignore[union-attr]
            print(f"  {name}: {errors}", file=sys.stderr)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
        p50 = to_ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
        p99 = to_ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
        requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
        cpu_us = None
        if cpu_before is not None and cpu_after is not None and requests:
            cpu_us = (cpu_after - cpu_before) / requests * 1e6
        print(f"  {name}: {rps:.0f} req/s, p99 {p99:.1f} ms, {cpu_us or 0:.0f} us CPU/req")
        return Result(name, rps, p50, p99, cpu_us)


def log_in(base: str) -> tuple[str, str]:
    """The real OAuth flow against nginx-as-Pinterest: the session cookie and the
    connection's id."""
    with httpx.Client(base_url=base) as client:
        login = client.get("/auth/login")
        state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
        callback = client.get("/auth/callback", params={"code": "bench", "state": state})
        if callback.status_code != 303:
            raise SystemExit(f"login failed: {callback.status_code} {callback.text}")
        connection_id = client.get("/me").json()["connection_id"]
        return f"pinauth_session={client.cookies['pinauth_session']}", connection_id


def create_api_key(env: dict[str, str], cwd: str) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "pinauth", "api-keys", "create", "--name", "bench"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.splitlines()[-1]


def mint_proxy_tokens(base: str, api_key: str, connection_ids: Sequence[str]) -> list[str] | None:
    """A proxy token per connection; None if this build has no proxy tokens."""
    tokens: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}) as client:
        for connection_id in connection_ids:
            minted = client.post(
                f"/v1/connections/{connection_id}/proxy-tokens",
                json={"ttl_seconds": PROXY_TOKEN_TTL},
            )
            if minted.status_code in (404, 405) and not tokens:
                if minted.headers.get("content-type", "").startswith("application/json") and (
                    minted.json().get("error") == "connection_not_found"
                ):
                    raise SystemExit(f"cannot mint a proxy token: {minted.text}")
                return None
            if minted.status_code != 201:
                raise SystemExit(f"cannot mint a proxy token: {minted.status_code} {minted.text}")
            tokens.append(minted.json()["token"])
    return tokens


def time_lists(base: str, api_key: str, samples: int, end_users: int, pid: int) -> list[Latency]:
    """One client, one request at a time: the latency of the connections API itself,
    and pinauth's CPU time per request."""
    rng = random.Random(11)
    end_users = max(end_users, 1)
    users = [end_user_of(rng.randrange(end_users), end_users) for _ in range(samples)]
    by_user = Latency("GET /v1/connections?end_user_id=…", [])
    by_user_status = Latency("GET /v1/connections?end_user_id=…&status=active", [])
    pages = Latency("GET /v1/connections?limit=100 (walking every page)", [])
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}) as client:

        def timed(latency: Latency, params: dict[str, str | int]) -> httpx.Response:
            started = time.perf_counter()
            response = client.get("/v1/connections", params=params)
            latency.samples.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"list failed: {response.status_code} {response.text}")
            return response

        for _ in range(20):  # warm-up: connection pools, caches, the planner
            client.get("/v1/connections", params={"limit": 100})
        cpu = cpu_seconds(pid)
        for user in users:
            timed(by_user, {"end_user_id": user})
        by_user.cpu_since(cpu, pid)
        cpu = cpu_seconds(pid)
        for user in users:
            timed(by_user_status, {"end_user_id": user, "status": "active"})
        by_user_status.cpu_since(cpu, pid)
        cpu = cpu_seconds(pid)
        cursor = None
        while len(pages.samples) < samples:
            params: dict[str, str | int] = {"limit": 100}
            if cursor is not None:
                params["cursor"] = cursor
            cursor = timed(pages, params).json()["next_cursor"]
        pages.cpu_since(cpu, pid)
    for latency in (by_user, by_user_status, pages):
        print(
            f"  {latency.name}: p50 {latency.p50_ms:.1f} ms, p99 {latency.p99_ms:.1f} ms, "
            f"{latency.cpu_ms or 0:.2f} ms pinauth CPU/req",
            flush=True,
        )
    return [by_user, by_user_status, pages]


@contextmanager
def fresh_database(kind: str, tmp: str, postgres_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp}/bench-{secrets.token_hex(4)}.db"
        return
    with multicore.bench_database(postgres_url) as url:
        yield url


def postgres_reachable(postgres_url: str) -> str | None:
    """None if PostgreSQL answers, else why not."""

    async def ping() -> None:
        engine = create_async_engine(postgres_url)
        try:
            async with engine.connect() as db:
                await db.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    try:
        asyncio.run(ping())
    except Exception as e:  # any failure means: skip PostgreSQL, say why
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def pinauth_env(
    api: str,
    base: str,
    database_url: str,
    encryption_key: str,
    secret_key: str,
    lifecycle: bool = True,
) -> dict[str, str]:
    """`pinauth serve`'s environment: nginx as Pinterest, nothing from the caller's own."""
    own = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    return (
        own
        | {
            "PINTEREST_CLIENT_ID": "bench",
            "PINTEREST_CLIENT_SECRET": "bench-secret",
            "PINTEREST_API_URL": api,
            "PINTEREST_REDIRECT_URI": f"{base}/auth/callback",
            "PINAUTH_DATABASE_URL": database_url,
            "PINAUTH_SECRET_KEY": secret_key,
            "PINAUTH_ENCRYPTION_KEYS": encryption_key,
            "PINAUTH_ACCESS_LOG": "false",
            "PINAUTH_LOG_LEVEL": "warning",
        }
        | (
            # Measured as it runs in production: the keeper (on by default) and the webhook
            # dispatcher (on with a URL; nginx answers its deliveries) beside the request path.
            # `--lifecycle off` measures without them, for comparison.
            {
                "PINAUTH_KEEPER": "true",
                # The shortest interval allowed: the keeper's pass (claim due rows, the
                # next-due gauge) runs every second over the whole table, not once in ten
                # minutes, so its cost cannot hide between measurements.
                "PINAUTH_KEEPER_INTERVAL": "1",
                "PINAUTH_WEBHOOK_URL": f"{api}/hooks",
                "PINAUTH_WEBHOOK_SECRETS": "bench-webhook-secret-" + "w" * 32,
            }
            if lifecycle
            else {"PINAUTH_KEEPER": "false"}
        )
    )


def bench_database(
    kind: str,
    database_url: str,
    api: str,
    wrk: Wrk,
    args: argparse.Namespace,
    tmp: str,
    processes: list[subprocess.Popen[bytes]],
) -> DatabaseRun:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    encryption_key = Fernet.generate_key().decode()
    secret_key = SECRET_KEY
    env = pinauth_env(api, base, database_url, encryption_key, secret_key, args.lifecycle == "on")
    server = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--port", str(port)], env=env, cwd=tmp
    )
    processes.append(server)
    run = DatabaseRun(kind)
    try:
        wait_http(f"{base}/openapi.json")
        cookie, connection_id = log_in(base)
        api_key = create_api_key(env, tmp)
        tokens = mint_proxy_tokens(base, api_key, [connection_id])
        if tokens is None:
            run.note = "this build has no proxy tokens: that path is not measured"
        url = f"{base}/pinterest/boards"
        key_header = f"Authorization: Bearer {api_key}"

        def drive(
            phase: Phase, cookies: list[str], ids: list[str], tokens: list[str] | None
        ) -> None:
            label = f"{phase.connections:,} conn."
            pid = server.pid
            phase.proxy.append(wrk(f"cookie, {label}", url, ("Cookie", cookies), pid=pid))
            phase.proxy.append(
                wrk(
                    f"API key, {label}",
                    url,
                    ("Pinauth-Connection-Id", ids),
                    [key_header],
                    pid=pid,
                )
            )
            if tokens is not None:
                bearers = [f"Bearer {token}" for token in tokens]
                phase.proxy.append(
                    wrk(f"proxy token, {label}", url, ("Authorization", bearers), pid=pid)
                )

        print(f"{kind}: 1 connection", flush=True)
        one = Phase(1)
        profiler = start_profiler(args, server.pid)
        drive(one, [cookie], [connection_id], tokens)
        if profiler is not None:
            profiler.wait()
        one.lists = time_lists(base, api_key, args.list_samples, args.end_users, server.pid)
        run.phases.append(one)
        if args.connections <= 1:
            return run

        seeded = asyncio.run(
            seed(
                database_url,
                [encryption_key],
                secret_key,
                connections=args.connections - 1,
                end_users=args.end_users,
                spread=max(args.spread, args.wide_spread),
            )
        )
        print(
            f"{kind}: seeded {seeded.connections:,} connections of {seeded.end_users:,} end "
            f"users in {seeded.seconds:.1f} s; load spread over {args.spread:,}",
            flush=True,
        )
        spread = seeded.spread[: args.spread]
        ids = [public_id for public_id, _ in spread]
        cookies = [f"pinauth_session={session}" for _, session in spread]
        many = Phase(args.connections)
        many_tokens = None if tokens is None else mint_proxy_tokens(base, api_key, ids)
        # Runs minutes apart drift by several per cent on a shared machine: the scale rows
        # alternate with the one-connection cookie path, and each is a median.
        rounds: list[Phase] = []
        ones = [one.proxy[0]]
        between = ("Cookie", [cookie])
        for _ in range(SCALE_ROUNDS):
            ones.append(wrk("cookie, 1 conn. (between rounds)", url, between, pid=server.pid))
            rounds.append(Phase(args.connections))
            drive(rounds[-1], cookies, ids, many_tokens)
        columns = zip(*(r.proxy for r in rounds), strict=True)
        many.proxy = [median_result(column) for column in columns]
        run.baseline = median_result(
            ones, f"cookie, 1 conn., median of {len(ones)} (first, and between rounds)"
        )
        run.baseline.target = False  # the reference, not held to itself
        if args.wide_spread > args.spread:
            # No target: a hot set this wide outruns the cache's TTL, so most requests
            # read their session from the database. Shown so nobody mistakes the targets
            # above for what any load costs.
            wide = [f"pinauth_session={session}" for _, session in seeded.spread]
            name = f"cookie, {args.connections:,} conn., hot set {len(wide):,} (no target)"
            many.proxy.append(wrk(name, url, ("Cookie", wide), pid=server.pid))
            many.proxy[-1].target = False
        many.lists = time_lists(base, api_key, args.list_samples, args.end_users, server.pid)
        run.phases.append(many)
        if args.lifecycle == "on":
            # The server above idles meanwhile: its keeper and dispatcher cost both alike.
            run.lifecycle = compare_lifecycle(
                cookies, url, wrk, tmp, processes, many.connections,
                pinauth_env(api, base, database_url, encryption_key, secret_key, True),
                pinauth_env(api, base, database_url, encryption_key, secret_key, False),
            )  # fmt: skip
        return run
    finally:
        stop([server])
        processes.remove(server)


def compare_lifecycle(
    cookies: list[str],
    url: str,
    wrk: Wrk,
    tmp: str,
    processes: list[subprocess.Popen[bytes]],
    connections: int,
    env_on: dict[str, str],
    env_off: dict[str, str],
) -> Lifecycle:
    """The cookie path over the spread on two fresh servers over the same database, one
    running the keeper and dispatcher and one without them, in alternating order.

    Both serve the same sessions (same database, same secret key) and both start fresh
    (the server that ran the rounds above has a fuller heap and warmer caches), so the
    only difference is the two background tasks. Each wrk run is short and machines
    drift; alternating the order and taking medians keeps a drift from reading as a
    difference.
    """
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    for label, env in (("on", env_on), ("off", env_off)):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = env | {"PINTEREST_REDIRECT_URI": f"{base}/auth/callback"}
        process = subprocess.Popen(
            [sys.executable, "-m", "pinauth", "serve", "--port", str(port)], env=env, cwd=tmp
        )
        processes.append(process)
        servers[label] = (process, base)
    result = Lifecycle(connections)
    try:
        for _, base in servers.values():
            wait_http(f"{base}/openapi.json")
        on_base = servers["on"][1]
        passes_before = keeper_passes(on_base)
        print(f"keeper and dispatcher on ({on_base}) vs off ({servers['off'][1]}):", flush=True)
        path = urlsplit(url).path
        for round_ in range(LIFECYCLE_ROUNDS):
            order = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
            for label in order:
                process, base = servers[label]
                measured = wrk(
                    f"cookie, {connections:,} conn., keeper and dispatcher {label}",
                    f"{base}{path}",
                    ("Cookie", cookies),
                    pid=process.pid,
                )
                (result.on if label == "on" else result.off).append(measured)
        result.keeper_passes = keeper_passes(on_base) - passes_before
    finally:
        for process, _ in servers.values():
            stop([process])
            processes.remove(process)
    return result


def keeper_passes(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r"^pinauth_keeper_passes_total (\S+)$", metrics, re.M)
    return 0.0 if found is None else float(found.group(1))


def start_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    if not args.profile:
        return None
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            "250",
            "-o",
            args.profile,
            "--duration",
            str(args.duration + 2),
            "--pid",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
    )


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument(
        "-c", "--concurrency", type=int, default=32, help="wrk's open HTTP connections"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk's threads")
    parser.add_argument(
        "--connections",
        type=int,
        default=100_000,
        metavar="N",
        help="pinauth connections in the database for the second round (1: skip it)",
    )
    parser.add_argument(
        "--end-users", type=int, metavar="N", help="end users owning them (default N/2)"
    )
    parser.add_argument(
        "--lifecycle",
        choices=("on", "off"),
        default="on",
        help="run pinauth with the keeper and the webhook dispatcher (default) or without",
    )
    parser.add_argument(
        "--spread",
        type=int,
        default=100,
        metavar="K",
        help="connections the proxy load rotates over in the second round (each one's "
        "session, id or proxy token in turn)",
    )
    parser.add_argument(
        "--wide-spread",
        type=int,
        default=1_000,
        metavar="K",
        help="also drive the cookie path over this many connections, beyond the cache's "
        "reach, as a figure without a target (0: skip)",
    )
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres", "both"],
        default="both",
        help="which databases to run on (PostgreSQL is skipped, saying why, if unreachable)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("PINAUTH_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server where the bench may create and drop a database "
        "(default $PINAUTH_BENCH_POSTGRES_URL or %(default)s)",
    )
    parser.add_argument(
        "--list-samples", type=int, default=1_000, help="timed requests per list query"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample pinauth with py-spy during its first run; write collapsed stacks to FILE",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="also serve with `pinauth serve --workers N` for each N (PostgreSQL); '' skips",
    )
    args = parser.parse_args()
    if args.end_users is None:
        args.end_users = max(1, args.connections // 2)
    return args


def main() -> None:
    args = parse_args()
    require_tools()
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    skipped: dict[str, str] = {}
    if "postgres" in kinds:
        why = postgres_reachable(args.postgres_url)
        if why is not None:
            kinds.remove("postgres")
            skipped["postgres"] = f"{args.postgres_url} unreachable ({why})"
            print(f"skipping PostgreSQL: {skipped['postgres']}", file=sys.stderr)

    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []
    runs: list[DatabaseRun] = []
    by_workers: list[multicore.WorkersResult] = []
    with tempfile.TemporaryDirectory(prefix="pinauth-bench-") as tmp:
        try:
            upstream_port = free_port()
            conf = Path(tmp, "nginx.conf")
            conf.write_text(
                NGINX_CONF.format(tmp=tmp, port=upstream_port, token=TOKEN_JSON, boards=BOARDS_JSON)
            )
            processes.append(subprocess.Popen(["nginx", "-c", str(conf), "-e", f"{tmp}/err.log"]))
            api = f"http://127.0.0.1:{upstream_port}/v5"
            wait_http(f"{api}/boards")
            ports = {"httpx": free_port(), "aiohttp": free_port()}
            for kind, port in ports.items():
                forwarder = [sys.executable, str(HERE / "forwarders.py"), kind, str(port)]
                processes.append(subprocess.Popen([*forwarder, f"{api}/boards"]))
            for port in ports.values():
                wait_http(f"http://127.0.0.1:{port}/openapi.json")
            print(
                f"wrk -t{args.threads} -c{args.concurrency} -d{args.duration}s, "
                f"{os.cpu_count()} cores, upstream: nginx static JSON "
                f"({len(BOARDS_JSON)} bytes)\n",
                flush=True,
            )
            wrk = Wrk(args, tmp)
            dummy = ("X-Bench", ["1"])
            references = [
                wrk(
                    "httpx forwarder (default AsyncClient)",
                    f"http://127.0.0.1:{ports['httpx']}/forward",
                    dummy,
                    pid=processes[1].pid,
                ),
                wrk(
                    "aiohttp forwarder",
                    f"http://127.0.0.1:{ports['aiohttp']}/forward",
                    dummy,
                    pid=processes[2].pid,
                ),
            ]
            stop(processes[1:])
            del processes[1:]
            for kind in kinds:
                with fresh_database(kind, tmp, args.postgres_url) as database_url:
                    runs.append(bench_database(kind, database_url, api, wrk, args, tmp, processes))
            # multicore.py serves with --workers N on a database of its own (it sets the
            # database URL and redirect URI) and drives the cookie path like the rows above.
            env = pinauth_env(
                api, "http://127.0.0.1", "", Fernet.generate_key().decode(), SECRET_KEY
            )
            by_workers = multicore.compare(
                args,
                env,
                tmp,
                free_port,
                log_in,
                lambda name, url, _args, headers: wrk(name, url, dummy, headers),
            )
        finally:
            stop(processes)
    report(references, runs, skipped, time.monotonic() - started)
    multicore.report(by_workers)


def report(
    references: list[Result], runs: list[DatabaseRun], skipped: dict[str, str], seconds: float
) -> None:
    httpx_ref, aiohttp_ref = references
    print(f"\nmake bench took {seconds:.0f} s\n")
    line = f"|{'-' * 52}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 14}|"
    checks: list[tuple[str, bool]] = []
    for run in [None, *runs]:
        title = "reference forwarders" if run is None else f"pinauth on {run.database}"
        print(f"{title}\n")
        print(
            f"| {'proxy /pinterest/boards':<50} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | "
            f"{'vs httpx':>8} | {'vs aiohttp':>9} | {'vs 1 cookie':>11} | {'CPU us/req':>12} |"
        )
        print(line)
        rows = references if run is None else [r for p in run.phases for r in p.proxy]
        baseline = rows[0]
        if run is not None and run.baseline is not None:
            baseline = run.baseline
            rows = [rows[0], run.baseline, *rows[1:]]
        for r in rows:
            vs = "" if run is None else f"{r.rps / baseline.rps:.2f}"
            cpu = "" if r.cpu_us is None else f"{r.cpu_us:.0f}"
            print(
                f"| {r.name:<50} | {r.rps:>7.0f} | {r.p50_ms:>7.1f} | {r.p99_ms:>7.1f} | "
                f"{r.rps / httpx_ref.rps:>8.2f} | {r.rps / aiohttp_ref.rps:>9.2f} | {vs:>11} | "
                f"{cpu:>12} |"
            )
        print()
        if run is None:
            continue
        if run.note:
            print(f"({run.note})\n")
        print(
            f"| {'connections API, one request at a time':<64} | {'p50 ms':>7} | {'p99 ms':>7} "
            f"| {'CPU ms/req':>10} |"
        )
        print(f"|{'-' * 66}|{'-' * 9}|{'-' * 9}|{'-' * 12}|")
        for phase in run.phases:
            for latency in phase.lists:
                name = f"{latency.name}, {phase.connections:,} conn."
                cpu = "" if latency.cpu_ms is None else f"{latency.cpu_ms:.2f}"
                print(
                    f"| {name:<64} | {latency.p50_ms:>7.1f} | {latency.p99_ms:>7.1f} | {cpu:>10} |"
                )
        print()
        db = run.database
        checks += [
            (f"{db}: cookie path >= 4x the httpx forwarder", baseline.rps >= 4 * httpx_ref.rps),
            (
                f"{db}: cookie path >= 0.5x the aiohttp forwarder",
                baseline.rps >= 0.5 * aiohttp_ref.rps,
            ),
            (
                f"{db}: cookie p99 <= 2x the aiohttp forwarder's p99",
                baseline.p99_ms <= 2 * aiohttp_ref.p99_ms,
            ),
        ]
        for r in rows[1:]:
            if not r.target:
                continue
            checks.append(
                (
                    f"{db}: {r.name} within 10% of the 1-connection cookie path",
                    r.rps >= SCALE_RPS_RATIO * baseline.rps,
                )
            )
        if run.lifecycle is not None and run.lifecycle.on:
            on, off = median_result(run.lifecycle.on), median_result(run.lifecycle.off)
            print(
                f"| {f'median of {len(run.lifecycle.on)} alternating runs':<50} | {'req/s':>7} "
                f"| {'p50 ms':>7} | {'p99 ms':>7} | {'CPU us/req':>12} | {'vs off':>7} |"
            )
            print(f"|{'-' * 52}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 14}|{'-' * 9}|")
            for r in (off, on):
                cpu = "" if r.cpu_us is None else f"{r.cpu_us:.0f}"
                print(
                    f"| {r.name:<50} | {r.rps:>7.0f} | {r.p50_ms:>7.1f} | {r.p99_ms:>7.1f} | "
                    f"{cpu:>12} | {r.rps / off.rps:>7.2f} |"
                )
            print(
                f"\n(the keeper, waking every second, made {run.lifecycle.keeper_passes:.0f} "
                "passes over the table meanwhile; the dispatcher polls every second)\n"
            )
            checks.append(
                (
                    f"{db}: keeper and dispatcher on: cookie path within "
                    f"{1 - LIFECYCLE_RATIO:.0%} of off at {run.lifecycle.connections:,} "
                    "connections",
                    on.rps >= LIFECYCLE_RATIO * off.rps,
                )
            )
        for latency in run.phases[-1].lists:
            checks.append(
                (
                    f"{db}: {latency.name} p99 < {LIST_P99_MS:.0f} ms at "
                    f"{run.phases[-1].connections:,} connections",
                    latency.p99_ms < LIST_P99_MS,
                )
            )
    for label, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}")
    for kind, why in skipped.items():
        print(f"SKIP  {kind}: {why}")


if __name__ == "__main__":
    main()
