"""`agent run`: the agent as a service — periodic syncs, push both ways, trigger mail.

One thread runs every sync session, so there is never more than one at a time; what
asks for a sync only adds a *reason* to :class:`Wakeup` and wakes that thread, so
requests arriving while a session runs (IDLE wake-ups, pushes, triggers, the timer)
merge into one following session. Around it:

- the periodic timer (the ``schedule`` package) adds "timer" every ``sync_interval``;
- :class:`~.idle.InboxWatcher` (its own IMAP connection, IDLE) adds the inbox's changes;
- the push link (:mod:`.push`), owned by this thread once connected, brings the
  server's ``changed`` notices, and carries the sessions themselves (no TLS handshake
  per session). While it is up and said nothing, the phone has not changed since the
  last session, so a session starts from the desktop's counts alone and asks the server
  nothing unless the desktop moved;
- with ``idle = false``, "poll" every ``poll_interval`` looks for trigger mail; with
  ``idle = true`` on a server that offers no IDLE the watcher says "no-idle" and the
  poll stands in for IDLE: it looks for trigger mail and, with ``sync_on_change``,
  runs a session (a no-change one costs a round trip), so desktop changes still reach
  the phone within ``poll_interval``.

A session that fails is retried with backoff; the service itself keeps running. SIGTERM
or SIGINT end it after the session in progress (``agent run`` abandons one that takes
more than a few seconds, which the journal makes safe: the next run carries on).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import schedule

from imapsync_bridge.agent.desktop import CatchUp, DesktopSide
from imapsync_bridge.agent.idle import NO_IDLE, IdleTiming, InboxWatcher, known_inbox_flags
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.agent.push import PushConnector, PushTiming
from imapsync_bridge.agent.runner import (
    connect_imap,
    open_desktop,
    open_link,
    open_state,
    outgoing_settings,
    session_lock,
    session_options,
)
from imapsync_bridge.agent.service_file import ServiceFile
from imapsync_bridge.agent.session import SyncSession
from imapsync_bridge.agent.state import AgentState
from imapsync_bridge.agent.trigger import TriggerWatch
from imapsync_bridge.config import AgentConfig
from imapsync_bridge.errors import AuthError, BridgeError, TransientError
from imapsync_bridge.logs import Progress, ProgressFanout
from imapsync_bridge.oauth2 import tokens
from imapsync_bridge.oauth2.tokens import LoginRequired
from imapsync_bridge.protocol import schema
from imapsync_bridge.sdnotify import Notifier
from imapsync_bridge.sync.session import SessionReport

log = logging.getLogger(__name__)

# Reasons that start a sync; IDLE's inbox changes do when sync_on_change is true.
SYNC_REASONS = frozenset({"start", "timer", "phone", "trigger", "retry", "push", "reconnected"})
INBOX_CHANGES = frozenset({"new", "flags", "expunge"})
# A change notice within this long of the last session's start waits for its end, so a
# stream of changes gives a few sessions, not one per change; the first after a quiet
# spell goes at once.
MERGE_WINDOW = 0.25
# Reasons that say nothing changed: such a session does not keep the inbox selected.
ROUTINE_REASONS = frozenset({"timer", "poll"})
# Reasons after which new inbox mail may hold a trigger.
SCAN_REASONS = frozenset({"start", "new", "reconnected", "poll"})
NO_IDLE_POLL = "the server offers no IDLE"  # why the service polls although idle = true
LOGIN_POLL = 2.0  # seconds between looks for a new `agent login` while one is needed


@dataclass(frozen=True)
class ServiceTiming:
    push: PushTiming = field(default_factory=PushTiming)
    idle: IdleTiming = field(default_factory=IdleTiming)
    retry_initial: float = 5.0  # a failed session is retried after this, doubling
    retry_max: float = 300.0


class Wakeup:
    """Reasons to act, added from any thread; a socket pair wakes the service's select."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._reasons: set[str] = set()

    def add(self, reason: str) -> None:
        with self._lock:
            self._reasons.add(reason)
        with contextlib.suppress(BlockingIOError, OSError):
            self._writer.send(b"\0")

    def fileno(self) -> int:
        return self._reader.fileno()

    def take(self) -> set[str]:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._reader.recv(4096):
                pass
        with self._lock:
            reasons, self._reasons = self._reasons, set()
        return reasons

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        timing: ServiceTiming | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.timing = timing or ServiceTiming()
        # systemd (Type=notify): ready once the loop runs, the watchdog pinged from it
        self.notifier = notifier or Notifier.from_environment()
        # a long session pings the watchdog, and shows its counts when run on a terminal
        self.progress = ProgressFanout(self.notifier, Progress())
        self.wake = Wakeup()
        self.state: AgentState  # opened by run(), in the thread that uses it
        self.scheduler = schedule.Scheduler()
        self.scheduler.every(config.sync_interval).seconds.do(self.wake.add, "timer")
        #: Why the service polls the inbox (None: IDLE tells it); `agent status` shows it.
        self._polling: str | None = None
        if not config.idle:
            self._start_polling("idle = false")
        self._handover: queue.SimpleQueue[ServerLink] = queue.SimpleQueue()
        self.connector = PushConnector(self._connect_push, self._handed_over, self.timing.push)
        self.watcher = (
            InboxWatcher(
                lambda: connect_imap(config),
                config.imap.mailbox,
                self.wake.add,
                timing=self.timing.idle,
            )
            if config.idle
            else None
        )
        self.push: ServerLink | None = None
        self._push_since: str | None = None
        self._push_heard = self._push_said = 0.0
        self._push_generation = 0
        self._phone_clean = False  # the push link vouches: no phone change since the last session
        self._imap: ImapMailbox | None = None
        self._desktop: DesktopSide | None = None
        self._triggers: TriggerWatch | None = None
        self._catch_up = CatchUp()  # NOOPs after a session: Dovecot's re-scan off the path
        self._last_triggered: float | None = None  # monotonic time of a triggered sync
        self._trigger_at: float | None = None  # a trigger waits for min_interval
        self._pending: set[str] = set()
        self._failures = 0
        self._retry_at: float | None = None
        #: After a failed OAuth2 refresh: each role's refresh-token stamp then; a new
        #: `agent login` changes it, and the service retries at once (LOGIN_POLL).
        self._login_stamps: dict[str, str | None] = {}
        self._last_started = float("-inf")  # monotonic start of the last session
        self._deferred: set[str] = set()  # sync reasons waiting for MERGE_WINDOW's end
        self._stopping = threading.Event()
        self._started = datetime.now(UTC)
        self._syncs = 0
        self._service_file = ServiceFile(config.state_dir)
        self._instance = ""

    def _start_polling(self, why: str) -> None:
        self._polling = why
        self.scheduler.every(self.config.poll_interval).seconds.do(self.wake.add, "poll")

    def _fall_back_to_polling(self) -> None:
        """The server offers no IDLE: poll every ``poll_interval`` instead (said once)."""
        if self._polling is not None:
            return
        log.warning(
            "the IMAP server offers no IDLE: looking for desktop changes and trigger mail "
            "every %d s (poll_interval) instead",
            self.config.poll_interval,
        )
        self._start_polling(NO_IDLE_POLL)
        self._pending.add("poll")  # look now, not a poll_interval from now

    # -- life cycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end after the session in progress (safe from a signal
        handler; ``agent run`` leaves a session that takes too long, see cli.py)."""
        self._stopping.set()
        self.wake.add("stop")

    def run(self) -> None:
        log.info(
            "agent run: sync every %d s, IMAP IDLE %s, push link to %s:%s",
            self.config.sync_interval,
            "on" if self.config.idle else f"off (trigger poll every {self.config.poll_interval} s)",
            *self.config.server,
        )
        self.state = open_state(self.config)
        self._instance = self.state.agent_instance()
        self.connector.start()
        if self.watcher is not None:
            self.watcher.start()
        self.wake.add("start")
        self.notifier.ready(f"syncing every {self.config.sync_interval} s")
        try:
            while not self._stopping.is_set():
                self._turn()
        finally:
            self._shut_down()
        log.info("agent run stopped")

    def _shut_down(self) -> None:
        self.notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop(timeout=2.0)
        self.connector.stop(timeout=2.0)
        self._drop_push(None)
        self._drop_desktop()
        self._write_service_file(running=False)
        self.state.close()
        self.wake.close()

    # -- one turn of the loop ------------------------------------------------------------
    def _turn(self) -> None:
        readable: list[Any] = [self.wake]
        timeout = self._seconds_to_next_event()
        if self.push is not None:
            readable.append(self.push)
            if self.push.has_buffered():
                timeout = 0.0
        ready, _, _ = select.select(readable, [], [], timeout)
        self.notifier.ping()
        self._pending |= self.wake.take()
        self._take_handed_over()
        if self.push is not None and (self.push in ready or self.push.has_buffered()):
            self._read_push()
        self._keep_push_alive()
        self.scheduler.run_pending()
        self._pending |= self.wake.take()
        self._pending.discard("stop")
        if not self._stopping.is_set():
            self._act()
        self._write_service_file(running=True)

    def _seconds_to_next_event(self) -> float:
        waits = [self.scheduler.idle_seconds or 60.0, 60.0]
        now = time.monotonic()
        if self._deferred:
            waits.append(self._last_started + MERGE_WINDOW - now)
        if (ping := self.notifier.seconds_to_ping()) is not None:
            waits.append(ping)
        for due in (self._retry_at, self._trigger_at, self._catch_up.due()):
            if due is not None:
                waits.append(due - now)
        if self._login_stamps:
            waits.append(LOGIN_POLL)
        if self.push is not None:
            push = self.timing.push
            waits.append(self._push_said + push.heartbeat_every - now)
            waits.append(self._push_heard + push.quiet_limit - now)
        return max(0.0, min(waits))

    def _act(self) -> None:
        if self._login_stamps and self._signed_in_again():
            self._login_stamps = {}
            self._retry_at = time.monotonic()
            if self.watcher is not None:
                self.watcher.retry_now()
        now = time.monotonic()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._pending.add("retry")
        if self._trigger_at is not None and now >= self._trigger_at:
            self._trigger_at = None
            self._pending.add("trigger")
        if NO_IDLE in self._pending:
            self._pending.discard(NO_IDLE)
            self._fall_back_to_polling()
        reasons, self._pending = self._pending, set()
        if self._imap is not None and not reasons:
            try:
                self._catch_up.run_due(self._imap, self.config.imap.mailbox, now)
            except BridgeError as exc:
                log.info("NOOP after a session: %s; reconnecting at the next session", exc)
                self._drop_desktop()
        if not reasons and not self._deferred:
            return
        if "reconnected" in reasons:
            # IDLE had to reconnect: the path may have been broken under the kept
            # connection too, which would only show as a timeout in the next session.
            self._drop_desktop()
        if reasons & SCAN_REASONS and self._scan_for_triggers():
            reasons.add("trigger")
        if "trigger" in reasons and not self._trigger_allowed():
            reasons.discard("trigger")
        wanted = reasons & SYNC_REASONS
        if self.config.sync_on_change:
            wanted |= reasons & INBOX_CHANGES
            if self._polling == NO_IDLE_POLL:  # the poll stands in for IDLE
                wanted |= reasons & {"poll"}
        if (
            wanted
            and self._retry_at is not None
            and wanted <= {"timer", "poll", "push", *INBOX_CHANGES}
        ):
            # A failed session waits for its retry; only a user's request jumps it (not
            # the push link coming back: the failure dropped it, and would again at once).
            return
        wanted |= self._deferred
        if wanted and now - self._last_started < MERGE_WINDOW:
            self._deferred = wanted
            return  # merged into the session due at the window's end
        self._deferred = set()
        if wanted:
            self._last_started = now
            self._sync(wanted)

    # -- trigger mail --------------------------------------------------------------------
    def _scan_for_triggers(self) -> bool:
        """Whether new inbox mail held a valid trigger (now expunged)."""
        try:
            if self._triggers is None:
                imap = self._desktop_side().imap
                self._triggers = TriggerWatch(
                    imap, self.state, self.config.imap.mailbox, self.config.trigger_max_age
                )
            found = self._triggers.scan()
        except BridgeError as exc:
            log.warning("looking for trigger mail: %s", exc)
            self._drop_desktop()
            return False
        if found.accepted:
            log.info("trigger mail: %d valid, expunged", found.accepted)
        return found.accepted > 0

    def _trigger_allowed(self) -> bool:
        """At most one triggered sync per ``min_interval``; a trigger within it waits
        for its end (triggers meanwhile merge into that one)."""
        now = time.monotonic()
        last = self._last_triggered
        if last is not None and now - last < self.config.trigger_min_interval:
            self._trigger_at = last + self.config.trigger_min_interval
            log.info("triggered sync waits %.0f s (min_interval)", self._trigger_at - now)
            return False
        self._last_triggered = now
        return True

    # -- sessions ------------------------------------------------------------------------
    def _sync(self, reasons: set[str]) -> None:
        vouched = self._phone_clean and self.push is not None
        routine = reasons <= ROUTINE_REASONS
        generation = self._push_generation
        try:
            with session_lock(self.config):
                report = self._session_retrying_stale(vouched, routine)
        except BridgeError as exc:
            self._session_failed(exc)
            return
        self._syncs += 1
        self._catch_up.after_session(time.monotonic())
        self._failures = 0
        self._retry_at = None
        # The phone is as the session left it unless the link said otherwise meanwhile.
        self._phone_clean = (
            self.push is not None
            and self._push_generation == generation
            and not self.push.has_buffered()
        )
        if not report.fast_path:
            if self.watcher is not None:  # its echo in IDLE then starts no session
                self.watcher.set_known(known_inbox_flags(self.state.ledger()))
            why = ",".join(sorted(reasons))
            log.info("sync (%s): %s in %.2f s", why, report.summary(), report.seconds)

    def _session_retrying_stale(self, vouched: bool, routine: bool) -> SessionReport:
        """A session; once more at once on fresh connections when a kept one had died
        while the service waited (a server drops idle connections after a while)."""
        reused = self._desktop is not None
        try:
            return self._session(vouched, routine)
        except TransientError as exc:
            if not reused:
                raise
            log.info("a kept connection had gone (%s); reconnecting", exc)
            self._drop_desktop()
            self._drop_push("it failed under a session")
            return self._session(False, routine)

    def _session(self, vouched: bool, routine: bool) -> SessionReport:
        options = session_options(self.config, allow_mass_delete=False)
        desktop = self._desktop_side()
        if self.push is None:
            with open_link(self.config) as link:
                return SyncSession(
                    self.state, desktop, link, options, keep_inbox_selected=not routine,
                    outgoing=outgoing_settings(self.config), progress=self.progress,
                ).run()  # fmt: skip
        report = SyncSession(
            self.state, desktop, self.push, options, phone_vouched=vouched,
            keep_inbox_selected=not routine,
            outgoing=outgoing_settings(self.config), progress=self.progress,
        ).run()  # fmt: skip
        self._push_said = self._push_heard = time.monotonic()
        return report

    def _session_failed(self, exc: BridgeError) -> None:
        self._failures += 1
        delay = min(self.timing.retry_initial * 2 ** (self._failures - 1), self.timing.retry_max)
        if isinstance(exc, AuthError):
            delay = self.timing.retry_max
        if isinstance(exc, LoginRequired):
            self._login_stamps = self._oauth2_stamps()
        self._retry_at = time.monotonic() + delay
        self._phone_clean = False
        self.state.set_many({"last_result": "failed", "last_error": str(exc)})
        log.warning("sync failed: %s; retrying in %.0f s", exc, delay)
        # Whatever the session's connections were doing, start them afresh.
        self._drop_desktop()
        if self.push is not None:
            self._drop_push("the session on it failed")

    def _oauth2_stamps(self) -> dict[str, str | None]:
        servers = (self.config.imap.server, self.config.smtp)
        found = {}
        for server in servers:
            if server is not None and server.auth == "oauth2":
                with contextlib.suppress(BridgeError, OSError):
                    found[server.role] = tokens.store_of(server).stamp()
        return found

    def _signed_in_again(self) -> bool:
        now = self._oauth2_stamps()
        if now == self._login_stamps:
            return False
        log.info("a new OAuth2 sign-in: retrying now")
        return True

    def _desktop_side(self) -> DesktopSide:
        renew_at = self._imap.renew_at if self._imap is not None else None
        if renew_at is not None and time.time() >= renew_at:  # its OAuth2 token is used up
            self._drop_desktop()
        if self._desktop is None:
            self._imap = connect_imap(self.config)
            self._desktop = open_desktop(self.config, self._imap, self.state.get("sync_phrase"))
        return self._desktop

    def _drop_desktop(self) -> None:
        """Cut the kept IMAP connection without a LOGOUT: it is dropped because it
        failed or may have, and a LOGOUT on a dead path would wait for its timeout."""
        if self._imap is not None:
            with contextlib.suppress(Exception):
                self._imap.abort()
                self._imap.close()
        self._imap = self._desktop = self._triggers = None

    # -- the push link -------------------------------------------------------------------
    def _connect_push(self) -> ServerLink:
        """In the connector's thread: a new link, greeted (the server registers it)."""
        link = open_link(self.config)
        try:
            link.hello(self._instance)
        except BaseException:
            link.close()
            raise
        return link

    def _handed_over(self, link: ServerLink) -> None:
        self._handover.put(link)
        self.wake.add("push")

    def _take_handed_over(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                link = self._handover.get_nowait()
                if self._stopping.is_set():
                    link.close()
                    continue
                self._drop_push(None)
                self.push = link
                self._push_generation += 1
                self._push_heard = self._push_said = time.monotonic()
                self._push_since = datetime.now(UTC).isoformat(timespec="seconds")
                self._phone_clean = False  # what changed while it was down: sync
                log.info("push link to the server is up")

    def _read_push(self) -> None:
        assert self.push is not None
        try:
            while self.push is not None:
                notice = self.push.wait_notice(0.0)
                if notice is None:
                    return
                self._push_heard = time.monotonic()
                if isinstance(notice, schema.Changed):
                    log.info("server: changed (%s)", notice.reason)
                    self._phone_clean = False
                    self._pending.add("phone")
        except BridgeError as exc:
            self._drop_push(str(exc))

    def _keep_push_alive(self) -> None:
        if self.push is None:
            return
        now = time.monotonic()
        if now - self._push_heard > self.timing.push.quiet_limit:
            self._drop_push(f"nothing heard for {now - self._push_heard:.0f} s")
            return
        if now - self._push_said >= self.timing.push.heartbeat_every:
            try:
                self.push.send(schema.Heartbeat())
            except BridgeError as exc:
                self._drop_push(str(exc))
                return
            self._push_said = now

    def _drop_push(self, reason: str | None) -> None:
        if self.push is None:
            return
        self.push.close()
        self.push = None
        self._push_since = None
        self._phone_clean = False
        if reason is not None:
            log.warning("push link to the server lost: %s; reconnecting", reason)
            if not self._stopping.is_set():
                self.connector.reconnect()

    # -- what `agent status` shows -------------------------------------------------------
    def _write_service_file(self, running: bool) -> None:
        next_run = self.scheduler.next_run
        shown = {
            "pid": os.getpid(),
            "running": running,
            "started": self._started.isoformat(timespec="seconds"),
            "connections": {
                "imap_idle": self.watcher.status() if self.watcher is not None else None,
                "poll": (
                    {"every": self.config.poll_interval, "why": self._polling}
                    if self._polling is not None
                    else None
                ),
                "push": {
                    "state": "connected" if self.push is not None else "connecting",
                    "since": self._push_since,
                    "last_error": self.connector.last_error,
                },
            },
            # schedule keeps naive local times
            "next_sync": (
                next_run.astimezone(UTC).isoformat(timespec="seconds")
                if running and next_run is not None
                else None
            ),
            "syncs": self._syncs,  # sessions run (bench/service.py waits on it)
        }
        self._service_file.publish(shown)
