"""The official `pinterest-api-sdk`, unchanged, through pinauth with a proxy token (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import (
    clean_env,
    create_api_key,
    make_settings,
    sandbox_login,
    sandboxed_pinauth,
)

SDK_SCRIPT = Path(__file__).parent / "sdk" / "through_pinauth.py"


def run_sdk(tmp_path: Path, api_uri: str, access_token: str) -> subprocess.CompletedProcess[str]:
    """tests/sdk/through_pinauth.py in a process of its own, configured as the SDK's
    README says: PINTEREST_API_URI and PINTEREST_ACCESS_TOKEN in the environment.

    A process, not an import: the SDK reads the environment once, when `pinterest` is
    first imported (defaults bound into its classes), and may write into os.environ
    (it loads any .env and config.json it finds). Its working directory is an empty
    one of its own because it searches the whole tree under the *parent* of its working
    directory for a config.json and exports what it finds as PINTEREST_* variables.
    """
    cwd = tmp_path / "sdk-home" / "cwd"
    cwd.mkdir(parents=True)
    return subprocess.run(
        [sys.executable, str(SDK_SCRIPT)],
        env=clean_env(PINTEREST_API_URI=api_uri, PINTEREST_ACCESS_TOKEN=access_token),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_official_sdk_runs_unchanged_through_pinauth(
    tmp_path: Path, database_url: str
) -> None:
    """`pinauth serve` and `pinauth sandbox` as real processes; the backend mints a proxy
    token for a connection, and the official SDK, given only PINTEREST_API_URI=<pinauth>
    /pinterest and that token, lists boards, creates a board and creates a pin on it.
    The sandbox then holds them under the connection's account, and the SDK's process
    never saw a Pinterest token."""
    key = await create_api_key(make_settings(database_url))
    rig = sandboxed_pinauth(
        tmp_path,
        database_url,
        "/readyz",
        PINTEREST_SCOPES="user_accounts:read,boards:read,boards:write,pins:read,pins:write",
    )
    base, sandbox_url = rig.base, rig.sandbox_url
    try:
        rig.sandbox.start()
        rig.service.start()
        with httpx.Client(timeout=30) as browser:
            sandbox_login(browser, base, sandbox_url)
            connection_id = browser.get(f"{base}/me").json()["connection_id"]
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as backend:
            minted = backend.post(
                f"/v1/connections/{connection_id}/proxy-tokens", json={"ttl_seconds": 600}
            )
            assert minted.status_code == 201, minted.text
            token = minted.json()["token"]
            sdk = run_sdk(tmp_path, f"{base}/pinterest", token)
            assert sdk.returncode == 0, sdk.stderr
            done = json.loads(sdk.stdout)
            as_proxy = {"Authorization": f"Bearer {token}"}
            boards = backend.get("/boards", headers=as_proxy).json()["items"]
            pins = backend.get(
                f"/pinterest/boards/{done['board']['id']}/pins", headers=as_proxy
            ).json()["items"]
        with httpx.Client(base_url=sandbox_url, timeout=30) as sandbox:
            counters = sandbox.get("/_sandbox/counters").json()
    finally:
        rig.service.kill()
        rig.sandbox.kill()

    assert done["board"]["name"] == "Through pinauth"
    assert done["board"]["id"] not in done["boards_before"]
    assert done["board"]["id"] in done["boards_after"]
    assert done["pin"]["board_id"] == done["board"]["id"]
    assert done["pin"]["title"] == "An SDK pin"
    assert done["board"]["id"] in [board["id"] for board in boards]
    assert [pin["id"] for pin in pins] == [done["pin"]["id"]]
    # The SDK's calls reached the sandbox, through pinauth (the only holder of a token
    # the sandbox accepts).
    assert counters["api_requests"]["POST /v5/boards"] == 1
    assert counters["api_requests"]["POST /v5/pins"] == 1
