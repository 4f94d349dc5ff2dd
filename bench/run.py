"""`make bench`: pinauth's proxy path against two reference forwarders, same load.

Starts nginx as a fast loopback "Pinterest" serving static JSON, the reference
forwarders (default httpx, plain aiohttp), and `pinauth serve` logged in through its
real OAuth flow against that nginx; drives each with wrk and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import multicore
from cryptography.fernet import Fernet

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


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nginx-light"], check=True)
        missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"make bench needs {', '.join(missing)}: apt-get install wrk nginx-light")


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(name: str, url: str, args: argparse.Namespace, headers: Sequence[str] = ()) -> Result:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--latency",
        url,
    ]
    for header in headers:
        command[1:1] = ["-H", header]
    # A short warm-up fills connection pools and caches before the measured run.
    subprocess.run([*command[:-2], "-d2s", url], capture_output=True, check=True)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        print(output, file=sys.stderr)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    return Result(name, rps, p50, p99)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample pinauth with py-spy during its run; write collapsed stacks to FILE",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="also serve with `pinauth serve --workers N` for each N (PostgreSQL); '' skips",
    )
    args = parser.parse_args()
    require_tools()

    processes: list[subprocess.Popen[bytes]] = []
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

            ports = {"httpx": free_port(), "aiohttp": free_port(), "pinauth": free_port()}
            for kind in ("httpx", "aiohttp"):
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "forwarders.py"),
                            kind,
                            str(ports[kind]),
                            f"{api}/boards",
                        ]
                    )
                )
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))
            } | {
                "PINTEREST_CLIENT_ID": "bench",
                "PINTEREST_CLIENT_SECRET": "bench-secret",
                "PINTEREST_API_URL": api,
                "PINTEREST_REDIRECT_URI": f"http://127.0.0.1:{ports['pinauth']}/auth/callback",
                "PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/bench.db",
                "PINAUTH_SECRET_KEY": "bench-secret-key-" + "b" * 32,
                "PINAUTH_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                "PINAUTH_ACCESS_LOG": "false",
                "PINAUTH_LOG_LEVEL": "warning",
            }
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pinauth", "serve", "--port", str(ports["pinauth"])],
                    env=env,
                    cwd=tmp,
                )
            )
            for port in ports.values():
                wait_http(f"http://127.0.0.1:{port}/openapi.json")
            cookie, connection_id = log_in(f"http://127.0.0.1:{ports['pinauth']}")
            api_key = create_api_key(env, tmp)
            print(
                f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
                f"{os.cpu_count()} cores, upstream: nginx static JSON "
                f"({len(BOARDS_JSON)} bytes)\n",
                flush=True,
            )
            results = [
                wrk(
                    "httpx forwarder (default AsyncClient)",
                    f"http://127.0.0.1:{ports['httpx']}/forward",
                    args,
                ),
                wrk("aiohttp forwarder", f"http://127.0.0.1:{ports['aiohttp']}/forward", args),
            ]
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(
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
                        str(processes[-1].pid),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            results.append(
                wrk(
                    "pinauth /pinterest/boards (session, token, proxy)",
                    f"http://127.0.0.1:{ports['pinauth']}/pinterest/boards",
                    args,
                    [f"Cookie: {cookie}"],
                )
            )
            if profiler is not None:
                profiler.wait()
            by_workers = multicore.compare(args, env, tmp, free_port, log_in, wrk)
            results.append(
                wrk(
                    "pinauth /pinterest/boards (API key, connection id)",
                    f"http://127.0.0.1:{ports['pinauth']}/pinterest/boards",
                    args,
                    [f"Authorization: Bearer {api_key}", f"Pinauth-Connection-Id: {connection_id}"],
                )
            )
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()

    report(results)
    multicore.report(by_workers)


def report(results: list[Result]) -> None:
    httpx_ref, aiohttp_ref, pinauth, backend = results
    print(
        f"| {'forwarder':<50} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'vs httpx':>7} | {'vs aiohttp':>9} |"
    )
    print(f"|{'-' * 52}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for r in results:
        print(
            f"| {r.name:<50} | {r.rps:>7.0f} | {r.p50_ms:>7.1f} | {r.p99_ms:>7.1f} | "
            f"{r.rps / httpx_ref.rps:>7.2f} | {r.rps / aiohttp_ref.rps:>9.2f} |"
        )
    checks = [
        ("throughput >= 4x the httpx forwarder", pinauth.rps >= 4 * httpx_ref.rps),
        ("throughput >= 0.5x the aiohttp forwarder", pinauth.rps >= 0.5 * aiohttp_ref.rps),
        ("p99 <= 2x the aiohttp forwarder's p99", pinauth.p99_ms <= 2 * aiohttp_ref.p99_ms),
        ("API-key path within 10% of the cookie path", backend.rps >= 0.9 * pinauth.rps),
    ]
    print()
    for label, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}")


if __name__ == "__main__":
    main()
