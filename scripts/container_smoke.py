"""Container-equivalent smoke test (no Docker engine here): `make smoke`.

Builds the wheel, installs it into a fresh venv, runs the Dockerfile's exact CMD as an
unprivileged user with only environment configuration, waits for /healthz, checks
/readyz and /docs, then stops it with SIGTERM and checks it exits cleanly and quickly.
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

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_SECONDS = 10


def dockerfile_cmd() -> list[str]:
    match = re.search(r"^CMD\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("Dockerfile has no exec-form CMD")
    command: list[str] = json.loads(match.group(1))
    return command


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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pinauth-smoke-") as tmp:
        work = Path(tmp)
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), ".")
        wheel = next((work / "dist").glob("pinauth-*.whl"))
        run(runtime_python(), "-m", "venv", str(work / "venv"))
        run(str(work / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel))

        # The image's CMD, with the venv's bin first on PATH (the image's /usr/local/bin).
        command = dockerfile_cmd()
        port = free_port()
        command[command.index("--port") + 1] = str(port)
        command[command.index("--host") + 1] = "127.0.0.1"  # loopback only on a shared host
        home = work / "home"
        home.mkdir()
        env = {
            "PATH": f"{work / 'venv/bin'}:/usr/bin:/bin",
            "HOME": str(home),
            "PINTEREST_CLIENT_ID": "smoke-client",
            "PINTEREST_CLIENT_SECRET": "smoke-secret",
            "PINAUTH_SECRET_KEY": "smoke-test-secret-key-" + "s" * 32,
            "PINAUTH_ENCRYPTION_KEYS": "Yk8f2y9CqfQbq2s6m3pM0Z8l4h1v7y2Q5n6c9k0d3aE=",
        }
        demote: Callable[[], None] | None = None
        if os.geteuid() == 0:  # like USER in the image: never run the service as root
            nobody = pwd.getpwnam("nobody")
            shutil.chown(home, nobody.pw_uid, nobody.pw_gid)
            os.chmod(work, 0o755)

            def drop_privileges() -> None:
                os.setgid(nobody.pw_gid)
                os.setgroups([])
                os.setuid(nobody.pw_uid)

            demote = drop_privileges

        user = "nobody" if demote is not None else "the current user"
        print(f"smoke: {' '.join(command)} as {user}")
        log = (work / "service.log").open("wb")
        service = subprocess.Popen(
            command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=demote
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if service.poll() is not None:
                    raise SystemExit("smoke: the service exited during start-up")
                try:
                    if get(f"{base}/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("smoke: /healthz never answered")
                time.sleep(0.2)
            status, body = get(f"{base}/readyz")
            assert status == 200, (status, body)
            status, body = get(f"{base}/docs")
            assert status == 200, status
            assert b"swagger" in body.lower()
            # Served by pinauth from the installed fastapi-offline package, not a CDN.
            status, body = get(f"{base}/docs/swagger-ui-bundle.js")
            assert status == 200, status
            assert b"SwaggerUIBundle" in body
            stopped = time.monotonic()
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=STOP_WITHIN_SECONDS)
            took = time.monotonic() - stopped
            assert code in (0, -signal.SIGTERM), f"exit code {code}"
            print(f"smoke: ok (healthz, readyz, docs; stopped in {took:.1f}s, exit {code})")
        except BaseException:
            print((work / "service.log").read_text(errors="replace"), file=sys.stderr)
            raise
        finally:
            if service.poll() is None:
                service.kill()
            log.close()


if __name__ == "__main__":
    main()
