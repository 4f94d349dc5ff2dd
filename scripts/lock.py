"""`make lock`: pin every dependency, with hashes, from pyproject.toml.

Writes three files, all resolved together so that one version of each package is used
everywhere:

- requirements-dev.lock: the service and its dev extra (`make`, CI);
- requirements.lock: the service alone, within the dev lock's versions (the image);
- requirements-build.lock: the build backend (installs use --no-build-isolation, so
  even the backend comes from a pinned, hashed file);
- requirements-pip.lock: pip itself, installed into a new venv before anything else.
  The pip that `python -m venv` bundles (23.2 on Python 3.11.7) mis-resolves an extra
  (pytest-cov's `coverage[toml]`) in --require-hashes mode as soon as a newer release
  of the package exists than the one locked, so a lock that installed yesterday fails
  today; pip 23.3 and newer resolve it against the pin.

Each install is `pip install --require-hashes -r <lock>`, then pinauth itself with
--no-deps. `--check` says whether the locks were made from this pyproject.toml (the
install targets run it, so a dependency added without `make lock` fails loudly instead
of installing an environment without it). `--upgrade` moves every pin to the newest
version allowed; without it the versions already locked are kept.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV_VERSION = "0.13.8"
PYTHON_VERSION = "3.11"  # the oldest supported (requires-python) and the image's
DEV, RUNTIME, BUILD = (
    ROOT / "requirements-dev.lock",
    ROOT / "requirements.lock",
    ROOT / "requirements-build.lock",
)
PIP = ROOT / "requirements-pip.lock"
INSTALLER = "pip>=25"
# hatchling builds an editable install with `editables`.
EDITABLE_BACKEND = "editables>=0.5"
MARK = "# pyproject fingerprint: "
# Without --upgrade, uv keeps every version already in a lock and only resolves what is
# new: adding a dependency does not move the others.
UPGRADE = "--upgrade" in sys.argv[1:]


def fingerprint() -> str:
    """What in pyproject.toml the locks depend on, hashed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    relevant = {
        "requires-python": project["project"].get("requires-python"),
        "dependencies": project["project"].get("dependencies", []),
        "optional-dependencies": project["project"].get("optional-dependencies", {}),
        "build-system": project["build-system"].get("requires", []),
        "installer": INSTALLER,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def uv() -> str:
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"], check=True
        )
        from uv import find_uv_bin  # type: ignore[import-not-found, unused-ignore]
    return str(find_uv_bin())


def compile_lock(target: Path, sources: list[str], *extra: str, stdin: str | None = None) -> None:
    command = [
        uv(),
        "pip",
        "compile",
        "--quiet",
        "--generate-hashes",
        "--universal",
        "--python-version",
        PYTHON_VERSION,
        "--no-header",
        *(["--upgrade"] if UPGRADE else []),
        *sources,
        *extra,
        "-o",
        str(target),
    ]
    subprocess.run(command, check=True, cwd=ROOT, input=stdin, text=True)
    header = (
        f"{MARK}{fingerprint()}\n"
        "# Written by `make lock` (scripts/lock.py) from pyproject.toml; do not edit.\n"
    )
    target.write_text(header + target.read_text())


def lock() -> None:
    compile_lock(DEV, ["pyproject.toml"], "--extra", "dev")
    # Within the dev lock: the image runs exactly what the tests ran.
    compile_lock(RUNTIME, ["pyproject.toml"], "-c", DEV.name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    backend = "\n".join([*project["build-system"]["requires"], EDITABLE_BACKEND]) + "\n"
    compile_lock(BUILD, ["-"], "-c", DEV.name, stdin=backend)
    compile_lock(PIP, ["-"], stdin=INSTALLER + "\n")
    for path in (DEV, RUNTIME, BUILD, PIP):
        pins = sum(1 for line in path.read_text().splitlines() if "==" in line)
        print(f"{path.name}: {pins} packages pinned with hashes")


def check() -> int:
    expected = fingerprint()
    stale = [
        path.name
        for path in (DEV, RUNTIME, BUILD, PIP)
        if not path.is_file() or not path.read_text().startswith(f"{MARK}{expected}\n")
    ]
    if stale:
        print(
            f"{', '.join(stale)} not made from this pyproject.toml's dependencies: "
            "run `make lock` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    if set(sys.argv[1:]) - {"--upgrade"}:
        sys.exit("usage: lock.py [--upgrade | --check]")
    lock()
