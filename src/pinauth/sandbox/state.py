"""The sandbox's in-memory Pinterest: one app registration, users, boards, pins, tokens."""

from __future__ import annotations

import base64
import hashlib
import itertools
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pinauth.numbers import ascii_int

# Pinterest v5's OAuth scopes (components.securitySchemes.pinterest_oauth2 in the spec).
V5_SCOPES = frozenset(
    {
        "ads:read",
        "ads:write",
        "billing:read",
        "billing:write",
        "biz_access:read",
        "biz_access:write",
        "boards:read",
        "boards:read_secret",
        "boards:write",
        "boards:write_secret",
        "catalogs:read",
        "catalogs:write",
        "msot:write",
        "pins:read",
        "pins:read_secret",
        "pins:write",
        "pins:write_secret",
        "user_accounts:read",
        "user_accounts:write",
    }
)
DEFAULT_ACCESS_TOKEN_LIFETIME = 30 * 24 * 3600  # Pinterest: 30 days
REFRESH_TOKEN_LIFETIME = 60 * 24 * 3600  # continuous refresh: a sliding 60 days
CODE_LIFETIME = timedelta(minutes=10)


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")  # RFC 3339 with offset, as the spec wants


@dataclass(frozen=True)
class SandboxConfig:
    client_id: str = "1484000"
    client_secret: str = "sandbox-client-secret"
    redirect_uris: tuple[str, ...] = ("http://localhost:8000/auth/callback",)
    # Where the callback may send the browser on (the app's frontend): the consent form's
    # form-action covers every redirect after its submission, as Chromium enforces it.
    landing_origins: tuple[str, ...] = ()
    # The account the consent page approves for by default, and the others it offers, so
    # several accounts can be linked, tested and demoed.
    username: str = "sandbox_pinner"
    other_usernames: tuple[str, ...] = ("sandbox_studio",)
    # The Host headers (host:port, lower case) the /_sandbox/ controls answer to: the
    # sandbox's public host. A DNS-rebinding page names its own host, and would pass an
    # Origin check (it is same-origin with itself). None: any (an in-process sandbox).
    control_hosts: tuple[str, ...] | None = None

    @property
    def usernames(self) -> tuple[str, ...]:
        return (self.username, *self.other_usernames)


def user_id(username: str) -> str:
    """Stable per username, digits only, as the spec's pattern requires."""
    return str(int.from_bytes(hashlib.sha256(username.encode()).digest()[:7], "big"))


@dataclass
class Board:
    id: str
    name: str
    description: str
    privacy: str
    created_at: datetime
    owner: str

    def as_json(self, pin_count: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "privacy": self.privacy,
            "created_at": iso(self.created_at),
            "board_pins_modified_at": iso(self.created_at),
            "owner": {"username": self.owner},
            "pin_count": pin_count,
            "follower_count": 0,
            "collaborator_count": 0,
            "is_ads_only": False,
        }


@dataclass
class Pin:
    id: str
    board_id: str
    title: str
    description: str
    link: str | None
    alt_text: str | None
    image_url: str
    created_at: datetime
    owner: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": iso(self.created_at),
            "link": self.link,
            "title": self.title,
            "description": self.description,
            "alt_text": self.alt_text,
            "board_id": self.board_id,
            "board_section_id": None,
            "board_owner": {"username": self.owner},
            "is_owner": True,
            "is_standard": True,
            "has_been_promoted": False,
            "dominant_color": "#e60023",
            "parent_pin_id": None,
            "media": {
                "media_type": "image",
                "images": {
                    "600x": {"url": self.image_url, "width": 600, "height": 600},
                },
            },
        }


@dataclass
class Grant:
    user: str
    scopes: frozenset[str]
    expires_at: datetime


@dataclass
class Code(Grant):
    redirect_uri: str


@dataclass
class Fault:
    path_prefix: str
    status: int
    body: Any
    headers: dict[str, str]
    delay: float
    remaining: int


