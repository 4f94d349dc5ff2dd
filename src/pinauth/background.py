"""Background loops (purger, keeper, cache revalidation): start, stop between passes."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """Runs `_run` as a task of its own until stopped.

    `stop` lets the pass under way finish rather than cancelling it: cancelling a database
    call midway leaves its driver thread calling back into a loop that is closing, and a
    refresh's bookkeeping half done.
    """

    task_name = "pinauth-background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    def request_stop(self) -> None:
        """Start no more passes; `stop` then waits for the one under way."""
        self._stopping.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self.request_stop()
            await task

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or until a stop is requested, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _run(self) -> None:
        raise NotImplementedError
