"""The login flow and browser sessions: what the /auth routes do, minus the HTTP."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urljoin, urlsplit

from cachetools import LRUCache
from itsdangerous import BadSignature, SignatureExpired
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from pinauth.cache import MAX_ENTRIES, ConnectionCache
from pinauth.clientstate import ClientCredentials
from pinauth.connect import CONNECT_RESULT_PARAMETER, connect_session_hash, new_connect_result
from pinauth.crypto import CookieSigner, TokenCipher, digest, state_serializer
from pinauth.errors import (
    AccessDenied,
    AuthorizationFailed,
    InvalidConnectSession,
    InvalidRequest,
    InvalidState,
    PinterestClientRejected,
)
from pinauth.frontend import PublicOrigin, with_error, with_parameter
from pinauth.models import AuthSession, Connection, ConnectionStatus, ConnectResult, LoginState
from pinauth.pinterest.api import PinterestAccount, PinterestAPI
from pinauth.pinterest.oauth import PinterestOAuth, TokenRejected, TokenSet
from pinauth.repository import (
    ConnectionRepository,
    ConnectResultRepository,
    ConnectSessionRepository,
    LoginStateRepository,
    SessionRepository,
)
from pinauth.schedule import Schedule
from pinauth.settings import Settings
from pinauth.tokens import apply_token_set
from pinauth.webhooks import EventType, record_event

log = logging.getLogger(__name__)

# Each concurrent login of one connection that loses a race tries again; with N of them
# at once, N rounds store them all.
LOGIN_STORE_ATTEMPTS = 10
_UNSAFE_IN_PATH = re.compile(r"[\\\x00-\x1f\x7f]")
# It rides in the signed state to Pinterest and back into a Location header.
MAX_RETURN_TO_LENGTH = 2048
# A state pinauth issues is a few hundred characters; longer ones are not worth decoding.
MAX_STATE_LENGTH = 4 * MAX_RETURN_TO_LENGTH


# What a browser takes for "." and ".." in a path (the URL Standard's single- and
# double-dot segments), compared in lower case.
_SINGLE_DOT = frozenset({".", "%2e"})
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


def _without_dot_segments(url: str) -> str:
    """The path of `url` (one starting with "/") as a browser resolves it: "." and ".."
    segments, percent-encoded ones included, removed as the URL Standard does.

    "/.//evil.com" and "/%2e%2e//evil.com" become "//evil.com".
    """
    path = url.split("?", 1)[0].split("#", 1)[0]
    segments = path[1:].split("/")
    kept: list[str] = []
    for position, segment in enumerate(segments, start=1):
        last = position == len(segments)
        lowered = segment.lower()
        if lowered in _DOUBLE_DOT:
            if kept:
                kept.pop()
            if last:
                kept.append("")
        elif lowered in _SINGLE_DOT:
            if last:
                kept.append("")
        else:
            kept.append(segment)
    return "/" + "/".join(kept)


SESSION_COOKIE = "pinauth_session"
LOGIN_COOKIE = "pinauth_login"
# A cookie so named is accepted by a browser only if it is Secure, has Path=/ and no
# Domain: no sibling subdomain can set (toss) one that pinauth would read.
HOST_PREFIX = "__Host-"


@dataclass(frozen=True, slots=True)
class CookieNames:
    """The names of the session and login cookies: `__Host-` ones whenever cookies are
    Secure (pinauth served over https), plain ones otherwise (http://localhost)."""

    session: str
    login: str

    @classmethod
    def of(cls, settings: Settings) -> CookieNames:
        prefix = HOST_PREFIX if settings.secure_cookies else ""
        return cls(session=prefix + SESSION_COOKIE, login=prefix + LOGIN_COOKIE)


class _StatePayload(BaseModel):
    nonce_hash: str
    return_to: str


@dataclass(frozen=True, slots=True)
class LoginStart:
    authorize_url: str
    nonce: str  # goes into the browser's login cookie, binding the state to it


@dataclass(frozen=True, slots=True)
class LoginResult:
    # None for a connect session's login: that browser gets no session (see connect.py).
    session_cookie: str | None
    redirect_to: str


class AuthService:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        oauth: PinterestOAuth,
        api: PinterestAPI,
        cipher: TokenCipher,
        cache: ConnectionCache,
        client_credentials: ClientCredentials | None = None,
    ) -> None:
        self._settings = settings
        # The app-wide refused-credentials state (clientstate.py), shared with the
        # TokenManager: a code exchange finds out about the credentials as a refresh does.
        if client_credentials is None:
            client_credentials = ClientCredentials(time.monotonic)
        self._client_credentials = client_credentials
        self._schedule = Schedule.of(settings)
        self._cache = cache
        self._loading_sessions: dict[str, asyncio.Future[Connection | None]] = {}
        self._verified_cookies: LRUCache[str, str] = LRUCache(MAX_ENTRIES)
        self._sessionmaker = sessionmaker
        self._oauth = oauth
        self._api = api
        self._cipher = cipher
        self._states = state_serializer(settings.secret_key.get_secret_value())
        self.session_signer = CookieSigner(settings.secret_key.get_secret_value(), "session")
        self.cookie_names = CookieNames.of(settings)
        origins = set(settings.cors_origins)
        for url in (settings.frontend_url, settings.redirect_uri):
            parts = urlsplit(url)
            if parts.scheme and parts.netloc:
                origins.add(f"{parts.scheme}://{parts.netloc}")
        self._trusted_origins = frozenset(origins)
        self.public_origin = PublicOrigin(settings)
        # A path in return_to is the frontend's when the frontend lives elsewhere.
        frontend = urlsplit(settings.frontend_url)
        self._frontend_base = settings.frontend_url if frontend.scheme and frontend.netloc else None

    # --- return_to -------------------------------------------------------------------

    def safe_return_to(self, return_to: str | None) -> str:
        """`return_to` if it stays on a trusted site, else the configured frontend URL.

        A path is the frontend's: resolved against PINAUTH_FRONTEND_URL when that is
        absolute, so `return_to=/settings` lands on the frontend's /settings.
        """
        if return_to and self.is_trusted_destination(return_to):
            if self._frontend_base is not None and return_to.startswith("/"):
                return urljoin(self._frontend_base, return_to)
            return return_to
        return self._settings.frontend_url

    def failed_login_destination(self, state: str | None, code: str) -> str:
        """Where a failed callback sends the browser: the login's return_to (or the
        frontend URL), with `pinauth_error=<code>` for the frontend to show.

        The state's return_to is used only if pinauth signed it, however old, and is
        checked again: it was confined when the login started, under the settings then.
        """
        destination = self._settings.frontend_url
        if state and len(state) <= MAX_STATE_LENGTH:
            try:
                payload = _StatePayload.model_validate(self._states.loads(state))
            except (BadSignature, ValidationError):
                pass
            else:
                if self.is_trusted_destination(payload.return_to):
                    destination = payload.return_to
        return with_error(destination, code)

    def is_trusted_destination(self, url: str) -> bool:
        if len(url) > MAX_RETURN_TO_LENGTH or _UNSAFE_IN_PATH.search(url):
            return False
        # Browsers treat "//host" (and "/\host", excluded above) as another site, and so
        # does whatever later takes the path of "https://app.example.com//evil.com" (or
        # of "/.//evil.com", which a browser resolves to that) for one of its own.
        if url.startswith("/"):
            return not url.startswith("//") and not _without_dot_segments(url).startswith("//")
        try:
            parts = urlsplit(url)
        except ValueError:  # "https://[", "https://[host]", hosts that NFKC would change
            return False
        origin = f"{parts.scheme}://{parts.netloc}"
        return (
            parts.scheme in ("http", "https")
            and bool(parts.netloc)
            and "@" not in parts.netloc
            and origin in self.trusted_origins()
            and not _without_dot_segments(parts.path or "/").startswith("//")
        )

    def trusted_origins(self) -> frozenset[str]:
        """Origins allowed to act on a session: the CORS list, the frontend's, pinauth's."""
        return self._trusted_origins

    # --- login -----------------------------------------------------------------------

    async def start_login(
        self, return_to: str | None, connect_session: str | None = None
    ) -> LoginStart:
        """Record a pending login; with a connect session, burn it and bind its end user.

        An unusable connect session is refused here, before the browser meets Pinterest.
        """
        nonce = secrets.token_urlsafe(32)
        nonce_hash = digest(nonce)
        now = datetime.now(UTC)
        end_user_id = None
        async with self._sessionmaker() as db, db.begin():
            if connect_session is not None:
                grant = await ConnectSessionRepository(db).consume(
                    connect_session_hash(connect_session), now
                )
                if grant is None:
                    raise InvalidConnectSession()
                end_user_id = grant.end_user_id
                return_to = grant.return_to or return_to
            states = LoginStateRepository(db)
            await states.delete_expired(now)
            await states.add(
                LoginState(
                    nonce_hash=nonce_hash,
                    expires_at=now + timedelta(seconds=self._settings.state_max_age_seconds),
                    end_user_id=end_user_id,
                )
            )
            await states.evict_oldest(keep=self._settings.max_pending_logins)
        state = self._states.dumps(
            _StatePayload(
                nonce_hash=nonce_hash, return_to=self.safe_return_to(return_to)
            ).model_dump()
        )
        return LoginStart(authorize_url=self._oauth.authorize_url(state), nonce=nonce)

    async def _consume_state(
        self, state: str | None, nonce: str | None
    ) -> tuple[_StatePayload, str | None]:
        """Verify the state completely before anything else happens; burn it on success."""
        if not state:
            raise InvalidState("The callback has no state parameter; start again from /auth/login.")
        try:
            raw = self._states.loads(state, max_age=self._settings.state_max_age_seconds)
            payload = _StatePayload.model_validate(raw)
        except SignatureExpired:
            raise InvalidState("The login took too long; start again from /auth/login.") from None
        except (BadSignature, ValidationError):
            raise InvalidState("The state parameter is not one pinauth issued.") from None
        if not nonce or not secrets.compare_digest(digest(nonce), payload.nonce_hash):
            raise InvalidState(
                "This login was started in another browser (or its cookie was blocked); "
                "start again from /auth/login."
            )
        async with self._sessionmaker() as db, db.begin():
            pending = await LoginStateRepository(db).consume(payload.nonce_hash, datetime.now(UTC))
        if pending is None:
            raise InvalidState("This login was already completed or has expired.")
        return payload, pending.end_user_id

    async def complete_login(
        self,
        *,
        code: str | None,
        state: str | None,
        error: str | None,
        nonce: str | None,
        previous_session_cookie: str | None,
    ) -> LoginResult:
        if error:
            # Burn the state if it is valid, so it cannot be replayed with a code later.
            try:
                await self._consume_state(state, nonce)
            except InvalidState:
                pass
            if error == "access_denied":
                raise AccessDenied()
            raise AuthorizationFailed(f"Pinterest ended the authorization with error {error!r}.")
        payload, end_user_id = await self._consume_state(state, nonce)
        if not code:
            raise InvalidRequest("The callback has no code parameter.")
        try:
            tokens = await self._oauth.exchange_code(code)
        except PinterestClientRejected:
            # The app's credentials, not this login's code: enter the state (its error
            # line, /readyz degraded) and answer with its Retry-After.
            raise self._client_credentials.record_rejected() from None
        except TokenRejected:
            # A refused code: Pinterest authenticated the client before it looked at it.
            self._client_credentials.record_accepted()
            raise
        self._client_credentials.record_accepted()
        account = await self._api.user_account(tokens.access_token)
        if end_user_id is not None:
            # A connect session's login: pending until the app's backend confirms it, and
            # this browser's own session (if any) stays exactly as it was.
            result = await self._store_connect_login(account, tokens, end_user_id)
            log.info("connect session login as Pinterest user %s awaits confirmation", account.id)
            return LoginResult(
                session_cookie=None,
                redirect_to=with_parameter(payload.return_to, CONNECT_RESULT_PARAMETER, result),
            )
        session_id = secrets.token_urlsafe(32)
        connection_id = await self._store_login(
            account, tokens, end_user_id, digest(session_id), previous_session_cookie
        )
        log.info("connection %s logged in as Pinterest user %s", connection_id, account.id)
        return LoginResult(
            session_cookie=self.session_signer.sign(session_id), redirect_to=payload.return_to
        )

    async def _store_login(
        self,
        account: PinterestAccount,
        tokens: TokenSet,
        end_user_id: str | None,
        session_hash: str,
        previous_session_cookie: str | None,
    ) -> str:
        # A new session id at every login, and the old one dies: no fixation.
        previous = self._session_hash(previous_session_cookie)
        for attempt in range(LOGIN_STORE_ATTEMPTS):
            try:
                async with self._sessionmaker() as db, db.begin():
                    connection = await self._upsert_connection(db, account, tokens, end_user_id)
                    sessions = SessionRepository(db)
                    if previous is not None:
                        await sessions.delete(previous)
                    now = datetime.now(UTC)
                    # Logins are rare next to requests: a fine moment to sweep (indexed).
                    await sessions.delete_expired(now)
                    await sessions.add(
                        AuthSession(
                            id_hash=session_hash,
                            connection_id=connection.id,
                            expires_at=now
                            + timedelta(seconds=self._settings.session_max_age_seconds),
                        )
                    )
                    evicted = await sessions.evict_oldest(
                        connection.id, keep=self._settings.max_sessions_per_connection
                    )
            except (IntegrityError, StaleDataError):
                # Logins of one connection finished together: the first insert or update
                # wins, the others read the row again and update it in turn. The tokens
                # just received must not be dropped for losing a race.
                if attempt == LOGIN_STORE_ATTEMPTS - 1:
                    raise
                continue
            # The renewed row (a higher version) replaces a cached reauthorization_required
            # one now, not when the cache entry expires.
            self._cache.remember_connection(connection)
            # Forgotten after the commit, so a reload starting later cannot cache an ended
            # session again (and one already running is older than the forgetting).
            for ended in (*evicted, *([previous] if previous is not None else [])):
                self._cache.forget_session(ended)
            return connection.public_id
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _store_connect_login(
        self, account: PinterestAccount, tokens: TokenSet, end_user_id: str
    ) -> str:
        """Record a connect session's login for the backend to confirm; the one-time result.

        Nothing anyone uses changes here. A new (end user, account) pair is inserted
        pending; a pending row of the pair (an earlier unconfirmed attempt, which nothing
        serves) takes the new tokens; an existing connection keeps serving its old tokens
        while the new ones wait, encrypted, in the result.
        """
        result = new_connect_result()
        ttl = timedelta(seconds=self._settings.connect_result_ttl_seconds)
        scopes = ",".join(tokens.scopes if tokens.scopes is not None else self._settings.scopes)
        for attempt in range(LOGIN_STORE_ATTEMPTS):
            try:
                async with self._sessionmaker() as db, db.begin():
                    connections = ConnectionRepository(db)
                    pending = ConnectResult(
                        result_hash=digest(result),
                        end_user_id=end_user_id,
                        expires_at=datetime.now(UTC) + ttl,
                    )
                    connection = await connections.get_by_owner(end_user_id, account.id)
                    if connection is None:
                        connection = Connection(
                            end_user_id=end_user_id,
                            pinterest_user_id=account.id,
                            username=account.username,
                            scopes=scopes,
                            refresh_token_encrypted=None,
                            refresh_token_expires_at=None,
                        )
                        apply_token_set(connection, tokens, self._cipher)
                        connection.status = ConnectionStatus.PENDING
                        await connections.add(connection)
                    elif connection.status is ConnectionStatus.PENDING:
                        connection.username = account.username
                        connection.scopes = scopes
                        connection.refresh_token_encrypted = None
                        connection.refresh_token_expires_at = None
                        apply_token_set(connection, tokens, self._cipher)
                        connection.status = ConnectionStatus.PENDING
                        await db.flush()
                    else:
                        pending.username = account.username
                        pending.scopes = scopes
                        pending.access_token_encrypted = self._cipher.encrypt(tokens.access_token)
                        pending.access_token_expires_at = tokens.access_token_expires_at
                        if tokens.refresh_token is not None:
                            pending.refresh_token_encrypted = self._cipher.encrypt(
                                tokens.refresh_token
                            )
                            pending.refresh_token_expires_at = tokens.refresh_token_expires_at
                    pending.connection_id = connection.id
                    await ConnectResultRepository(db).add(pending)
            except (IntegrityError, StaleDataError):
                # Two attempts of one pair finished together: the first insert wins, the
                # others read the (pending) row again and renew it, each with its result.
                if attempt == LOGIN_STORE_ATTEMPTS - 1:
                    raise
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _upsert_connection(
        self,
        db: AsyncSession,
        account: PinterestAccount,
        tokens: TokenSet,
        end_user_id: str | None,
    ) -> Connection:
        """The (end user, Pinterest account) connection, created or renewed in place."""
        connections = ConnectionRepository(db)
        connection = await connections.get_by_owner(end_user_id, account.id)
        if connection is None:
            connection = Connection(
                end_user_id=end_user_id,
                pinterest_user_id=account.id,
                username=account.username,
                scopes=",".join(tokens.scopes or self._settings.scopes),
                refresh_token_encrypted=None,
                refresh_token_expires_at=None,
            )
            apply_token_set(connection, tokens, self._cipher)
            await connections.add(connection)
            await record_event(db, EventType.CREATED, connection, schedule=self._schedule)
            return connection
        was_usable = connection.status is ConnectionStatus.ACTIVE
        connection.username = account.username
        # A new login's refresh token replaces the old one even if Pinterest sent none.
        connection.refresh_token_encrypted = None
        connection.refresh_token_expires_at = None
        if tokens.scopes is None:
            connection.scopes = ",".join(self._settings.scopes)
        apply_token_set(connection, tokens, self._cipher)
        await db.flush()
        # A connection that needed a new login and got one has recovered: the app may
        # have told its user to reconnect, and now can stop.
        await record_event(
            db,
            EventType.UPDATED if was_usable else EventType.RECOVERED,
            connection,
            schedule=self._schedule,
        )
        return connection

    # --- sessions --------------------------------------------------------------------

    def _session_hash(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        # Verifying the signature and hashing cost two HMAC/SHA-256 rounds per request;
        # only cookies that verified are remembered, so forgeries cannot fill this.
        known = self._verified_cookies.get(cookie)
        if known is not None:
            return known
        session_id = self.session_signer.unsign(cookie)
        if not session_id:
            return None
        session_hash = self._verified_cookies[cookie] = digest(session_id)
        return session_hash

    async def connection_for_session(self, cookie: str | None) -> Connection | None:
        """The session's connection: from the cache on the hot path, else the database."""
        session_hash = self._session_hash(cookie)
        if session_hash is None:
            return None
        cached = self._cache.connection_for_session(session_hash)
        if cached is not None:
            return cached
        # When a cached entry expires, every request of that browser in flight misses
        # at once; one database read serves them all.
        loading = self._loading_sessions.get(session_hash)
        if loading is None:
            loading = asyncio.ensure_future(self._load_session(session_hash))
            self._loading_sessions[session_hash] = loading
            loading.add_done_callback(lambda _: self._loading_sessions.pop(session_hash, None))
        return await asyncio.shield(loading)

    async def _load_session(self, session_hash: str) -> Connection | None:
        generation = self._cache.generation()
        async with self._sessionmaker() as db:
            session = await SessionRepository(db).get_active(session_hash, datetime.now(UTC))
        if session is None:
            return None
        # Not cached if a logout or disconnect happened meanwhile: the row just read may
        # be the one it deleted.
        self._cache.remember_session(session_hash, session.connection, generation)
        return session.connection

    async def logout(self, cookie: str | None) -> None:
        session_hash = self._session_hash(cookie)
        if session_hash is None:
            return
        async with self._sessionmaker() as db, db.begin():
            await SessionRepository(db).delete(session_hash)
        # After the commit, so that any load that could still have read the row is older
        # than the forgetting, and cannot cache what it read.
        self._cache.forget_session(session_hash)
