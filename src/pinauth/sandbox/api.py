"""The sandbox's Pinterest API v5: user account, boards and pins, paged like Pinterest."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pinauth.numbers import ascii_int
from pinauth.sandbox.errors import AUTHENTICATION_FAILED, INSUFFICIENT_SCOPE, PinterestError, error
from pinauth.sandbox.state import (
    Board,
    Grant,
    Pin,
    SandboxState,
    StateHolder,
    decode_bookmark,
    encode_bookmark,
    now,
    user_id,
)


def api_router(holder: StateHolder) -> APIRouter:
    router = APIRouter()

    def current() -> SandboxState:
        return holder.state

    def authorize(request: Request, *needed: str) -> Grant:
        header = request.headers.get("authorization", "")
        scheme, _, token_value = header.partition(" ")
        grant = current().access_tokens.get(token_value) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at <= now():
            raise PinterestError(401, 2, AUTHENTICATION_FAILED)
        if not set(needed) <= grant.scopes:
            raise PinterestError(401, 3, INSUFFICIENT_SCOPE)
        return grant

    def own_board(grant: Grant, board_id: str) -> Board:
        board = current().boards.get(board_id)
        if board is None or board.owner != grant.user:
            raise PinterestError(404, 404, "Board not found.")
        return board

    def own_pin(grant: Grant, pin_id: str) -> Pin:
        pin = current().pins.get(pin_id)
        if pin is None or pin.owner != grant.user:
            raise PinterestError(404, 404, "Pin not found.")
        return pin

    def page(request: Request, items: list[dict[str, Any]]) -> Response:
        size = ascii_int(request.query_params.get("page_size", "25"))
        if size is None or not 1 <= size <= 250:
            return error(400, 1, "page_size must be an integer from 1 to 250.")
        offset = 0
        if bookmark := request.query_params.get("bookmark"):
            decoded = decode_bookmark(bookmark)
            if decoded is None:
                return error(400, 1, "Invalid bookmark.")
            offset = decoded
        end = offset + size
        return JSONResponse(
            {
                "items": items[offset:end],
                "bookmark": encode_bookmark(end) if end < len(items) else None,
            }
        )

    @router.get("/v5/user_account", tags=["user_account"])
    async def user_account(request: Request) -> Response:
        grant = authorize(request, "user_accounts:read")
        state = current()
        return JSONResponse(
            {
                "account_type": "PINNER",
                "id": user_id(grant.user),
                "username": grant.user,
                "profile_image": "https://i.pinimg.com/75x75_RS/sandbox.jpg",
                "website_url": "",
                "about": "A sandbox account",
                "board_count": sum(1 for b in state.boards.values() if b.owner == grant.user),
                "pin_count": sum(1 for p in state.pins.values() if p.owner == grant.user),
                "follower_count": 0,
                "following_count": 0,
                "monthly_views": 0,
            }
        )

    @router.get("/v5/boards", tags=["boards"])
    async def list_boards(request: Request) -> Response:
        grant = authorize(request, "boards:read")
        state = current()
        boards = [b for b in state.boards.values() if b.owner == grant.user]
        return page(request, [b.as_json(state.pin_count(b.id)) for b in reversed(boards)])

    @router.post("/v5/boards", tags=["boards"], status_code=201)
    async def create_board(request: Request) -> Response:
        grant = authorize(request, "boards:write")
        body = await _json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 180:
            return error(400, 1, "A board needs a name of 1 to 180 characters.")
        privacy = body.get("privacy", "PUBLIC")
        if privacy not in ("PUBLIC", "PROTECTED", "SECRET"):
            return error(400, 1, "privacy must be PUBLIC, PROTECTED or SECRET.")
        description = body.get("description") or ""
        board = current().add_board(grant.user, name.strip(), str(description), privacy)
        return JSONResponse(board.as_json(0), status_code=201)

    @router.get("/v5/boards/{board_id}", tags=["boards"])
    async def get_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:read")
        board = own_board(grant, board_id)
        return JSONResponse(board.as_json(current().pin_count(board_id)))

    @router.patch("/v5/boards/{board_id}", tags=["boards"])
    async def update_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:write")
        board = own_board(grant, board_id)
        body = await _json_object(request)
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"].strip():
                return error(400, 1, "A board needs a name.")
            board.name = body["name"].strip()
        if "description" in body:
            board.description = str(body["description"] or "")
        if "privacy" in body:
            if body["privacy"] not in ("PUBLIC", "PROTECTED", "SECRET"):
                return error(400, 1, "privacy must be PUBLIC, PROTECTED or SECRET.")
            board.privacy = body["privacy"]
        return JSONResponse(board.as_json(current().pin_count(board_id)))

    @router.delete("/v5/boards/{board_id}", tags=["boards"], status_code=204)
    async def delete_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:write")
        own_board(grant, board_id)
        state = current()
        del state.boards[board_id]
        for pin_id in [p.id for p in state.pins.values() if p.board_id == board_id]:
            del state.pins[pin_id]
        return Response(status_code=204)

    @router.get("/v5/boards/{board_id}/pins", tags=["boards"])
    async def board_pins(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:read", "pins:read")
        own_board(grant, board_id)
        state = current()
        pins = [p.as_json() for p in state.pins.values() if p.board_id == board_id]
        return page(request, pins[::-1])

    @router.get("/v5/pins", tags=["pins"])
    async def list_pins(request: Request) -> Response:
        grant = authorize(request, "pins:read")
        pins = [p.as_json() for p in current().pins.values() if p.owner == grant.user]
        return page(request, pins[::-1])

    @router.post("/v5/pins", tags=["pins"], status_code=201)
    async def create_pin(request: Request) -> Response:
        grant = authorize(request, "pins:write")
        body = await _json_object(request)
        state = current()
        board_id = body.get("board_id")
        board = state.boards.get(board_id) if isinstance(board_id, str) else None
        if board is None or board.owner != grant.user:
            return error(400, 1, "board_id must name one of your boards.")
        source = body.get("media_source")
        if (
            not isinstance(source, dict)
            or source.get("source_type") != "image_url"
            or not isinstance(source.get("url"), str)
        ):
            return error(400, 1, "media_source must be {source_type: image_url, url: ...}.")
        pin = state.add_pin(
            grant.user,
            board.id,
            title=str(body.get("title") or ""),
            description=str(body.get("description") or ""),
            link=body.get("link"),
            alt_text=body.get("alt_text"),
            image_url=source["url"],
        )
        return JSONResponse(pin.as_json(), status_code=201)

    @router.get("/v5/pins/{pin_id}", tags=["pins"])
    async def get_pin(pin_id: str, request: Request) -> Response:
        grant = authorize(request, "pins:read")
        return JSONResponse(own_pin(grant, pin_id).as_json())

    @router.delete("/v5/pins/{pin_id}", tags=["pins"], status_code=204)
    async def delete_pin(pin_id: str, request: Request) -> Response:
        grant = authorize(request, "pins:write")
        own_pin(grant, pin_id)
        del current().pins[pin_id]
        return Response(status_code=204)

    @router.api_route(
        "/v5/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def not_implemented(rest: str) -> Response:
        return error(404, 404, f"The sandbox does not implement /v5/{rest}.")

    return router


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise PinterestError(400, 1, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise PinterestError(400, 1, "The body must be a JSON object.")
    return body
