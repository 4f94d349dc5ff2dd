"""The sandbox's test controls under /_sandbox/: reset, expire, revoke, faults, counters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, field_validator

from pinauth.sandbox.errors import PinterestError
from pinauth.sandbox.state import Fault, SandboxState, StateHolder, now


class FaultSpec(BaseModel):
    path_prefix: str = Field(description="e.g. /v5/boards or /v5/oauth/token")
    status: int = Field(ge=100, le=599)
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)
    delay: float = Field(0.0, ge=0, le=60)
    times: int = Field(1, ge=1, le=10_000)

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, str]) -> dict[str, str]:
        # A fault the sandbox cannot put on the wire would fail the faulted request (500).
        for name, value in headers.items():
            try:
                name.encode("ascii")
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r} cannot be sent: use latin-1") from None
        return headers


class TokenToInspect(BaseModel):
    token: str


class Lifetime(BaseModel):
    seconds: int = Field(ge=0)


class TokenHold(BaseModel):
    seconds: float = Field(gt=0, le=60, description="how long each answer is held")
    times: int = Field(1, ge=1, le=10_000, description="how many refresh answers to hold")


def same_origin_only(control_hosts: tuple[str, ...] | None) -> Callable[[Request], Awaitable[None]]:
    """The check every control passes: the sandbox's public Host, and its own origin.

    In demo mode the controls share an origin with the demo page, and none needs a
    body a form could not send: any page could otherwise reset the sandbox, expire
    or revoke its tokens with a simple text/plain POST. Browsers send Origin on every
    cross-origin request that could change something; curl and tests send none. A
    DNS-rebinding page (its own name resolving to this server) is same-origin with
    itself, so the Host it names must be the sandbox's own, too.
    """
    hosts = None if control_hosts is None else frozenset(h.lower() for h in control_hosts)

    async def refuse_cross_origin(request: Request) -> None:
        host = request.headers.get("host")
        if hosts is not None and (host is None or host.lower() not in hosts):
            raise PinterestError(
                403, 403, "The sandbox's controls answer on the sandbox's own host only."
            )
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}":
            raise PinterestError(403, 403, "The sandbox's controls refuse cross-origin requests.")

    return refuse_cross_origin


def controls_router(holder: StateHolder) -> APIRouter:
    router = APIRouter(
        prefix="/_sandbox",
        tags=["controls"],
        dependencies=[Depends(same_origin_only(holder.config.control_hosts))],
    )

    def current() -> SandboxState:
        return holder.state

    @router.post("/reset")
    async def reset() -> dict[str, str]:
        """Forget every token, code, fault and counter; restore the sample boards."""
        holder.reset()
        return {"status": "reset"}

    @router.put("/token-hold")
    async def hold_token_answers(hold: TokenHold) -> dict[str, int]:
        """Hold each of the next `times` refresh answers `seconds` after rotating."""
        holds = current().token_holds
        holds.extend([hold.seconds] * hold.times)
        return {"held": len(holds)}

    @router.get("/refresh-token-reuse")
    async def refresh_token_reuse() -> dict[str, int]:
        """How often a refresh token was presented again after it had been spent."""
        return {"reused": current().refresh_token_reuses}

    @router.put("/access-token-lifetime")
    async def set_lifetime(lifetime: Lifetime) -> dict[str, int]:
        """Set the lifetime (expires_in) of access tokens issued from now on."""
        current().access_token_lifetime = lifetime.seconds
        return {"seconds": lifetime.seconds}

    @router.post("/expire-access-tokens")
    async def expire_access_tokens() -> dict[str, int]:
        """Make every access token issued so far expired."""
        return {"expired": current().expire_access_tokens()}

    @router.post("/revoke-refresh-tokens")
    async def revoke_refresh_tokens() -> dict[str, int]:
        """Make every refresh token issued so far invalid."""
        return {"revoked": current().revoke_refresh_tokens()}

    @router.post("/faults", status_code=201)
    async def add_fault(spec: FaultSpec) -> dict[str, int]:
        """Queue a canned response for the next `times` requests under `path_prefix`."""
        state = current()
        state.faults.append(
            Fault(spec.path_prefix, spec.status, spec.body, spec.headers, spec.delay, spec.times)
        )
        return {"queued": len(state.faults)}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, int]:
        """Drop every queued fault."""
        state = current()
        count = len(state.faults)
        state.faults.clear()
        return {"cleared": count}

    @router.post("/introspect")
    async def introspect(token: TokenToInspect) -> dict[str, object]:
        """Whether a token is live (RFC 7662-style), e.g. to check which refresh token won."""
        state = current()
        for kind, grants in (
            ("access_token", state.access_tokens),
            ("refresh_token", state.refresh_tokens),
        ):
            grant = grants.get(token.token)
            if grant is not None:
                return {"active": grant.expires_at > now(), "token_type": kind}
        return {"active": False, "token_type": None}

    @router.get("/counters")
    async def counters() -> dict[str, dict[str, int]]:
        """Token requests by grant type, and API requests by method and path."""
        state = current()
        return {
            "token_requests": dict(state.token_requests),
            "api_requests": dict(state.api_requests),
        }

    return router
