"""Whether Pinterest accepts this app's own client credentials: one app-wide state.

A wrong PINTEREST_CLIENT_SECRET (a typo in a deploy, a secret rotated in Pinterest's
console and not here) makes the token endpoint refuse every refresh, whatever the
refresh token. That says nothing about any connection, so none is marked and no webhook
goes out; instead the process enters this state:

- refreshes are not tried, except one per cooldown that finds out whether the credentials
  work again (a request's or the keeper's, whichever comes first); callers that needed a
  refresh get 503 `pinterest_client_rejected` with Retry-After;
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

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

from pinauth.errors import PinterestClientRejected

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

    @property
    def rejected(self) -> bool:
        return self._rejected_at is not None

    @property
    def rejected_since(self) -> datetime | None:
        return self._since

    def retry_after(self) -> int:
        """Whole seconds until the next try of the token endpoint, at least 1."""
        return max(1, math.ceil(self._next_try - self._clock()))

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

    def record_rejected(self) -> PinterestClientRejected:
        """The token endpoint refused the client credentials: enter (or stay in) the state."""
        now = self._clock()
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
        self._refused += 1
        self._next_try = max(self._next_try, now + self._cooldown)
        return self.error()

    def record_accepted(self) -> None:
        """The token endpoint authenticated the client: leave the state if in it."""
        if self._rejected_at is None:
            return
        lasted = self._clock() - self._rejected_at
        refused = self._refused
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
