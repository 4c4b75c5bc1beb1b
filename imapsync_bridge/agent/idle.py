"""Desktop→phone push: watch the inbox with IMAP IDLE and say when it changed.

:class:`InboxWatcher` keeps its own IMAP connection (``agent run`` uses another one for
syncs) in one daemon thread. It EXAMINEs the mailbox (read-only: a watcher never needs to
change anything), IDLEs, and calls ``on_change(reason)``:

``"new"``          an untagged EXISTS (mail arrived)
``"flags"``        an untagged FETCH (a flag changed, also by our own sync connection);
                   not when every FETCH of the batch names a UID whose \\Seen/\\Flagged
                   equal what the last session left (:meth:`InboxWatcher.set_known`):
                   that is the echo of the agent's own STORE, or a change that
                   changes nothing the phone shows, and a session would find nothing
``"expunge"``      an untagged EXPUNGE (or VANISHED)
``"reconnected"``  once after every (re)connect, first connect included, as soon as IDLE
                   runs: what happened while we were not watching is unknown, so IDLE is
                   only a hint from here on and the caller runs a normal sync.
``"no-idle"``      once, when the server offers no IDLE: the watcher ends and the caller
                   polls instead.

Each reason is reported once per batch of lines that arrived together (1,000 FETCHes for
one "mark all read" make one ``"flags"``); nothing is delayed or debounced over time, the
service merges requests. ``on_change`` runs on the watcher thread with no lock held; it
must be quick (queue a request), and its exceptions are logged and ignored.

Why these intervals (:class:`IdleTiming`, all shortened by tests):

- **Liveness probe, ``probe_after`` = 30 s, ``reply_timeout`` = 15 s.** A path that
  silently stops forwarding (a NAT box that forgot us after sleep or a network change, a
  proxy that keeps ACKing) looks exactly like a quiet mailbox, and TCP keepalive cannot see
  it while something still ACKs. So when the server has sent nothing for ``probe_after``
  seconds the watcher ends IDLE with DONE and demands the tagged OK within
  ``reply_timeout``, then IDLEs again. A dead connection is noticed within 30 + 1 + 15 =
  46 s (< 1 min); a healthy answer takes milliseconds, and 15 s leaves room for a slow VPN
  or a loaded server without false alarms. The same DONE/IDLE re-issues IDLE every 30 s in
  a quiet mailbox, far inside every server's limit (RFC 2177: 29 min; Exchange Online
  stops pushing after ~10 min) and NAT idle timers. Cost: two tiny round trips per 30 s.
- **``renew_after`` = 300 s.** A server that keeps talking (Dovecot's "* OK Still here",
  a busy mailbox) never triggers the probe; IDLE is still re-issued every 5 min.
- **``check_interval`` = 1 s, ``clock_jump`` = 5 s.** Each wake-up compares how far the
  wall clock and the monotonic clock moved (the monotonic one stands still while the
  machine sleeps): a jump of 5 s or more means we slept or the clock was stepped, and the
  probe runs at once instead of up to 30 s later. One ``select()`` per second costs
  microseconds; :meth:`InboxWatcher.stop` does not wait for it (a wake-up socket).
- **TCP keepalive 60 s / 20 s / 3** (where the platform lets us set it): the kernel's own
  backstop for a peer that vanished without a FIN.
- **Reconnect backoff, ``backoff_initial`` = 1 s doubling to ``backoff_max`` = 60 s**, each
  wait drawn from [½, 1] of that ("equal jitter": never two attempts close together, and
  agents cut off together do not come back in step). The count restarts only once a probe
  succeeded on the new connection, so a server that accepts and drops at once still sees
  growing waits. **``auth_backoff`` = 900 s** (7.5–15 min) after a refused login, and after
  other refusals that do not go away by themselves (EXAMINE refused, bad configuration):
  a password does not fix itself, and a corporate directory locks an account after a few
  failed logins. All waits end at once on :meth:`InboxWatcher.stop`, and on
  :meth:`InboxWatcher.retry_now` (the service calls it after a new ``agent login``).
- **OAuth2 renewal.** A connection that logged in with an OAuth2 access token says when
  that token is used up (``renew_at``, before it expires); the watcher then leaves IDLE,
  logs out and connects again with a fresh token (Exchange Online ends a session whose
  token expired). The new connection reports ``"reconnected"`` like any other.

A server without IDLE gets no push: the watcher reports the state ``"unsupported"``,
calls ``on_change("no-idle")`` and ends; the service then polls every ``poll_interval``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception

from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.imap_idle import FlagNotice
from imapsync_bridge.errors import AuthError, BridgeError, ConfigError, ImapError
from imapsync_bridge.model import Flags, LedgerEntry, Where

log = logging.getLogger(__name__)

NEW = "new"
FLAGS = "flags"
EXPUNGE = "expunge"
RECONNECTED = "reconnected"
NO_IDLE = "no-idle"  # once, when the server turns out to offer no IDLE: poll instead

#: Untagged response type → reason, in the order reasons are reported within a batch.
_REASONS = (("EXISTS", NEW), ("FETCH", FLAGS), ("EXPUNGE", EXPUNGE), ("VANISHED", EXPUNGE))
#: Failures that retrying soon does not cure: the long wait.
_LASTING = (AuthError, ConfigError, ImapError)

#: The wall clock, compared against time.monotonic() to notice sleep/resume (tests move it).
_wall_clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class IdleTiming:
    """The watcher's intervals in seconds (the module docstring says why these)."""

    probe_after: float = 30.0
    reply_timeout: float = 15.0
    renew_after: float = 300.0
    check_interval: float = 1.0
    clock_jump: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    auth_backoff: float = 900.0
    keepalive: tuple[int, int, int] = (60, 20, 3)  # idle, interval, probes

    def __post_init__(self) -> None:
        numbers = {k: v for k, v in vars(self).items() if k != "keepalive"}
        bad = [k for k, v in numbers.items() if not v > 0]
        if bad or min(self.keepalive) < 1:
            raise ValueError(f"IdleTiming values must be positive: {bad or ['keepalive']}")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("IdleTiming: backoff_max must be >= backoff_initial")


