"""Fuzzing /auth/*: no unauthenticated input (query, cookies, Origin) yields a 5xx.

Hypothesis drives each route through the real app (lifespan, database, error handlers)
with Pinterest mocked at the edge. Runs are derandomized and bounded, so a failure
reproduces on every run and the suite stays quick on a small machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import respx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from yarl import URL

from pinauth.settings import Settings
from tests.helpers import SERVICE, log_in, mock_login_upstream, run_client, start_login

EXAMPLES_PER_ROUTE = 150
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES_PER_ROUTE,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# What an HTTP/1.1 server hands an app in a header value: tab, visible ASCII, obs-text.
HEADER_CHARACTERS = st.one_of(
    st.just("\t"),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0x80, max_codepoint=0xFF),
)
header_values = st.text(HEADER_CHARACTERS, max_size=80).map(lambda s: s.strip(" \t"))
query_values = st.text(st.characters(codec="utf-8"), max_size=80)

# Inputs that broke, or nearly broke, parsers before: unparseable URLs, IDN look-alikes.
NASTY_URLS = [
    "https://[",
    "https://%5B",
    "https://[host]",
    "https://[::1",
    "http://[::1]:99999/",
    "https://app.example.com:0x50/",
    "http://\uff03x",
    "https://ex\u2100ample.com/",
    "https://a\uff0fb",
    "https://xn--/",
    "https://\u0430pp.example.com/",
    "//\\evil.example",
    "/\x00",
    "/" + "a" * 5000,
    "https://app.example.com/" + "a" * 5000,
    "",
    "%",
    "%ZZ",
    "\ud7ff",
    # Dot segments a browser removes, plain and percent-encoded, leaving "//evil.com".
    "/.//evil.com",
    "/..//evil.com",
    "/%2e//evil.com",
    "/%2E%2e//evil.com",
    "/.%2e//evil.com",
    "/a/..//evil.com",
    "/a/%2e%2E//evil.com?x=1",
    f"{SERVICE}/.//evil.com",
    f"{SERVICE}//evil.com",
]
url_like = st.one_of(st.sampled_from(NASTY_URLS), query_values)
# Paths of dot segments, empty ones and names, as a browser would resolve them.
dotted_paths = st.lists(
    st.sampled_from([".", "..", "%2e", "%2E", ".%2e", "%2e.", "%2e%2E", "", "evil.com", "a"]),
    min_size=1,
    max_size=6,
).map(lambda segments: "/" + "/".join(segments))


@dataclass(frozen=True)
class Known:
    """Real values from a login done before fuzzing, to mix with garbage."""

    session_cookie: str
    state: str
    login_cookie: str


def cookie_values(real: str) -> st.SearchStrategy[str | None]:
    mutations = [real, real[:-1], real + "x", real.replace(".", ".."), "." + real, f'"{real}"']
    return st.one_of(st.none(), st.sampled_from(mutations), header_values)


def origins() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.sampled_from(["null", SERVICE, "https://evil.example", "http://localhost:8000/"]),
        header_values,
    )


def cookie_header(**cookies: str | None) -> dict[bytes, bytes]:
    parts = [f"{name}={value}" for name, value in cookies.items() if value is not None]
    return {b"cookie": "; ".join(parts).encode("latin-1")} if parts else {}


def origin_header(origin: str | None) -> dict[bytes, bytes]:
    return {} if origin is None else {b"origin": origin.encode("latin-1")}


Builder = Callable[[Known], st.SearchStrategy[httpx.Request]]


def login_requests(known: Known) -> st.SearchStrategy[httpx.Request]:
    raw_queries = st.text(
        st.sampled_from("abcdefgxyz0123456789%[]:/?#@&=+;.\\-_~!$'()*,"), max_size=60
    ).map(lambda q: f"{SERVICE}/auth/login?return_to={q}")
    with_param = url_like.map(
        lambda value: f"{SERVICE}/auth/login?{httpx.QueryParams({'return_to': value})}"
    )
    return st.one_of(raw_queries, with_param).map(lambda url: httpx.Request("GET", url))


def callback_requests(known: Known) -> st.SearchStrategy[httpx.Request]:
    params = st.fixed_dictionaries(
        {},
        optional={
            "code": query_values,
            "state": st.one_of(st.just(known.state), query_values),
            "error": st.one_of(st.just("access_denied"), query_values),
            "error_description": query_values,
        },
    )
    cookies = st.builds(
        cookie_header,
        pinauth_session=cookie_values(known.session_cookie),
        pinauth_login=cookie_values(known.login_cookie),
    )
    return st.builds(
        lambda query, headers: httpx.Request(
            "GET", f"{SERVICE}/auth/callback", params=query, headers=headers
        ),
        params,
        cookies,
    )


def session_route_requests(method: str, path: str) -> Builder:
    def build(known: Known) -> st.SearchStrategy[httpx.Request]:
        return st.builds(
            lambda cookie, origin: httpx.Request(
                method,
                f"{SERVICE}{path}",
                headers=cookie_header(pinauth_session=cookie) | origin_header(origin),
            ),
            cookie_values(known.session_cookie),
            origins(),
        )

    return build


ROUTES: dict[str, Builder] = {
    "login": login_requests,
    "callback": callback_requests,
    "refresh": session_route_requests("POST", "/auth/refresh"),
    "logout": session_route_requests("POST", "/auth/logout"),
    "connection": session_route_requests("DELETE", "/auth/connection"),
}


@contextmanager
def running_app(
    settings: Settings, pinterest: respx.MockRouter
) -> Iterator[tuple[BlockingPortal, httpx.AsyncClient, Known]]:
    """The app with its lifespan, on an event loop in a thread, so hypothesis can drive it."""

    async def prepare(client: httpx.AsyncClient) -> Known:
        await log_in(client, pinterest)
        session = client.cookies["pinauth_session"]
        state = await start_login(client)
        login = client.cookies["pinauth_login"]
        # Pinterest answers every login the fuzzer manages to complete.
        mock_login_upstream(pinterest)
        return Known(session_cookie=session, state=state, login_cookie=login)

    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(run_client(settings, pinterest)) as client,
    ):
        yield portal, client, portal.call(prepare, client)


def assert_confined(location: str) -> None:
    """A redirect goes to Pinterest's consent page or stays on pinauth's own site (the
    fuzzed app's frontend is "/"): never to a host the request chose, nor to a path a
    browser resolves to "//host" ("/.//evil.com" is "//evil.com" once "." is removed)."""
    if location.startswith("/"):
        assert not location.startswith(("//", "/\\")), location
        assert not _UNSAFE.search(location), location
    else:
        assert location.startswith(("https://www.pinterest.com/oauth/?", f"{SERVICE}/")), location
    # yarl resolves like a browser: dot segments removed, %2e taken for ".".
    resolved = URL(f"{SERVICE}/").join(URL(location))
    if resolved.host != "www.pinterest.com":
        assert not resolved.raw_path.startswith("//"), location


_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f]")


@pytest.mark.parametrize("route", ROUTES)
def test_no_input_to_auth_routes_yields_a_server_error(
    settings: Settings, pinterest: respx.MockRouter, route: str
) -> None:
    """Guards: every /auth/* route answers malformed queries, cookies and Origins with a
    4xx or a redirect, never a 5xx (which is also what a traceback in the log means);
    a redirect (a failed callback's included) never leaves pinauth and Pinterest."""
    with running_app(settings, pinterest) as (portal, client, known):

        @FUZZ
        @given(request=ROUTES[route](known))
        def answers_without_a_server_error(request: httpx.Request) -> None:
            client.cookies.clear()  # only the cookies the example chose
            response = portal.call(client.send, request)
            assert response.status_code < 500, (request.url, request.headers, response.text)
            if response.is_redirect:
                assert_confined(response.headers["location"])

        answers_without_a_server_error()


def test_return_to_never_resolves_to_another_site(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards return_to's check: whatever a login starts with, the callback's redirect
    stays on the site, dot segments (plain or percent-encoded) resolved as a browser does."""
    with running_app(settings, pinterest) as (portal, client, _known):

        async def login_and_land(return_to: str) -> str:
            client.cookies.clear()
            state = await start_login(client, return_to=return_to)
            response = await client.get("/auth/callback", params={"code": "c", "state": state})
            assert response.status_code == 303, response.text
            return response.headers["location"]

        @FUZZ
        @given(return_to=st.one_of(dotted_paths, url_like))
        def lands_on_the_site(return_to: str) -> None:
            assert_confined(portal.call(login_and_land, return_to))

        lands_on_the_site()
