"""Token encryption at rest and the signing of values handed to browsers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
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


class CursorCodec:
    """Opaque, tamper-proof pagination cursors around an integer position (encrypted, so
    the position, a database key, is not readable from outside)."""

    def __init__(self, cipher: TokenCipher) -> None:
        self._cipher = cipher

    def dumps(self, position: int) -> str:
        return self._cipher.encrypt(str(position))

    def loads(self, cursor: str) -> int | None:
        """The position, or None for anything this codec did not make."""
        try:
            return int(self._cipher.decrypt(cursor))
        except (TokenDecryptionError, ValueError):
            return None