class InboxWatcher:
    """Watches one mailbox with IDLE on its own connection in a daemon thread.

    *connect* returns a logged-in :class:`ImapMailbox` (agent/runner.py ``connect_imap``);
    it is called again for every reconnect, from the watcher thread. Status for
    ``agent status``: :attr:`state` (``"stopped"``, ``"connecting"``, ``"idle"``,
    ``"backoff"``, ``"unsupported"``), :attr:`connected_since`, :attr:`last_error`,
    :attr:`reconnects`, :attr:`probes`, or all of them at once from :meth:`status`.
    """

    def __init__(
        self,
        connect: Callable[[], ImapMailbox],
        mailbox: str,
        on_change: Callable[[str], None],
        *,
        timing: IdleTiming = IdleTiming(),  # noqa: B008 (frozen: sharing it is fine)
    ) -> None:
        self._connect = connect
        self.mailbox = mailbox
        self._on_change = on_change
        self.timing = timing
        self._lock = threading.Lock()  # guards the status fields and _conn, nothing else
        self._stopping = threading.Event()
        self._retry = threading.Event()  # ends a backoff wait early (stop, retry_now)
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conn: ImapMailbox | None = None
        self._state = "stopped"
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._connects = 0
        self._probes = 0
        self._failures = 0  # since the last good probe: the backoff exponent
        self._was_connected = False
        self._known: Mapping[int, Flags] = {}  # replaced whole, never changed in place

    def set_known(self, flags_by_uid: Mapping[int, Flags]) -> None:
        """The inbox flags the last completed session agreed with the desktop, by UID
        (:func:`known_inbox_flags`), from the service thread. A flag notice that only
        repeats them starts no session: the echo of the agent's own STORE (RFC 7162
        QRESYNC makes the server name the UID; without it every notice counts). A
        user's change differs from them in some UID, or names one they lack."""
        self._known = flags_by_uid

    # -- control ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher thread (once per watcher)."""
        if self._thread is not None:
            raise RuntimeError("InboxWatcher.start() may be called once")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and close the connection (DONE, LOGOUT) — normally within
        milliseconds. After 1 s the connection is cut instead. Only a ``connect()`` in
        progress cannot be interrupted: then this returns after *timeout* and the thread
        closes that connection when ``connect()`` returns."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._retry.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # closed already: the thread has ended
                self._wake_w.send(b"\0")
        thread = self._thread
        if thread is None:
            return
        thread.join(min(timeout, 1.0))
        if thread.is_alive():
            with self._lock:
                conn = self._conn
            if conn is not None:
                conn.abort()
            thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            log.warning(
                "inbox watcher: still %s after %g s; it ends when that returns", self.state, timeout
            )

    def retry_now(self) -> None:
        """End a backoff wait now: what it waited for (a new sign-in) has happened."""
        self._retry.set()

    # -- status -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def connected_since(self) -> float | None:
        """When the current connection was made (epoch seconds); None when not connected."""
        with self._lock:
            return self._connected_since

    @property
    def last_error(self) -> str | None:
        """Why the last connection failed or was lost (kept after a reconnect)."""
        with self._lock:
            return self._last_error

    @property
    def reconnects(self) -> int:
        """Connections made after the first one."""
        with self._lock:
            return max(self._connects - 1, 0)

    @property
    def probes(self) -> int:
        """Liveness probes (DONE, OK, IDLE again) the server answered."""
        with self._lock:
            return self._probes

    def status(self) -> dict[str, Any]:
        """All of the status at once (JSON-ready)."""
        with self._lock:
            return {
                "state": self._state,
                "mailbox": self.mailbox,
                "connected_since": self._connected_since,
                "last_error": self._last_error,
                "reconnects": max(self._connects - 1, 0),
                "probes": self._probes,
            }

    def _set(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, f"_{name}", value)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception(lambda _exc: not self._stopping.is_set()),
            stop=lambda _rs: self._stopping.is_set(),
            wait=self._backoff,
            sleep=self._sleep,
            before_sleep=self._report_failure,
            reraise=True,
        )
        try:
            while not self._stopping.is_set():  # _session returns to renew a login
                retrying(self._session)
        except Exception:  # only after stop(): the failure was already logged
            pass
        finally:
            final = "unsupported" if self.state == "unsupported" else "stopped"
            self._set(state=final, connected_since=None)
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            log.info("inbox watcher: %s", final)

    def _sleep(self, seconds: float) -> None:
        self._retry.wait(seconds)  # stop() and retry_now() end the wait at once
        self._retry.clear()

    def _backoff(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        t = self.timing
        if isinstance(exc, _LASTING):
            nominal = t.auth_backoff
        else:
            doublings = min(max(self._failures - 1, 0), 30)  # days of outage: no overflow
            nominal = min(t.backoff_initial * 2**doublings, t.backoff_max)
        return nominal * random.uniform(0.5, 1.0)

    def _report_failure(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.upcoming_sleep
        self._set(state="backoff", connected_since=None, last_error=str(exc))
        what = (
            "login refused"
            if isinstance(exc, AuthError)
            else "connection lost"
            if self._was_connected
            else "cannot connect"
        )
        bug = None if isinstance(exc, BridgeError) else exc  # a traceback only for bugs
        log.warning("inbox watcher: %s (%s); retry in %.1f s", what, exc, wait, exc_info=bug)

    def _session(self) -> None:
        """One connection's life: raises when it fails, returns when stopping or when
        its OAuth2 login is used up (the caller connects again at once)."""
        if self._stopping.is_set():
            return
        self._set(state="connecting")
        self._was_connected = False
        try:
            conn = self._connect()
        except Exception:
            self._failures += 1
            raise
        with self._lock:
            self._conn = conn
        try:
            if not self._stopping.is_set():
                self._watch(conn)
        except Exception:
            self._failures += 1
            raise
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _watch(self, conn: ImapMailbox) -> None:
        t = self.timing
        conn.keepalive(*t.keepalive)
        messages = conn.examine(self.mailbox)
        if not conn.has("IDLE"):
            self._set(state="unsupported")
            self._stopping.set()
            self._emit(NO_IDLE)
            return
        conn.idle_start(t.reply_timeout)  # what came before is covered by "reconnected"
        conn.take_flag_notices()
        self._known = {}  # the mailbox may be another one now (UIDVALIDITY): until a session
        with self._lock:
            self._state, self._connected_since = "idle", time.time()
            self._connects += 1
            again = self._connects > 1
        self._was_connected = True
        log.info(
            "inbox watcher: %s %s (%d messages), IDLE running",
            "reconnected to" if again else "watching",
            self.mailbox,
            messages,
        )
        self._emit(RECONNECTED)
        wake = self._wake_r.fileno() if self._wake_r is not None else None
        heard = renewed = time.monotonic()
        wall_before, mono_before = _wall_clock(), heard
        while not self._stopping.is_set():
            kinds = conn.idle_wait(t.check_interval, wake, t.reply_timeout)
            now, wall = time.monotonic(), _wall_clock()
            if kinds:
                heard = now
                self._dispatch(kinds, conn)
            jump = (wall - wall_before) - (now - mono_before)
            wall_before, mono_before = wall, now
            if self._stopping.is_set():
                break
            if conn.renew_at is not None and time.time() >= conn.renew_at:
                log.info("inbox watcher: the OAuth2 access token is used up; reconnecting")
                break
            if not conn.idling:
                reason = "the server ended IDLE"
            elif abs(jump) >= t.clock_jump:
                reason = f"wall clock jumped {jump:+.0f} s"
                log.info("inbox watcher: %s (sleep/resume?): probing now", reason)
            elif now - heard >= t.probe_after:
                reason = f"server quiet for {now - heard:.0f} s"
            elif now - renewed >= t.renew_after:
                reason = "renewal"
            else:
                continue
            self._probe(conn, reason)
            heard = renewed = time.monotonic()
        with contextlib.suppress(BridgeError):  # leave politely; stop() cuts it after 1 s
            conn.idle_end(min(t.reply_timeout, 1.0))

    def _probe(self, conn: ImapMailbox, reason: str) -> None:
        """DONE, its OK within reply_timeout, IDLE again: proves the path works."""
        started = time.monotonic()
        kinds = conn.idle_end(self.timing.reply_timeout)
        kinds |= conn.idle_start(self.timing.reply_timeout)
        self._failures = 0
        with self._lock:
            self._probes += 1
        log.debug(
            "inbox watcher: probe (%s) answered in %.0f ms",
            reason,
            (time.monotonic() - started) * 1000,
        )
        self._dispatch(kinds, conn)

    def _dispatch(self, kinds: set[str], conn: ImapMailbox) -> None:
        reasons = dict.fromkeys(reason for kind, reason in _REASONS if kind in kinds)
        notices = conn.take_flag_notices()
        if FLAGS in reasons and self._echoes(notices):
            del reasons[FLAGS]
            log.debug("inbox watcher: %d flag notice(s) repeat the last session", len(notices))
        for reason in reasons:
            self._emit(reason)

    def _echoes(self, notices: list[FlagNotice]) -> bool:
        known = self._known
        return bool(notices) and all(
            n.uid is not None and n.flags is not None and known.get(n.uid) == n.flags
            for n in notices
        )

    def _emit(self, reason: str) -> None:
        log.debug("inbox watcher: change: %s", reason)
        try:
            self._on_change(reason)
        except Exception as exc:  # the caller's bug must not end the watching
            log.warning("inbox watcher: on_change(%r) failed: %r", reason, exc)


def known_inbox_flags(ledger: Mapping[str, LedgerEntry]) -> dict[int, Flags]:
    """The inbox messages' flags in a session's ledger, by UID (for ``set_known``)."""
    return {
        e.uid: e.flags for e in ledger.values() if e.desktop is Where.INBOX and e.uid is not None
    }
