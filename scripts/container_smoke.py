"""Container-equivalent smoke test (no Docker engine here): `make smoke`.

Does what the Dockerfile does without Docker: builds the wheel with the pinned build
backend, installs requirements.lock (--require-hashes) and the wheel (--no-deps) into a
fresh venv, and runs the image's exact CMD as an unprivileged user, in a data directory
standing for the image's volume (its WORKDIR), with only environment configuration and
`pinauth sandbox` as Pinterest. Checks /healthz, /readyz and /docs, logs a user in,
stops the service with SIGTERM (clean and quick), starts it again on the same data
directory, and checks the user is still logged in, with the database in the volume.
Last, the README's demo in Docker: the same command with --demo and no configuration.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from pinauth.sandbox import SandboxConfig

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_SECONDS = 10


def dockerfile_cmd() -> list[str]:
    match = re.search(r"^CMD\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("Dockerfile has no exec-form CMD")
    command: list[str] = json.loads(match.group(1))
    return command


def dockerfile_data_volume() -> str:
    """The image's final WORKDIR, which must be one of its VOLUMEs: where the default
    database (sqlite+aiosqlite:///./pinauth.db) is written."""
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.rindex("\nFROM ") :]
    workdir: str = re.findall(r"^WORKDIR\s+(\S+)\s*$", runtime, re.MULTILINE)[-1]
    volumes = re.findall(r"^VOLUME\s+(\S+)\s*$", runtime, re.MULTILINE)
    if workdir not in volumes:
        raise SystemExit(f"smoke: the image's WORKDIR {workdir} is not a VOLUME {volumes}")
    return workdir


