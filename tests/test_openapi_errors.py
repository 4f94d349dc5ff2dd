"""/openapi.json documents the errors each route really returns, checked against the code.

The errors a route can raise are read from the code (tests/raised_errors.py), not listed
here again: a new `raise` anywhere under a route, undocumented, fails this test, and so
does a documented error no code path raises.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from pinauth.api.deps import get_acting_connection, get_current_connection, read_session_cookie
from pinauth.errors import (
    ForbiddenOrigin,
    PayloadTooLarge,
    PinauthError,
    ReauthorizationRequired,
    ShuttingDown,
    UndecryptableToken,
    UnprocessableRequest,
)
from pinauth.models import Connection
from pinauth.settings import Settings
from tests.helpers import create_api_key
from tests.raised_errors import RaiseAnalysis

# Raised on paths the analysis cannot rule out, with why they cannot happen.
UNREACHABLE: dict[tuple[str, type[PinauthError]], str] = {
    ("GET", ForbiddenOrigin): "the Origin check runs only for methods that change state",
}
# Every route: the shutdown middleware (shutdown.py) answers for any request it cuts short,
# and a body over the limit is refused (api/body_limit.py, or the proxy's own limit).
EVERY_ROUTE: tuple[type[PinauthError], ...] = (ShuttingDown, PayloadTooLarge)


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            if route.include_in_schema:
                yield route
        elif hasattr(route, "original_router"):  # FastAPI's included router
            yield from api_routes(route.original_router.routes)


def only_method(route: APIRoute) -> str:
    (method,) = route.methods  # type: ignore[misc]  # one per route here, proxy included
    return str(method)


def dependency_calls(dependant: Dependant) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from dependency_calls(sub)


def _free_string(field: Any) -> bool:
    """A parameter every value of which passes validation: an unconstrained string."""
    annotation = field.field_info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation is str and not field.field_info.metadata


def can_fail_validation(dependant: Dependant) -> bool:
    params = [
        *dependant.query_params,
        *dependant.path_params,
        *dependant.header_params,
        *dependant.cookie_params,
    ]
    if dependant.body_params or not all(_free_string(p) for p in params):
        return True
    return any(can_fail_validation(sub) for sub in dependant.dependencies)


def raised(analysis: RaiseAnalysis, route: APIRoute) -> set[tuple[int, str]]:
    errors: set[type[PinauthError]] = set(EVERY_ROUTE)
    for call in dependency_calls(route.dependant):
        errors |= {e for e in analysis.raised_by(call) if issubclass(e, PinauthError)}
    method = only_method(route)
    errors -= {error for (m, error) in UNREACHABLE if m == method}
    pairs = {(e.status_code, e.code) for e in errors}
    if can_fail_validation(route.dependant):
        pairs.add((UnprocessableRequest.status_code, UnprocessableRequest.code))
    return pairs


def documented(operation: dict[str, Any]) -> set[tuple[int, str]]:
    pairs = set()
    for status, response in operation["responses"].items():
        examples = response.get("content", {}).get("application/json", {}).get("examples", {})
        for example in examples.values():
            if "error" in example["value"]:  # pinauth's shape, not Pinterest's {code, message}
                assert example["value"]["message"], (status, example)
                pairs.add((int(status), example["value"]["error"]))
    return pairs


@pytest.fixture
def spec(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def test_every_route_documents_exactly_the_errors_it_can_raise(
    app: FastAPI, spec: dict[str, Any]
) -> None:
    analysis = RaiseAnalysis()
    routes = list(api_routes(app.routes))
    assert len(routes) > 15
    for route in routes:
        method = only_method(route)
        path = route.path_format.replace("{path:path}", "{path}")
        operation = spec["paths"][path][method.lower()]
        assert documented(operation) == raised(analysis, route), (method, path)


def test_the_analysis_sees_through_services_and_handlers() -> None:
    """The analysis itself: it follows typed attributes into services and honours `except`."""
    from pinauth.api import auth, ops
    from pinauth.errors import DatabaseUnavailable, NotReady, UpstreamTimeout

    analysis = RaiseAnalysis()
    # services.auth.complete_login -> self._oauth.exchange_code -> the HTTP client.
    assert UpstreamTimeout in analysis.raised_by(auth.callback)
    # readyz turns every database failure into NotReady.
    assert analysis.raised_by(ops.readyz) == {NotReady}
    assert DatabaseUnavailable in analysis.raised_by(ops.metrics)


def test_examples_are_the_errors_own_status_and_body(spec: dict[str, Any]) -> None:
    """No `not_authenticated` under 413: each status lists only errors of that status."""
    statuses: dict[str, set[int]] = {}
    for cls in _error_classes():  # a few codes have two statuses (upstream_error: 502, 503)
        statuses.setdefault(cls.code, set()).add(cls.status_code)
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                examples = response.get("content", {}).get("application/json", {})
                for example in examples.get("examples", {}).values():
                    value = example["value"]
                    if "error" not in value:
                        assert set(value) == {"code", "message"}, path  # Pinterest's shape
                        continue
                    assert int(status) in statuses[value["error"]], (path, value)


def test_retry_after_is_documented_wherever_it_is_sent(spec: dict[str, Any]) -> None:
    for cls in _error_classes():
        instance = _instance(cls)
        assert ("Retry-After" in instance.headers) == cls.sends_retry_after, cls
    retrying = {(cls.status_code, cls.code) for cls in _error_classes() if cls.sends_retry_after}
    seen = 0
    for operations in spec["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                examples = response.get("content", {}).get("application/json", {})
                codes = {
                    (int(status), e["value"].get("error"))
                    for e in examples.get("examples", {}).values()
                }
                if status == "429" or codes & retrying:
                    assert response["headers"]["Retry-After"]["schema"]["type"] == "integer"
                    seen += 1
                else:
                    assert "Retry-After" not in response.get("headers", {}), status
    assert seen > 20


def test_schema_is_valid_openapi(spec: dict[str, Any]) -> None:
    validate(spec)


def test_no_fastapi_validation_shape(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]
    schema = spec["paths"]["/v1/connections"]["get"]["responses"]["422"]["content"]
    assert schema["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


async def test_the_documented_422_is_what_comes_back(
    client: httpx.AsyncClient, settings: Settings, spec: dict[str, Any]
) -> None:
    key = await create_api_key(settings)
    response = await client.get(
        "/v1/connections", params={"limit": "1000"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 422
    documented_422 = spec["paths"]["/v1/connections"]["get"]["responses"]["422"]["content"]
    example = documented_422["application/json"]["examples"]["invalid_request"]["value"]
    assert set(response.json()) == set(example) == {"error", "message"}
    assert response.json()["error"] == example["error"]


def test_cookie_routes_name_the_cookie_scheme(app: FastAPI, spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["sessionCookie"] == {
        "type": "apiKey",
        "in": "cookie",
        "name": "pinauth_session",
        "description": spec["components"]["securitySchemes"]["sessionCookie"]["description"],
    }
    analysis = RaiseAnalysis()
    cookie_routes = 0
    for route in api_routes(app.routes):
        method = only_method(route)
        operation = spec["paths"][route.path_format.replace("{path:path}", "{path}")]
        security = operation[method.lower()].get("security", [])
        uses_cookie = any(
            analysis.reaches(call, get_current_connection)
            for call in dependency_calls(route.dependant)
        )
        by_api_key = any(
            analysis.reaches(call, get_acting_connection)
            for call in dependency_calls(route.dependant)
        )
        calls = list(dependency_calls(route.dependant))
        reads_cookie = any(analysis.reaches(call, read_session_cookie) for call in calls)
        if not reads_cookie:  # reading it without requiring it (logout, callback): either
            assert ({"sessionCookie": []} in security) == uses_cookie, route.path
        elif {"sessionCookie": []} in security and not uses_cookie:
            assert {} in security, route.path  # optional, then
        assert ({"apiKey": []} in security) == (by_api_key or route.path.startswith("/v1/"))
        cookie_routes += uses_cookie
    assert cookie_routes >= 9  # /me, /auth/refresh, /auth/connection, /boards, 5 x proxy


def test_proxy_documents_bodies_successes_and_pinterest_errors(spec: dict[str, Any]) -> None:
    for method in ("get", "post", "put", "patch", "delete"):
        operation = spec["paths"]["/pinterest/{path}"][method]
        assert {"200", "201", "204", "429", "default"} <= set(operation["responses"])
        assert ("requestBody" in operation) == (method in ("post", "put", "patch"))
        for status in ("400", "401", "404"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            refs = {s["$ref"].rsplit("/", 1)[1] for s in schema["oneOf"]}
            assert refs == {"ErrorResponse", "PinterestErrorResponse"}
    assert set(spec["components"]["schemas"]["PinterestErrorResponse"]["properties"]) == {
        "code",
        "message",
    }


def _error_classes() -> list[type[PinauthError]]:
    found: list[type[PinauthError]] = []
    todo: list[type[PinauthError]] = [PinauthError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _instance(cls: type[PinauthError]) -> PinauthError:
    if cls is UndecryptableToken:
        return cls("/auth/login", Connection())
    if issubclass(cls, ReauthorizationRequired):
        return cls("/auth/login")
    try:
        return cls()
    except TypeError:
        return cls("a message")
