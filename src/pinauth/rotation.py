"""Key rotation: re-encrypt every stored token with the first key of PINAUTH_ENCRYPTION_KEYS.

Safe while replicas serve. A row is rewritten only if it is still at the version it was
read at (compare-and-swap), and the version is not bumped: the tokens are the same ones,
so a refresh that started from that version still stores its answer over the re-encrypted
row. A row written meanwhile (a refresh, a login) fails the swap and is read again: its new
tokens are re-encrypted, never overwritten with the old ones. No refresh is lost.

A row that no configured key decrypts needs a new login: it is marked
reauthorization_required (with its event), the same as the request path does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.crypto import TokenCipher
from pinauth.models import ConnectionStatus
from pinauth.repository import ConnectionRepository, SecretRepository
from pinauth.webhooks import EventType, record_event

log = logging.getLogger(__name__)

ENCRYPTED_COLUMNS = ("access_token_encrypted", "refresh_token_encrypted")
# A row written again between every read and swap is left for the next run.
MAX_ATTEMPTS = 5


def fingerprint(key: str) -> str:
    """A short, one-way name for a key, so people can tell keys apart in reports."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(slots=True)
class RotationReport:
    rotated: int = 0
    already_current: int = 0
    # Rows no configured key decrypts; `marked` of them were active and now need a login.
    undecryptable: int = 0
    marked: int = 0
    # Swaps lost to a concurrent write and redone; rows given up on (run again).
    retried: int = 0
    gave_up: int = 0


@dataclass(slots=True)
class KeyUsage:
    """Rows per key index (0 = the first key) and rows no key decrypts."""

    rows: int = 0
    by_key: dict[int, int] = field(default_factory=dict)
    undecryptable: int = 0
    # Of those, the ones still marked active: served as if usable until a call fails.
    undecryptable_active: int = 0

    @property
    def outdated(self) -> int:
        """Rows that still need a key other than the first."""
        return sum(n for index, n in self.by_key.items() if index > 0)


class KeyRotator:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cipher: TokenCipher,
        *,
        batch_size: int = 200,
        before_write: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._cipher = cipher
        self._batch_size = batch_size
        # Called with a batch's public ids between reading and writing it: lets a test
        # put a concurrent refresh exactly there.
        self._before_write = before_write

    async def check(self) -> KeyUsage:
        """How many rows each configured key still encrypts (a row may count under two)."""
        usage = KeyUsage()
        after = 0
        while True:
            async with self._sessionmaker() as db:
                rows = await SecretRepository(db).page(after, self._batch_size)
            if not rows:
                return usage
            for row in rows:
                usage.rows += 1
                indexes = {
                    self._cipher.key_index(ciphertext)
                    for column in ENCRYPTED_COLUMNS
                    if (ciphertext := getattr(row, column)) is not None
                }
                if None in indexes:
                    usage.undecryptable += 1
                    if row.status == ConnectionStatus.ACTIVE:
                        usage.undecryptable_active += 1
                for index in indexes - {None}:
                    assert index is not None
                    usage.by_key[index] = usage.by_key.get(index, 0) + 1
            after = rows[-1].id

    async def rotate(self) -> RotationReport:
        report = RotationReport()
        after = 0
        while True:
            async with self._sessionmaker() as db:
                rows = await SecretRepository(db).page(after, self._batch_size)
            if not rows:
                return report
            await self._rotate_batch(rows, report)
            after = rows[-1].id

    async def _rotate_batch(self, rows: list[Any], report: RotationReport) -> None:
        pending = rows
        for attempt in range(MAX_ATTEMPTS):
            writes: list[tuple[str, int, dict[str, str]]] = []
            for row in pending:
                plan = self._plan(row)
                if plan is None:
                    report.undecryptable += 1
                    if row.status == ConnectionStatus.ACTIVE and await self._mark(row):
                        report.marked += 1
                elif not plan:
                    report.already_current += 1
                else:
                    writes.append((row.public_id, row.version, plan))
            if not writes:
                return
            if self._before_write is not None:
                await self._before_write([public_id for public_id, _, _ in writes])
            moved: list[str] = []
            async with self._sessionmaker() as db, db.begin():
                repository = SecretRepository(db)
                for public_id, version, values in writes:
                    if await repository.reencrypt(public_id, version, values):
                        report.rotated += 1
                    else:
                        moved.append(public_id)
            if not moved:
                return
            # Written meanwhile (a refresh or a login): read the new tokens and go again.
            report.retried += len(moved)
            async with self._sessionmaker() as db:
                pending = await SecretRepository(db).by_public_ids(moved)
            if attempt == MAX_ATTEMPTS - 1:
                report.gave_up += len(pending)

    def _plan(self, row: Any) -> dict[str, str] | None:
        """The columns to rewrite under the first key; None if a column decrypts with none."""
        values: dict[str, str] = {}
        for column in ENCRYPTED_COLUMNS:
            ciphertext = getattr(row, column)
            if ciphertext is None:
                continue
            index = self._cipher.key_index(ciphertext)
            if index is None:
                return None
            if index > 0:
                values[column] = self._cipher.rotate(ciphertext)
        return values

    async def _mark(self, row: Any) -> bool:
        """Mark an undecryptable row reauthorization_required, once (compare-and-swap)."""
        async with self._sessionmaker() as db, db.begin():
            repository = ConnectionRepository(db)
            marked = await repository.replace_version(
                row.public_id, row.version, {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED}
            )
            current = await repository.get(row.public_id) if marked else None
            if current is not None:
                await record_event(db, EventType.REAUTHORIZATION_REQUIRED, current)
        if marked:
            log.warning(
                "connection %s is encrypted under no configured key; it needs a new login",
                row.public_id,
            )
        return marked
