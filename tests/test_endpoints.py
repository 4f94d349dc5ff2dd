"""The endpoint table pinauth derives from Pinterest's vendored spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pinauth.pinterest.endpoints import OTHER, RESOURCES, rate_limit_category, resource

ROOT = Path(__file__).resolve().parents[1]


def test_generated_table_matches_the_vendored_spec() -> None:
    """Guards against a spec update without `make endpoints` (stale categories)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_endpoints.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("method", "path", "category"),
    [
        ("GET", "boards", "org_read"),
        ("POST", "boards", "org_write"),
        ("GET", "boards/5491/pins", "org_read"),
        ("PATCH", "boards/5491", "org_write"),
        # A literal segment wins over a parameter in the same place.
        ("GET", "pins/analytics", "org_analytics"),
        ("GET", "pins/5491", "org_read"),
        ("GET", "ad_accounts/77/ads/analytics", "ads_analytics"),
        ("GET", "no_such_resource", OTHER),
        ("PUT", "boards", OTHER),  # no such operation
        ("GET", "boards/1/2/3/4/5", OTHER),
    ],
)
def test_rate_limit_category(method: str, path: str, category: str) -> None:
    """Calls are scoped by the category Pinterest's spec gives their operation."""
    assert rate_limit_category(method, path) == category


def test_resources_are_a_fixed_set() -> None:
    """Unknown first segments collapse to one value, so labels cannot grow without bound."""
    assert resource("boards/1/pins") == "boards"
    assert resource("user_account") == "user_account"
    assert {resource(f"made_up_{i}/x") for i in range(100)} == {OTHER}
    assert "boards" in RESOURCES
    assert len(RESOURCES) < 50