def runtime_python() -> str:
    """A system interpreter, like the image's: an unprivileged user must be able to run it
    (a pyenv Python under /root is not reachable for `nobody`)."""
    override = os.environ.get("PINAUTH_SMOKE_PYTHON")
    if override:
        return override
    system = Path("/usr/bin/python3")
    if system.exists():
        version = subprocess.run(
            [str(system), "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
        )
        if version.stdout.strip() == "True":
            return str(system)
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run(*args: str) -> None:
    subprocess.run(args, check=True, cwd=ROOT)


def wait_healthy(base: str, service: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if service.poll() is not None:
            raise SystemExit("smoke: the service exited during start-up")
        try:
            if get(f"{base}/healthz")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("smoke: /healthz never answered")
        time.sleep(0.2)


def log_in(browser: httpx.Client, base: str, sandbox: str) -> str:
    """The OAuth flow, consenting on the sandbox; the connection id /me reports."""
    login = browser.get(f"{base}/auth/login")
    assert login.status_code == 302, login.text
    params = parse_qs(urlsplit(login.headers["location"]).query)
    fields = {k: v[0] for k, v in params.items() if k != "response_type"}
    decision = httpx.post(f"{sandbox}/oauth/", data=fields | {"decision": "allow"})
    callback = urlsplit(decision.headers["location"]).query
    answer = browser.get(f"{base}/auth/callback?{callback}")
    assert answer.status_code == 303, answer.text
    me = browser.get(f"{base}/me")
    assert me.status_code == 200, me.text
    return str(me.json()["connection_id"])


def main() -> None:
    volume = dockerfile_data_volume()
    with tempfile.TemporaryDirectory(prefix="pinauth-smoke-") as tmp:
        work = Path(tmp)
        # The Dockerfile's build stage: the wheel, by the pinned backend.
        run(
            sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
            "-w", str(work / "dist"), ".",
        )  # fmt: skip
        wheel = next((work / "dist").glob("pinauth-*.whl"))
        # Its runtime stage: the locked dependencies, hash-checked, then the wheel alone.
        run(runtime_python(), "-m", "venv", str(work / "venv"))
        pip = [str(work / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check"]
        run(*pip, "--require-hashes", "-r", str(ROOT / "requirements-pip.lock"))
        run(*pip, "--require-hashes", "-r", str(ROOT / "requirements.lock"))
        run(*pip, "--no-deps", str(wheel))

        # The image's CMD, with the venv's bin first on PATH (the image's /usr/local/bin).
        command = dockerfile_cmd()
        port, sandbox_port = free_port(), free_port()
        command[command.index("--port") + 1] = str(port)
        command[command.index("--host") + 1] = "127.0.0.1"  # loopback only on a shared host
        base, sandbox = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}"
        home, data = work / "home", work / "data"  # data stands for the image's volume
        home.mkdir()
        data.mkdir()
        app = SandboxConfig()
        env = {
            "PATH": f"{work / 'venv/bin'}:/usr/bin:/bin",
            "HOME": str(home),
            "PINTEREST_CLIENT_ID": app.client_id,
            "PINTEREST_CLIENT_SECRET": app.client_secret,
            "PINTEREST_REDIRECT_URI": f"{base}/auth/callback",
            "PINTEREST_AUTHORIZE_URL": f"{sandbox}/oauth/",
            "PINTEREST_API_URL": f"{sandbox}/v5",
            "PINAUTH_SECRET_KEY": "smoke-test-secret-key-" + "s" * 32,
            "PINAUTH_ENCRYPTION_KEYS": "Yk8f2y9CqfQbq2s6m3pM0Z8l4h1v7y2Q5n6c9k0d3aE=",
        }
        demote: Callable[[], None] | None = None
        if os.geteuid() == 0:  # like USER in the image: never run the service as root
            nobody = pwd.getpwnam("nobody")
            shutil.chown(home, nobody.pw_uid, nobody.pw_gid)
            shutil.chown(data, nobody.pw_uid, nobody.pw_gid)
            os.chmod(work, 0o755)

            def drop_privileges() -> None:
                os.setgid(nobody.pw_gid)
                os.setgroups([])
                os.setuid(nobody.pw_uid)

            demote = drop_privileges

        user = "nobody" if demote is not None else "the current user"
        print(f"smoke: {' '.join(command)} as {user} in {data} (the image's {volume})")
        log = (work / "service.log").open("wb")
        pinterest = subprocess.Popen(
            [str(work / "venv/bin/pinauth"), "sandbox", "--port", str(sandbox_port),
             "--redirect-uri", f"{base}/auth/callback"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                command, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=demote,
            )  # fmt: skip

        service = start()
        try:
            wait_healthy(base, service)
            status, body = get(f"{base}/readyz")
            assert status == 200, (status, body)
            status, body = get(f"{base}/docs")
            assert status == 200, status
            assert b"swagger" in body.lower()
            # Served by pinauth from the installed fastapi-offline package, not a CDN.
            status, body = get(f"{base}/docs/swagger-ui-bundle.js")
            assert status == 200, status
            assert b"SwaggerUIBundle" in body
            with httpx.Client(timeout=10) as browser:
                connection = log_in(browser, base, sandbox)

                stopped = time.monotonic()
                service.send_signal(signal.SIGTERM)
                code = service.wait(timeout=STOP_WITHIN_SECONDS)
                took = time.monotonic() - stopped
                assert code in (0, -signal.SIGTERM), f"exit code {code}"

                # A new container on the same volume: the user is still logged in.
                service = start()
                wait_healthy(base, service)
                me = browser.get(f"{base}/me")
                assert me.status_code == 200, me.text
                assert me.json()["connection_id"] == connection
            assert (data / "pinauth.db").is_file(), sorted(p.name for p in data.iterdir())
            assert list(home.iterdir()) == [], "state outside the volume"
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=STOP_WITHIN_SECONDS)

            # The README's demo in Docker: the image's command with --demo, nothing else
            # configured; its database lands in the volume too.
            demo_env = {k: v for k, v in env.items() if not k.startswith("PINTEREST_")}
            demo_env = {k: v for k, v in demo_env.items() if not k.startswith("PINAUTH_")}
            service = subprocess.Popen(
                [*command, "--demo"], cwd=data, env=demo_env, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=demote,
            )  # fmt: skip
            wait_healthy(base, service)
            status, body = get(f"{base}/readyz")
            assert status == 200, (status, body)
            assert (data / "pinauth-demo.db").is_file(), sorted(p.name for p in data.iterdir())
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=STOP_WITHIN_SECONDS)
            print(
                f"smoke: ok (healthz, readyz, docs; stopped in {took:.1f}s, exit {code}; "
                "restarted on the same data directory, still logged in; demo mode too)"
            )
        except BaseException:
            print((work / "service.log").read_text(errors="replace"), file=sys.stderr)
            raise
        finally:
            for process in (service, pinterest):
                if process.poll() is None:
                    process.kill()
                    process.wait()
            log.close()


if __name__ == "__main__":
    main()
