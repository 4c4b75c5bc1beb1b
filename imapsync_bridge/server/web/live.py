"""Live inbox updates: one watcher of the store per process, one event stream per page.

Like :mod:`..notify`, the feed asks SQLite's ``PRAGMA data_version`` (it moves when any
other connection commits: SMTP in, the sync listener, the ``phone`` CLI, this page) every
:data:`POLL_SECONDS` on a read-only connection of its own; each open page's stream then
re-reads its user's listing and sends ``event: mailbox`` only when that user's inbox,
trash, outbox or last sync changed. A comment line every :data:`KEEPALIVE_SECONDS`
keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0


class ChangeFeed:
    """A counter that grows whenever the database changed; waiters wake on it."""

    def __init__(self, database: Path, poll: float = POLL_SECONDS) -> None:
        self.database = database
        self.poll = poll
        self.version = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self.closed = True
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, seen: int, timeout: float) -> int:
        """The version once it is past ``seen`` (or after ``timeout``, unchanged)."""
        if self.version == seen and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            seen = None
            while True:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen is not None and version != seen:
                    self._bump()
                seen = version
                await asyncio.sleep(self.poll)
        finally:
            conn.close()