@dataclass
class SandboxState:
    config: SandboxConfig
    access_token_lifetime: int = DEFAULT_ACCESS_TOKEN_LIFETIME
    boards: dict[str, Board] = field(default_factory=dict)
    pins: dict[str, Pin] = field(default_factory=dict)
    codes: dict[str, Code] = field(default_factory=dict)
    access_tokens: dict[str, Grant] = field(default_factory=dict)
    refresh_tokens: dict[str, Grant] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    token_requests: Counter[str] = field(default_factory=Counter)
    api_requests: Counter[str] = field(default_factory=Counter)
    # Refresh tokens used once (rotated away), and how often one was presented again.
    spent_refresh_tokens: set[str] = field(default_factory=set)
    refresh_token_reuses: int = 0
    # Seconds to hold each of the next refresh answers after rotating.
    token_holds: list[float] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(549755885175))

    def __post_init__(self) -> None:
        self.seed()

    def next_id(self) -> str:
        return str(next(self._ids))

    def seed(self) -> None:
        """A few boards and pins, so a fresh sandbox already has something to show."""
        for user in self.config.usernames:
            self._seed(user)

    def _seed(self, user: str) -> None:
        samples = [
            ("Weeknight dinners", "Quick recipes for busy evenings", 3),
            ("Garden ideas", "Small balconies, big plans", 2),
            ("Reading nook", "Cosy corners and good books", 1),
        ]
        for name, description, pins in samples:
            board = self.add_board(user, name, description, "PUBLIC")
            for n in range(pins):
                self.add_pin(
                    user,
                    board.id,
                    title=f"{name} #{n + 1}",
                    description=f"A sample pin on {name}",
                    link="https://www.pinterest.com/",
                    alt_text=None,
                    image_url=f"https://i.pinimg.com/600x/sandbox/{board.id}-{n}.jpg",
                )

    def add_board(self, owner: str, name: str, description: str, privacy: str) -> Board:
        board = Board(self.next_id(), name, description, privacy, now(), owner)
        self.boards[board.id] = board
        return board

    def add_pin(self, owner: str, board_id: str, **fields: Any) -> Pin:
        pin = Pin(id=self.next_id(), board_id=board_id, created_at=now(), owner=owner, **fields)
        self.pins[pin.id] = pin
        return pin

    def pin_count(self, board_id: str) -> int:
        return sum(1 for pin in self.pins.values() if pin.board_id == board_id)

    # --- OAuth ---------------------------------------------------------------------

    def issue_code(self, redirect_uri: str, scopes: frozenset[str], user: str) -> str:
        code = secrets.token_urlsafe(24)
        self.codes[code] = Code(user, scopes, now() + CODE_LIFETIME, redirect_uri)
        return code

    def issue_tokens(self, user: str, scopes: frozenset[str]) -> dict[str, Any]:
        access = "pina_" + secrets.token_urlsafe(32)
        refresh = "pinr_" + secrets.token_urlsafe(32)
        issued = now()
        self.access_tokens[access] = Grant(
            user, scopes, issued + timedelta(seconds=self.access_token_lifetime)
        )
        refresh_expires = issued + timedelta(seconds=REFRESH_TOKEN_LIFETIME)
        self.refresh_tokens[refresh] = Grant(user, scopes, refresh_expires)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "bearer",
            "expires_in": self.access_token_lifetime,
            "refresh_token_expires_in": REFRESH_TOKEN_LIFETIME,
            "refresh_token_expires_at": int(refresh_expires.timestamp()),
            "scope": ",".join(sorted(scopes)),
        }

    def expire_access_tokens(self) -> int:
        past = now() - timedelta(seconds=1)
        for grant in self.access_tokens.values():
            grant.expires_at = past
        return len(self.access_tokens)

    def revoke_refresh_tokens(self) -> int:
        count = len(self.refresh_tokens)
        self.refresh_tokens.clear()
        return count

    def take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if path.startswith(fault.path_prefix):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None


def encode_bookmark(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_bookmark(bookmark: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(bookmark + "=" * (-len(bookmark) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    prefix, _, number = raw.partition(":")
    return ascii_int(number) if prefix == "offset" else None


class StateHolder:
    """The current state; /_sandbox/reset swaps in a fresh one."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.state = SandboxState(config)

    def reset(self) -> None:
        self.state = SandboxState(self.config)
