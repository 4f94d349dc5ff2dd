"""Whether Pinterest accepts this app's own client credentials: one app-wide state.

A wrong PINTEREST_CLIENT_SECRET (a typo in a deploy, a secret rotated in Pinterest's
console and not here) makes the token endpoint refuse every refresh, whatever the
refresh token. That says nothing about any connection, so none is marked and no webhook
goes out; instead the process enters this state:

- refreshes are not tried, except one per cooldown that finds out whether the credentials
  work again (a request's, the keeper's or the probe's, whichever comes first); callers
  that needed a refresh get 503 `pinterest_client_rejected` with Retry-After;
- the probe (`ClientCredentialsProbe`, run by every `pinauth serve` process, keeper or
  not) makes that try itself when nothing else does, without spending anyone's refresh
  token, so a replica with no refresh demand leaves the state too;
- /readyz reports it;
- one error log line when it starts, one when it ends.

Any answer from the token endpoint that is not a refusal of the client (new tokens, or a
refused grant: Pinterest authenticated the client before it looked at the grant) ends it.

Per process: nothing is stored. Each replica (and each worker of `serve --workers`) enters
the state at its own first refused refresh and leaves it at its own first accepted one;
the credentials are the same everywhere, so they do so within a cooldown of each other. A
process restarted with the right secret starts out accepted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from pinauth.background import BackgroundLoop
from pinauth.errors import PinterestClientRejected, UpstreamError, UpstreamTimeout
from pinauth.pinterest.oauth import PinterestOAuth, TokenRejected

log = logging.getLogger(__name__)

# Seconds between tries of the token endpoint while it refuses the client credentials.
CLIENT_REJECTED_COOLDOWN = 15.0


class ClientCredentials:
    """The state, on an injected monotonic clock (tests move it instead of waiting)."""

    def __init__(
        self, clock: Callable[[], float], *, cooldown: float = CLIENT_REJECTED_COOLDOWN
    ) -> None:
        self._clock = clock
        self._cooldown = cooldown
        self._rejected_at: float | None = None  # on the clock; None while accepted
        self._since: datetime | None = None  # the same moment, for people
        self._next_try = 0.0
        self._refused = 0
        # Set while refused: what the probe waits for.
        self.entered = asyncio.Event()

    @property
    def rejected(self) -> bool:
        return self._rejected_at is not None

    @property
    def rejected_since(self) -> datetime | None:
        return self._since

    def retry_after(self) -> int:
        """Whole seconds until the next try of the token endpoint, at least 1."""
        return max(1, math.ceil(self._next_try - self._clock()))

    def until_next_try(self) -> float:
        """Seconds until the next try of the token endpoint is due (0 if it is)."""
        return max(0.0, self._next_try - self._clock())

    def error(self) -> PinterestClientRejected:
        return PinterestClientRejected(retry_after=self.retry_after())

    def waiting(self) -> bool:
        """Refused, and the next try is not due yet: a token call now would be refused."""
        return self._rejected_at is not None and self._clock() < self._next_try

    def admit(self) -> None:
        """Let a token call go ahead, or raise PinterestClientRejected without one.

        While the credentials are refused, one call per cooldown goes ahead: the try that
        finds out whether they work again.
        """
        if self._rejected_at is None:
            return
        now = self._clock()
        if now < self._next_try:
            self._refused += 1
            raise self.error()
        self._next_try = now + self._cooldown

    def record_rejected(self, *, refresh: bool = True) -> PinterestClientRejected:
        """The token endpoint refused the client credentials: enter (or stay in) the state.

        `refresh`: a token refresh (or login) was refused, and is counted; the probe's
        check is not one."""
        now = self._clock()
        self.entered.set()
        if self._rejected_at is None:
            self._rejected_at = now
            self._since = datetime.now(UTC)
            self._refused = 0
            log.error(
                "Pinterest's token endpoint refuses this app's client credentials: check "
                "PINTEREST_CLIENT_ID and PINTEREST_CLIENT_SECRET. No connection is marked; "
                "token refreshes answer 503 pinterest_client_rejected and are tried again "
                "every %.0f s until the credentials work",
                self._cooldown,
            )
        if refresh:
            self._refused += 1
        self._next_try = max(self._next_try, now + self._cooldown)
        return self.error()

    def record_accepted(self) -> None:
        """The token endpoint authenticated the client: leave the state if in it."""
        if self._rejected_at is None:
            return
        lasted = self._clock() - self._rejected_at
        refused = self._refused
        self.entered.clear()
        self._rejected_at = None
        self._since = None
        self._next_try = 0.0
        self._refused = 0
        # Error level like the start, so an alert on the one finds the other.
        log.error(
            "Pinterest's token endpoint accepts this app's client credentials again after "
            "%.1f s; %d token refreshes were refused meanwhile and no connection was changed",
            lasted,
            refused,
        )


class ClientCredentialsProbe(BackgroundLoop):
    """While the credentials are refused, checks them once per cooldown, spending no
    user's refresh token: a refresh grant with a refresh token that cannot be valid
    (`PinterestOAuth.check_client`).

    Why that tells the client's fault from the grant's: RFC 6749 §5.2 gives them
    different errors, `invalid_client` (client authentication failed; 401 when the client
    authenticated with HTTP Basic, as pinauth does) and `invalid_grant` (400: the refresh
    token is invalid, expired or revoked), and §3.2.1/§6 have the token endpoint
    authenticate the client before it examines the grant. So a 401 means still refused,
    and a 400 on this made-up token means the client got through authentication: the
    state ends. Pinterest answers a failed client authentication with 401 code 2 (see
    pinterest/oauth.py `_client_rejected`); the built-in sandbox checks the client first
    the same way (sandbox/oauth.py), and tests/test_client_rejected.py checks the probe
    against it. An unavailable token endpoint tells nothing: tried again next cooldown.

    Without it, a replica with no refresh demand (idle, or PINAUTH_KEEPER=false) stayed
    in the state, /readyz degraded, after one refused request.
    """

    task_name = "pinauth-client-credentials-probe"

    def __init__(
        self,
        credentials: ClientCredentials,
        check: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__()
        self._credentials = credentials
        self._check = check
        self.checks = 0

    @classmethod
    def of(cls, credentials: ClientCredentials, oauth: PinterestOAuth) -> ClientCredentialsProbe:
        return cls(credentials, oauth.check_client)

    async def _run(self) -> None:
        credentials = self._credentials
        while not self._stopping.is_set():
            if not credentials.rejected:
                await self._until_rejected()
                continue
            await self._pause(credentials.until_next_try())
            if self._stopping.is_set():
                return
            await self.probe()

    async def _until_rejected(self) -> None:
        entered = asyncio.ensure_future(self._credentials.entered.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({entered, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            entered.cancel()
            stopping.cancel()

    async def probe(self) -> None:
        """One check, if the state's next try is due (a request or the keeper may have
        made it meanwhile); ends or prolongs the state by its answer."""
        credentials = self._credentials
        if not credentials.rejected or credentials.waiting():
            return
        credentials.admit()  # due: takes this cooldown's one try
        self.checks += 1
        try:
            await self._check()
        except PinterestClientRejected:
            credentials.record_rejected(refresh=False)
        except TokenRejected:
            credentials.record_accepted()  # the made-up grant refused: the client is fine
        except (UpstreamError, UpstreamTimeout, TimeoutError) as e:
            log.warning("could not check the client credentials: %s", type(e).__name__)
        except Exception:
            log.exception("the client credentials check failed")
