"""Tell a user's agent that the phone side changed: the server's half of the push.

Phone-side changes are written by whichever process serves the phone user (the `phone`
CLI, the web page, SMTP in), so the notifier watches the database rather than the
callers: SQLite's ``PRAGMA data_version`` changes when any other connection commits,
which costs microseconds to ask, so :class:`ChangeFeed` asks it every ``poll`` seconds,
once per server process, for every watcher (this notifier, the web page's live inbox).
When it moved, the notifier compares each connected user's newest phone action with
what it last pushed and sends ``changed`` over that user's agent connections.

Outgoing mail is watched the same way: a new via-desktop message (or a send-now message
whose copy the desktop Sent folder still lacks) pushes ``changed(outgoing)``, so the
agent delivers it at once.

A phone "sync now" request is taken here too: pushed when the user's agent is
connected, otherwise sent as the trigger mail through ``[relay]``. The notifier keeps no
sync state: after a restart, an agent that reconnects syncs anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from imapsync_bridge.errors import BridgeError
from imapsync_bridge.protocol import schema
from imapsync_bridge.server.listener import SyncListener
from imapsync_bridge.server.store_api import SyncStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05

# The newest phone-side change per user; each is a mark that only grows.
_PHONE_ACTIONS = "SELECT user_name, MAX(seq) FROM phone_actions GROUP BY user_name"
_SYNC_REQUESTS = "SELECT user_name FROM sync_requests"
# The newest outgoing message the agent has work for: a queued via-desktop message, or a
# send-now message sent and not yet filed in the desktop Sent folder.
_OUTGOING = (
    "SELECT user_name, MAX(id) FROM outbox WHERE (via_desktop = 1 AND state = 'queued')"
    " OR (state = 'sent' AND filed = 0) GROUP BY user_name"
)
# Whether a phone action is an inbound mail's (SMTP in logs one per delivered message).
_IS_INBOUND = (
    "SELECT m.inbound FROM phone_actions a JOIN messages m"
    " ON m.user_name = a.user_name AND m.msg_key = a.msg_key WHERE a.seq = ?"
)

MailTrigger = Callable[[str], Awaitable[None]]


class ChangeFeed:
    """A counter that grows whenever another connection committed to the database;
    waiters wake on it. One per server process (:func:`.app.serve` owns it)."""

    def __init__(self, database: Path, poll: float = POLL_SECONDS) -> None:
        self.database = database
        self.poll = poll
        self.version = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the current ``data_version`` now (a change right after this call is
        seen), then poll in a task."""
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        baseline = conn.execute("PRAGMA data_version").fetchone()[0]
        self._task = asyncio.create_task(self._run(conn, baseline))

    async def close(self) -> None:
        self.closed = True
        self.wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, seen: int, timeout: float) -> int:
        """The version once it is past ``seen``, or after ``timeout`` (or a
        :meth:`wake`) unchanged."""
        if self.closed:
            await asyncio.sleep(timeout)
        elif self.version == seen:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancel that meets the event being set, and a closing notifier then hangs
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        return self.version

    def wake(self) -> None:
        """Wake every waiter now (a change, or a watcher that is closing)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self, conn: sqlite3.Connection, seen: int) -> None:
        try:
            while True:
                await asyncio.sleep(self.poll)
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != seen:
                    seen = version
                    self.version += 1
                    self.wake()
        finally:
            conn.close()


class ChangeNotifier:
    """Pushes ``changed`` to connected agents; routes sync requests (push or mail)."""

    def __init__(
        self,
        database: Path,
        store: SyncStore,
        sync: SyncListener,
        mail_trigger: MailTrigger | None,
        changes: ChangeFeed,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.database = database
        self.changes = changes
        self.store = store
        self.sync = sync
        self.mail_trigger = mail_trigger
        self.poll = poll
        self._task: asyncio.Task[None] | None = None
        self._pushed: dict[str, int] = {}  # user -> newest phone action already told
        self._outgoing: dict[str, int] = {}  # user -> newest outgoing message already told
        self._unmailable: set[str] = set()  # users whose request could not be mailed (logged)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            self._pushed = dict(conn.execute(_PHONE_ACTIONS).fetchall())
            self._outgoing = dict(conn.execute(_OUTGOING).fetchall())
            version = None
            connected: frozenset[str] = frozenset()
            while True:
                now_version = self.changes.version
                now_connected = self.sync.connected_users()
                if now_version != version or now_connected != connected:
                    version, connected = now_version, now_connected
                    await self._look(conn, connected)
                await self.changes.wait(now_version, self.poll)
        finally:
            conn.close()

    async def _look(self, conn: sqlite3.Connection, connected: frozenset[str]) -> None:
        for user, newest in conn.execute(_PHONE_ACTIONS).fetchall():
            if newest > self._pushed.get(user, 0):
                self._pushed[user] = newest
                if user in connected:
                    inbound = conn.execute(_IS_INBOUND, (newest,)).fetchone()
                    notice = schema.Changed(
                        reason="inbound_mail" if inbound and inbound[0] else "phone_action"
                    )
                    await self.sync.push(user, notice)
        for user, newest in conn.execute(_OUTGOING).fetchall():
            if newest > self._outgoing.get(user, 0):
                self._outgoing[user] = newest
                if user in connected:
                    await self.sync.push(user, schema.Changed(reason="outgoing"))
        for (user,) in conn.execute(_SYNC_REQUESTS).fetchall():
            await self._route_sync_request(user, user in connected)

    async def _route_sync_request(self, user: str, connected: bool) -> None:
        if connected and await self.sync.push(user, schema.Changed(reason="sync_request")):
            await asyncio.to_thread(self.store.take_sync_request, user)
            log.info("%s: sync request pushed to the agent", user)
            return
        if self.mail_trigger is None:
            if user not in self._unmailable:
                self._unmailable.add(user)
                log.warning(
                    "%s: sync request waits: the agent is not connected and no [relay] "
                    "is configured to mail the trigger",
                    user,
                )
            return
        try:
            await self.mail_trigger(user)
        except BridgeError as exc:  # the request stays; the next change tries again
            log.warning("%s: could not mail the trigger: %s", user, exc)
            return
        await asyncio.to_thread(self.store.take_sync_request, user)
        log.info("%s: agent not connected; trigger mail sent", user)
