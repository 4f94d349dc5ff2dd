"""Token encryption at rest and the signing of values handed to browsers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer

from pinauth.errors import ConfigurationError


class TokenDecryptionError(Exception):
    """A stored token cannot be decrypted with any configured key."""


class TokenCipher:
    """Fernet encryption with rotation: the first key encrypts, every key decrypts."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigurationError("at least one encryption key is required")
        try:
            self._keys = [Fernet(key.encode()) for key in keys]
            self._fernet = MultiFernet(self._keys)
        except (ValueError, TypeError) as e:
            raise ConfigurationError(
                "PINAUTH_ENCRYPTION_KEYS must be comma-separated Fernet keys "
                "(32 url-safe base64-encoded bytes each)"
            ) from e
        # Fernet checked each: 32 bytes of url-safe base64.
        self._material = [base64.urlsafe_b64decode(key.encode()) for key in keys]

    def derived_keys(self, purpose: bytes) -> list[bytes]:
        """A 256-bit key for `purpose` from each configured key, in the same order.

        HKDF-SHA256 with `purpose` as its info: keys for different purposes are
        independent of each other and of the Fernet keys themselves.
        """
        return [
            HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(material)
            for material in self._material
        ]

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode()
        except InvalidToken as e:
            raise TokenDecryptionError("no configured key decrypts this token") from e

    def rotate(self, ciphertext: str) -> str:
        """The same plaintext under the first key (its original timestamp kept)."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken as e:
            raise TokenDecryptionError("no configured key decrypts this token") from e

    def key_index(self, ciphertext: str) -> int | None:
        """Which configured key (0 = the first) decrypts `ciphertext`; None if none does.

        Fernet tokens do not name their key, so each is tried in turn: for rotation and its
        check only, never on a request.
        """
        token = ciphertext.encode("ascii")
        for index, key in enumerate(self._keys):
            try:
                key.decrypt(token)
            except InvalidToken:
                continue
            return index
        return None

    @property
    def key_count(self) -> int:
        return len(self._keys)


def digest(value: str) -> str:
    """SHA-256 hex digest: what the database keeps of session ids and login nonces."""
    return hashlib.sha256(value.encode()).hexdigest()


class CookieSigner:
    """Signs the opaque ids pinauth puts in cookies, so forged ones never reach the DB."""

    def __init__(self, secret_key: str, purpose: str) -> None:
        self._signer = Signer(secret_key, salt=f"pinauth.{purpose}")

    def sign(self, value: str) -> str:
        return self._signer.sign(value).decode("ascii")

    def unsign(self, signed: str) -> str | None:
        try:
            return self._signer.unsign(signed).decode("ascii")
        except BadSignature:
            return None


def state_serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="pinauth.oauth-state")


# How long a pagination cursor stays usable after it was issued.
CURSOR_TTL_SECONDS = 24 * 3600
_CURSOR_KEY_PURPOSE = b"pinauth cursor key v1"


class CursorCodec:
    """Opaque, tamper-proof, expiring pagination cursors around an integer position.

    A cursor is AES-GCM over (position, issued at) under a key derived for cursors only
    (HKDF-SHA256 from each of PINAUTH_ENCRYPTION_KEYS, with its own `info`, so it is
    neither the Fernet key that encrypts tokens nor anything another purpose derives).
    The listing and filters that issued it are its associated data: a cursor is opened
    only by the very same listing with the very same filters, and only for CURSOR_TTL
    after it was issued. The position, a database key, is not readable from outside.

    Key rotation: the first key's cursor key seals, every key's opens. Putting a new key
    first keeps every outstanding cursor working (the old key still opens them); removing
    the old key ends the cursors it sealed (`400 invalid_cursor`: the client lists again
    from the start). Cursors live 24 hours, so waiting that long after putting the new key
    first and before dropping the old one ends none.
    """

    _VERSION = b"\x01"
    _NONCE_BYTES = 12
    _PLAINTEXT = struct.Struct(">qq")  # position, issued at (Unix seconds)
    # Another replica's clock may run a little ahead: its fresh cursors are still fresh here.
    _FUTURE_SKEW_SECONDS = 300
    _MAX_LENGTH = 128

    def __init__(self, cipher: TokenCipher, *, clock: Callable[[], float] = time.time) -> None:
        self._keys = [AESGCM(key) for key in cipher.derived_keys(_CURSOR_KEY_PURPOSE)]
        # Wall-clock seconds: replicas compare a cursor's issue time with their own clock.
        self._clock = clock

    def dumps(self, position: int, binding: str) -> str:
        """A cursor for `position`, valid for the listing and filters named by `binding`."""
        nonce = os.urandom(self._NONCE_BYTES)
        plaintext = self._PLAINTEXT.pack(position, int(self._clock()))
        sealed = self._keys[0].encrypt(nonce, plaintext, self._aad(binding))
        raw = self._VERSION + nonce + sealed
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def loads(self, cursor: str, binding: str) -> int | None:
        """The position, or None for anything this codec did not make for `binding` in
        the last CURSOR_TTL (a forgery, a flipped bit, another listing's or another
        filter's cursor, an expired one)."""
        # Ours are 60 characters: anything much longer is refused before any work.
        raw = None if len(cursor) > self._MAX_LENGTH else _unbase64(cursor)
        if raw is None or not raw.startswith(self._VERSION):
            return None
        nonce = raw[1 : 1 + self._NONCE_BYTES]
        sealed = raw[1 + self._NONCE_BYTES :]
        aad = self._aad(binding)
        for key in self._keys:
            try:
                plaintext = key.decrypt(nonce, sealed, aad)
            except (InvalidTag, ValueError):
                continue
            position, issued_at = self._PLAINTEXT.unpack(plaintext)
            age = self._clock() - issued_at
            if not -self._FUTURE_SKEW_SECONDS <= age < CURSOR_TTL_SECONDS:
                return None
            return int(position)
        return None

    def _aad(self, binding: str) -> bytes:
        return self._VERSION + binding.encode()


def cursor_binding(listing: str, **filters: str | None) -> str:
    """What a cursor is bound to: the listing and its filters, spelt unambiguously."""
    return json.dumps([listing, filters], sort_keys=True, separators=(",", ":"))


def _unbase64(value: str) -> bytes | None:
    """Unpadded url-safe base64 as bytes, or None unless `value` is its one canonical
    spelling (so no two strings open as the same cursor)."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, UnicodeEncodeError):
        return None
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != value:
        return None
    return raw
