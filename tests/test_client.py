"""pinauth.client against a real running pinauth (uvicorn, loopback) and its sandbox."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pinauth.client import (
    CONNECTION_ID_HEADER,
    APIError,
    AuthenticationError,
    ConnectionNotFoundError,
    ConnectResultMismatchError,
    InvalidConnectResultError,
    PinauthAPIError,
    PinauthClient,
    PinauthTimeoutError,
    PinauthTransportError,
    PinterestAPIError,
    ProxyTokenNotFoundError,
    RateLimitError,
    ReauthorizationRequiredError,
    UnexpectedResponseError,
    retry_after_seconds,
)
from tests.helpers import (
    ServedWithSandbox,
    consent_in_sandbox,
    create_api_key,
    free_port,
    pinauth_with_sandbox,
)


@pytest.fixture(autouse=True)
def sdk_kept_to_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """When first imported, the official SDK copies into os.environ the nearest .env
    (python-dotenv, searching up from its own file) and the first config.json anywhere
    under the parent of the working directory: keep both from reaching this process."""
    monkeypatch.setenv("PYTHON_DOTENV_DISABLED", "1")
    cwd = tmp_path / "sdk-home" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[ServedWithSandbox]:
    async with pinauth_with_sandbox(database_url) as running:
        yield running


@pytest.fixture
async def pinauth(served: ServedWithSandbox) -> AsyncIterator[PinauthClient]:
    key = await create_api_key(served.settings)
    async with PinauthClient(served.base, key) as client:
        yield client


def connect_result_of(landed: httpx.Response) -> str:
    """The `pinauth_connect_result` a connect session's browser came back with."""
    query = parse_qs(urlsplit(landed.headers["location"]).query)
    return query["pinauth_connect_result"][0]


async def connect(pinauth: PinauthClient, served: ServedWithSandbox, end_user_id: str) -> None:
    """`end_user_id`'s browser follows a fresh connect session through consent, and the
    backend confirms the result for `end_user_id`."""
    session = await pinauth.create_connect_session(end_user_id, return_to="/")
    async with httpx.AsyncClient(base_url=served.base) as browser:
        landed = await consent_in_sandbox(browser, session.url)
    assert urlsplit(landed.headers["location"]).path == "/"
    confirmed = await pinauth.confirm_connection(connect_result_of(landed), end_user_id)
    assert confirmed.status == "active"


async def all_connections(pinauth: PinauthClient, **filters: object) -> list[str]:
    return [c.id async for c in pinauth.connections(**filters)]  # type: ignore[arg-type]


