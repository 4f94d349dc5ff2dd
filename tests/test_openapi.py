"""/docs and /openapi.json describe every route, with typed responses and errors."""

from __future__ import annotations

import httpx


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]

    expected = {
        ("/auth/login", "get"): {"302", "503"},
        ("/auth/callback", "get"): {"303", "400", "403", "502", "503", "504"},
        ("/auth/refresh", "post"): {"200", "401", "403", "503"},
        ("/auth/logout", "post"): {"204", "403"},
        ("/auth/connection", "delete"): {"204", "401", "403"},
        ("/me", "get"): {"200", "401"},
        ("/v1/connect-sessions", "post"): {"201", "401", "403", "422"},
        ("/v1/connections", "get"): {"200", "400", "401", "403", "422"},
        ("/v1/webhook-events", "get"): {"200", "400", "401", "403", "422"},
        ("/v1/connections/{connection_id}", "get"): {"200", "401", "403", "404"},
        ("/v1/connections/{connection_id}", "delete"): {"204", "401", "403", "404"},
        ("/v1/connections/{connection_id}/proxy-tokens", "post"): {
            "201",
            "401",
            "403",
            "404",
            "422",
        },
        ("/v1/connections/{connection_id}/proxy-tokens", "delete"): {"204", "401", "403", "404"},
        ("/v1/connections/{connection_id}/proxy-tokens/{token_id}", "delete"): {
            "204",
            "401",
            "403",
            "404",
            "422",
        },
    }
    for (path, method), statuses in expected.items():
        operation = paths[path][method]
        assert operation["summary"], (path, method)
        assert operation.get("description"), (path, method)
        assert statuses <= set(operation["responses"]), (path, method)
        for status in statuses - {"200", "201", "204", "302", "303"}:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    for method in ("get", "post", "put", "patch", "delete"):
        operation = paths["/pinterest/{path}"][method]
        assert operation["operationId"] == f"proxy_{method}"
        assert [p["name"] for p in operation["parameters"]] == ["path", "Pinauth-Connection-Id"]
        # An API key or proxy token (both bearer), or the cookie.
        assert operation["security"] == [{"apiKey": []}, {"sessionCookie": []}]
        assert {"200", "400", "401", "403", "413", "502", "503", "504"} <= set(
            operation["responses"]
        )
    boards = paths["/boards"]["get"]
    assert {p["name"] for p in boards["parameters"]} == {
        "page_size",
        "bookmark",
        "all",
        "Pinauth-Connection-Id",
    }
    me = paths["/me"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert me == {"$ref": "#/components/schemas/MeResponse"}
    assert set(spec["components"]["schemas"]["MeResponse"]["properties"]) == {
        "connection_id",
        "pinterest_user_id",
        "username",
        "scopes",
        "access_token_expires_at",
        "refresh_token_expires_at",
        "status",
    }


async def test_backend_routes_use_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    """Swagger UI's Authorize button works for every /v1 route."""
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `pinauth api-keys create`.",
    }
    for path, operations in spec["paths"].items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                assert operation["security"] == [{"apiKey": []}], path


async def test_docs_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()


async def test_unknown_route_is_a_json_error(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
