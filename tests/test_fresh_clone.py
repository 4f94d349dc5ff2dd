"""What a fresh clone needs is in the repository: the contract tests never skip for want
of Pinterest's spec, and the locks match pyproject.toml."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec" / "pinterest" / "openapi.yaml"


def test_the_contract_tests_read_the_vendored_spec_alone() -> None:
    provenance = (SPEC.parent / "PROVENANCE.txt").read_text()
    recorded = re.search(r"sha256 openapi.yaml ([0-9a-f]{64})", provenance)
    assert recorded is not None
    assert hashlib.sha256(SPEC.read_bytes()).hexdigest() == recorded.group(1)
    contract = (ROOT / "tests" / "test_contract.py").read_text()
    assert 'SPEC = Path(__file__).resolve().parents[1] / "spec" / "pinterest"' in contract
    assert "skip" not in contract  # nothing there may turn them off


def test_the_locks_were_made_from_this_pyproject() -> None:
    """`make lock` after a dependency change is what keeps installs reproducible."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    for lock in (
        "requirements.lock",
        "requirements-dev.lock",
        "requirements-build.lock",
        "requirements-pip.lock",
    ):
        pins = [line for line in (ROOT / lock).read_text().splitlines() if "==" in line]
        assert pins, lock
        assert all(line.endswith(" \\") for line in pins), lock  # each followed by hashes


def test_every_install_upgrades_pip_from_its_lock_first() -> None:
    """The pip a venv bundles (23.2) fails on the dev lock once coverage has a release newer
    than the locked one (pytest-cov asks for `coverage[toml]`): a fresh clone that installed
    yesterday would not install today."""
    pin = re.search(r"^pip==(\d+)\.(\d+)", (ROOT / "requirements-pip.lock").read_text(), re.M)
    assert pin is not None
    assert (int(pin.group(1)), int(pin.group(2))) >= (23, 3)
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements-pip.lock" in makefile
    assert "$(STAMP): pyproject.toml $(LOCKS) $(PIP_STAMP)" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    for stage in dockerfile.split("FROM ")[1:]:
        installs = re.findall(r"-r (\S+\.lock)", stage)
        assert installs[0].endswith("requirements-pip.lock"), stage
    smoke = (ROOT / "scripts" / "container_smoke.py").read_text()
    assert smoke.index("requirements-pip.lock") < smoke.index('"requirements.lock"')