async def test_a_backend_connects_an_end_user_and_calls_pinterest_for_them(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    session = await pinauth.create_connect_session("user_42", return_to="/")
    assert session.connect_url.startswith(f"{served.base}/auth/login?connect_session=")
    assert session.expires_at > datetime.now(UTC)
    assert session.token not in repr(session)
    async with httpx.AsyncClient(base_url=served.base) as browser:
        landed = await consent_in_sandbox(browser, session.connect_url)
    result = connect_result_of(landed)
    assert await all_connections(pinauth, end_user_id="user_42") == []  # pending until confirmed
    [pending] = [c async for c in pinauth.connections(status="pending")]
    confirmed = await pinauth.confirm_connection(result, "user_42")
    with pytest.raises(InvalidConnectResultError) as used:
        await pinauth.confirm_connection(result, "user_42")
    assert (used.value.status_code, used.value.error) == (400, "invalid_connect_result")

    [connection] = [c async for c in pinauth.connections(end_user_id="user_42")]
    assert connection.id == confirmed.id == pending.id
    assert connection.end_user_id == "user_42"
    assert connection.status == "active"
    assert "pins:write" in connection.scopes
    assert await pinauth.get_connection(connection.id) == connection
    assert await all_connections(pinauth, end_user_id="someone_else") == []

    boards = (await pinauth.request(connection.id, "GET", "/boards")).json()["items"]
    pin = await pinauth.request(
        connection.id,
        "POST",
        "pins",
        json={
            "board_id": boards[0]["id"],
            "title": "From pinauth.client",
            "media_source": {"source_type": "image_url", "url": "https://example.com/a.jpg"},
        },
    )
    assert pin.status_code == 201
    mine = await pinauth.request(connection.id, "GET", "/pins", params={"page_size": 5})
    assert pin.json()["id"] in [p["id"] for p in mine.json()["items"]]

    await pinauth.delete_connection(connection.id)
    with pytest.raises(ConnectionNotFoundError) as gone:
        await pinauth.get_connection(connection.id)
    assert (gone.value.status_code, gone.value.error) == (404, "connection_not_found")
    with pytest.raises(ConnectionNotFoundError):
        await pinauth.request(connection.id, "GET", "/boards")
    assert await all_connections(pinauth, end_user_id="user_42") == []


async def test_a_link_completed_by_someone_else_is_refused_and_kept_by_nobody(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    """The login-swapping attack through the client: a link minted for `attacker`,
    completed in another browser, confirmed for the end user logged in there."""
    session = await pinauth.create_connect_session("attacker", return_to="/")
    async with httpx.AsyncClient(base_url=served.base) as victim:
        landed = await consent_in_sandbox(victim, session.connect_url)
    with pytest.raises(ConnectResultMismatchError) as refused:
        await pinauth.confirm_connection(connect_result_of(landed), "victim")

    assert (refused.value.status_code, refused.value.error) == (403, "connect_result_mismatch")
    assert await all_connections(pinauth, status="pending") == []
    assert await all_connections(pinauth) == []


async def test_connections_follows_cursors_across_pages(
    served: ServedWithSandbox, database_url: str
) -> None:
    """Guards the cursor loop: without it only the first page (one item) comes back."""
    key = await create_api_key(served.settings)
    pages: list[httpx.URL] = []

    async def note(request: httpx.Request) -> None:
        if request.url.path == "/v1/connections":
            pages.append(request.url)

    async with httpx.AsyncClient(event_hooks={"request": [note]}) as http:
        async with PinauthClient(served.base, key, http=http) as pinauth:
            for user in ("ada", "grace", "edsger"):
                await connect(pinauth, served, user)
            everyone = await all_connections(pinauth, page_size=1)
            pages_for_everyone = len(pages)
            pages.clear()
            active = await all_connections(pinauth, status="active", page_size=2)
        assert not http.is_closed  # a shared client stays the caller's to close

    assert len(everyone) == len(set(everyone)) == 3
    assert active == everyone  # oldest first, whatever the page size
    assert pages_for_everyone in (3, 4)  # the last page may or may not be empty
    assert "cursor" not in pages[0].params
    assert all("cursor" in url.params for url in pages[1:])
    assert [url.params["status"] for url in pages] == ["active"] * len(pages)


async def test_pinauth_errors_carry_its_code(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    with pytest.raises(PinauthAPIError) as invalid:
        await pinauth.create_connect_session("")
    assert (invalid.value.status_code, invalid.value.error) == (422, "invalid_request")
    assert "end_user_id" in invalid.value.message
    assert invalid.value.request_id  # pinauth's X-Request-ID, to find its log lines

    with pytest.raises(PinauthAPIError) as no_such_route:
        await pinauth.request("conn_x", "GET", "/boards")
    assert no_such_route.value.error == "connection_not_found"

    async with PinauthClient(served.base, "pinauth_sk_" + "A" * 43) as stranger:
        with pytest.raises(AuthenticationError) as refused:
            await anext(aiter(stranger.connections()))
    assert (refused.value.status_code, refused.value.error) == (401, "invalid_api_key")
    assert "invalid_api_key" in str(refused.value)


async def test_pinterest_errors_pass_through_with_code_status_and_retry_after(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    await connect(pinauth, served, "user_1")
    [connection_id] = await all_connections(pinauth)

    with pytest.raises(PinterestAPIError) as bad_pin:
        await pinauth.request(connection_id, "POST", "/pins", json={"board_id": "nope"})
    assert (bad_pin.value.status_code, bad_pin.value.code) == (400, 1)
    assert "board_id" in bad_pin.value.message
    assert not isinstance(bad_pin.value, RateLimitError)

    async with httpx.AsyncClient(base_url=served.sandbox) as sandbox:
        fault = {
            "path_prefix": "/v5/boards",
            "status": 429,
            "body": {"code": 8, "message": "This request exceeded a rate limit."},
            "headers": {"Retry-After": "120"},
        }
        assert (await sandbox.post("/_sandbox/faults", json=fault)).status_code == 201
    with pytest.raises(RateLimitError) as limited:
        await pinauth.request(connection_id, "GET", "/boards")
    assert (limited.value.status_code, limited.value.code) == (429, 8)
    assert limited.value.retry_after is not None
    assert 100 <= limited.value.retry_after <= 120
    # pinauth now holds further calls in that category itself, in Pinterest's shape.
    with pytest.raises(RateLimitError) as held:
        await pinauth.request(connection_id, "GET", "/boards")
    assert held.value.retry_after is not None


async def test_a_connection_pinterest_gave_up_on_names_its_end_user(database_url: str) -> None:
    # The connection cache on: a reconnect in place must replace the cached
    # (reauthorization_required) row at once, not when it expires (PINAUTH_CACHE_TTL).
    async with (
        pinauth_with_sandbox(database_url, cache_ttl_seconds=60) as served,
        PinauthClient(served.base, await create_api_key(served.settings)) as pinauth,
    ):
        await reconnect_in_place(pinauth, served)


async def reconnect_in_place(pinauth: PinauthClient, served: ServedWithSandbox) -> None:
    await connect(pinauth, served, "user_9")
    [connection_id] = await all_connections(pinauth)
    async with httpx.AsyncClient(base_url=served.sandbox) as sandbox:
        await sandbox.post("/_sandbox/expire-access-tokens")
        await sandbox.post("/_sandbox/revoke-refresh-tokens")

    with pytest.raises(ReauthorizationRequiredError) as gone:
        await pinauth.request(connection_id, "GET", "/boards")

    assert (gone.value.status_code, gone.value.error) == (401, "reauthorization_required")
    assert gone.value.end_user_id == "user_9"
    assert (await pinauth.get_connection(connection_id)).status == "reauthorization_required"
    # The way back: a new connect session for that end user renews the same connection.
    await connect(pinauth, served, "user_9")
    assert await all_connections(pinauth) == [connection_id]
    assert (await pinauth.request(connection_id, "GET", "/boards")).status_code == 200


async def test_transport_failures_become_client_errors() -> None:
    closed_port = free_port()
    async with PinauthClient(f"http://127.0.0.1:{closed_port}", "pinauth_sk_x") as pinauth:
        with pytest.raises(PinauthTransportError) as unreachable:
            await pinauth.get_connection("conn_x")
    assert isinstance(unreachable.value.__cause__, httpx.ConnectError)

    hung_up = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with PinauthClient(f"http://127.0.0.1:{port}", "k", timeout=0.2) as pinauth:
            with pytest.raises(PinauthTimeoutError) as silent:
                await pinauth.get_connection("conn_x")
        await asyncio.wait_for(hung_up.wait(), 10)  # the client gave up on the connection
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(silent.value.__cause__, httpx.TimeoutException)


async def test_answers_that_are_not_pinauths_are_reported_as_such() -> None:
    """A base_url that reaches something else (a web page, a proxy's error page)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/connections/conn_html":
            return httpx.Response(200, html="<html>hi</html>")
        return httpx.Response(502, text="bad gateway")

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http,
        PinauthClient("http://elsewhere.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        with pytest.raises(UnexpectedResponseError, match="is base_url pinauth"):
            await pinauth.get_connection("conn_html")
        with pytest.raises(APIError) as gateway:
            await pinauth.get_connection("conn_other")
    assert type(gateway.value) is APIError
    assert gateway.value.status_code == 502
    assert "bad gateway" in str(gateway.value)


async def test_ids_stay_one_path_segment(pinauth: PinauthClient) -> None:
    """An id with `/` or `..` in it cannot turn a call into another route."""
    with pytest.raises(PinauthAPIError) as refused:
        await pinauth.delete_connection("../connect-sessions")
    assert refused.value.status_code == 404  # unquoted: DELETE /v1/connect-sessions, a 405
    with pytest.raises(ValueError, match="empty"):
        await pinauth.get_connection("")


async def test_a_pinterest_path_never_leaves_the_proxy() -> None:
    """A path built from user input ("/boards/{board_id}") cannot climb out of /pinterest
    and call /v1 with the API key: httpx would resolve the dots before sending."""
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.raw_path.decode())
        return httpx.Response(200, json={})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http,
        PinauthClient("http://pinauth.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        for board_id in ["../../v1/connections/conn_other", "..", "%2e%2e/v1", "./x", ".%2E"]:
            with pytest.raises(ValueError, match="segments"):
                await pinauth.request("conn_mine", "DELETE", f"/boards/{board_id}")
        await pinauth.request("conn_mine", "GET", "/boards/..board/pins?q=../x")
    assert sent == ["/pinterest/boards/..board/pins?q=../x"]


def recording(sent: list[httpx.Request]) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    "name",
    ["pinauth-connection-id", "PINAUTH-CONNECTION-ID", CONNECTION_ID_HEADER, "authorization"],
)
async def test_caller_headers_cannot_choose_whom_a_call_acts_for(name: str) -> None:
    sent: list[httpx.Request] = []
    async with (
        recording(sent) as http,
        PinauthClient("http://pinauth.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        with pytest.raises(ValueError, match="must not set"):
            await pinauth.request("conn_mine", "GET", "/boards", headers={name: "conn_other"})
        await pinauth.request("conn_mine", "GET", "/boards", headers={"X-Trace": "1"})
    [request] = sent
    assert request.headers.get_list(CONNECTION_ID_HEADER) == ["conn_mine"]
    assert request.headers.get_list("authorization") == ["Bearer pinauth_sk_x"]
    assert request.headers["x-trace"] == "1"


@pytest.mark.parametrize(
    "connection_id", [".", "..", "./conn_x", "conn_x/..", "conn_x/x", "conn_a b", "CONN_X", "x"]
)
async def test_ids_that_cannot_be_pinauths_are_not_found_without_a_request(
    connection_id: str,
) -> None:
    sent: list[httpx.Request] = []
    async with (
        recording(sent) as http,
        PinauthClient("http://pinauth.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        calls = [
            pinauth.get_connection(connection_id),
            pinauth.delete_connection(connection_id),
            pinauth.create_proxy_token(connection_id),
            pinauth.revoke_proxy_token(connection_id, "pt_x"),
            pinauth.revoke_proxy_tokens(connection_id),
            pinauth.request(connection_id, "GET", "/boards"),
        ]
        for call in calls:
            with pytest.raises(ConnectionNotFoundError) as missing:
                await call
            assert (missing.value.status_code, missing.value.error) == (404, "connection_not_found")
            assert missing.value.request_id is None
            assert "conn_" in str(missing.value)
    assert sent == []


async def test_arguments_no_request_can_carry_say_what_is_wrong(pinauth: PinauthClient) -> None:
    """Before these reached httpx: InvalidURL, or 'could not reach pinauth'."""
    with pytest.raises(ValueError, match="path"):
        await pinauth.request("conn_x", "GET", "/boards\t1")
    for method in ("GE T", "HEAD", ""):
        with pytest.raises(ValueError, match="method must be one of"):
            await pinauth.request("conn_x", method, "/boards")
    for headers in ({"X-Note": "a\nb"}, {"X-Note": "caf\u00e9"}, {"X Note": "a"}, {"": "a"}):
        with pytest.raises(ValueError, match="header") as refused:
            await pinauth.request("conn_x", "GET", "/boards", headers=headers)
        assert "could not reach" not in str(refused.value)
    with pytest.raises(ValueError, match="api_key"):
        PinauthClient(pinauth.base_url, "pinauth_sk_\x00")
    # Still a call pinauth answers: the connection does not exist.
    with pytest.raises(ConnectionNotFoundError):
        await pinauth.request("conn_x", "GET", "/boards", headers={"X-Note": "a\tb c"})


async def test_a_redirect_from_pinterest_is_not_a_success(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    await connect(pinauth, served, "user_1")
    [connection_id] = await all_connections(pinauth)
    async with httpx.AsyncClient(base_url=served.sandbox) as sandbox:
        fault = {
            "path_prefix": "/v5/boards",
            "status": 302,
            "headers": {"Location": "https://elsewhere.example/boards"},
        }
        assert (await sandbox.post("/_sandbox/faults", json=fault)).status_code == 201

    with pytest.raises(PinterestAPIError) as redirected:
        await pinauth.request(connection_id, "GET", "/boards")

    assert (redirected.value.status_code, redirected.value.code) == (302, None)
    assert "redirect" in str(redirected.value)
    assert (await pinauth.request(connection_id, "GET", "/boards")).status_code == 200


async def test_a_redirect_instead_of_pinauth_is_reported_as_such() -> None:
    """An http:// base_url whose server redirects to https, say: not a deletion done."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "https://pinauth.test/"})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http,
        PinauthClient("http://pinauth.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        with pytest.raises(
            UnexpectedResponseError, match=r"redirect .*301.* to https://pinauth\.test/"
        ):
            await pinauth.delete_connection("conn_x")


def test_bad_arguments_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="http"):
        PinauthClient("pinauth.example.com", "key")
    with pytest.raises(ValueError, match="api_key"):
        PinauthClient("https://pinauth.example.com", " ")
    assert "key" not in repr(PinauthClient("https://pinauth.example.com", "secret-key"))


def test_retry_after_reads_both_of_its_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("30") == 30
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90)), now=now) == 90
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=5)), now=now) == 0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
    # Digits to str.isdigit() that float() refuses or HTTP never writes; too long; too far.
    assert retry_after_seconds("²") is None
    assert retry_after_seconds("\u0663") is None
    assert retry_after_seconds("1" * 5000) is None
    assert retry_after_seconds("Mon, 01 Jan 99999999999999999999999 00:00:00 GMT") is None


