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
    for lock in ("requirements.lock", "requirements-dev.lock", "requirements-build.lock"):
        pins = [line for line in (ROOT / lock).read_text().splitlines() if "==" in line]
        assert pins, lock
        assert all(line.endswith(" \\") for line in pins), lock  # each followed by hashes