async def test_sdk_client_explains_a_missing_extra(
    pinauth: PinauthClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pinterest.client", None)
    with pytest.raises(ImportError, match=r"pinauth\[sdk\]"):
        await pinauth.sdk_client("conn_x")


async def test_a_proxy_token_acts_for_its_connection_on_the_proxy(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    await connect(pinauth, served, "user_1")
    [connection_id] = await all_connections(pinauth)

    minted = await pinauth.create_proxy_token(connection_id, ttl_seconds=120)

    assert minted.token.startswith("pinauth_pt_")
    assert minted.token not in repr(minted)
    assert minted.connection_id == connection_id
    left = minted.expires_at - datetime.now(UTC)
    assert timedelta(seconds=100) < left <= timedelta(seconds=120)
    async with httpx.AsyncClient() as http:
        boards = await http.get(
            f"{pinauth.pinterest_url}/boards",
            headers={"Authorization": f"Bearer {minted.token}"},
        )
    assert boards.status_code == 200
    assert boards.json()["items"]
    with pytest.raises(PinauthAPIError) as too_long:
        await pinauth.create_proxy_token(connection_id, ttl_seconds=86_401)
    assert too_long.value.status_code == 422
    with pytest.raises(ConnectionNotFoundError):
        await pinauth.create_proxy_token("conn_nobody")


async def test_proxy_tokens_are_revoked_one_by_one_or_all_at_once(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    await connect(pinauth, served, "user_1")
    [connection_id] = await all_connections(pinauth)
    first, second, third = [await pinauth.create_proxy_token(connection_id) for _ in range(3)]
    assert first.id.startswith("pt_")
    assert len({first.id, second.id, third.id}) == 3
    assert first.id in repr(first)

    async def status(token: str) -> int:
        async with httpx.AsyncClient() as http:
            answer = await http.get(
                f"{pinauth.pinterest_url}/boards", headers={"Authorization": f"Bearer {token}"}
            )
        return answer.status_code

    assert [await status(t.token) for t in (first, second, third)] == [200, 200, 200]
    await pinauth.revoke_proxy_token(connection_id, first.id)
    assert [await status(t.token) for t in (first, second, third)] == [401, 200, 200]
    with pytest.raises(ProxyTokenNotFoundError) as again:
        await pinauth.revoke_proxy_token(connection_id, first.id)
    assert (again.value.status_code, again.value.error) == (404, "proxy_token_not_found")
    assert again.value.request_id is not None  # pinauth's answer, not the client's check
    await pinauth.revoke_proxy_tokens(connection_id)
    assert [await status(t.token) for t in (second, third)] == [401, 401]
    await pinauth.revoke_proxy_tokens(connection_id)  # none left: still fine
    assert (await pinauth.get_connection(connection_id)).status == "active"
    with pytest.raises(ConnectionNotFoundError):
        await pinauth.revoke_proxy_tokens("conn_nobody")


@pytest.mark.parametrize("token_id", ["", ".", "..", "pt_x/..", "pt_x/x", "PT_X", "pt_a b", "x"])
async def test_token_ids_that_cannot_be_pinauths_are_not_found_without_a_request(
    token_id: str,
) -> None:
    sent: list[httpx.Request] = []
    async with (
        recording(sent) as http,
        PinauthClient("http://pinauth.test", "pinauth_sk_x", http=http) as pinauth,
    ):
        with pytest.raises(ProxyTokenNotFoundError) as missing:
            await pinauth.revoke_proxy_token("conn_x", token_id)
    assert (missing.value.status_code, missing.value.error) == (404, "proxy_token_not_found")
    assert missing.value.request_id is None
    assert sent == []


# The SDK's generated code reads headers through urllib3's deprecated getheader(): its
# warning, not ours, and only this test runs the SDK.
@pytest.mark.filterwarnings(r"ignore:HTTPResponse\.getheader\(\) is deprecated:DeprecationWarning")
async def test_the_official_sdk_runs_unchanged_through_pinauth(
    pinauth: PinauthClient, served: ServedWithSandbox
) -> None:
    from pinterest.organic.boards import Board  # type: ignore[import-untyped]
    from pinterest.organic.pins import Pin  # type: ignore[import-untyped]

    await connect(pinauth, served, "user_1")
    [connection_id] = await all_connections(pinauth)

    sdk = await pinauth.sdk_client(connection_id, ttl_seconds=300)

    assert sdk.configuration.host == f"{served.base}/pinterest"
    assert sdk.configuration.access_token.startswith("pinauth_pt_")
    # The SDK is synchronous; pinauth serves from this event loop, so it runs in a thread.
    boards, _bookmark = await asyncio.to_thread(Board.get_all, page_size=25, client=sdk)
    board = await asyncio.to_thread(
        Board.create, name="Made by the SDK", description="via pinauth", client=sdk
    )
    pin = await asyncio.to_thread(
        Pin.create,
        board_id=board.id,
        title="SDK pin",
        media_source={"source_type": "image_url", "url": "https://example.com/p.jpg"},
        client=sdk,
    )
    assert len(boards) >= 1
    assert board.name == "Made by the SDK"
    assert pin.board_id == board.id
    seen = (await pinauth.request(connection_id, "GET", f"/pins/{pin.id}")).json()
    assert seen["title"] == "SDK pin"
