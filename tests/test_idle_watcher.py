"""InboxWatcher (agent/idle.py) against a real Dovecot: push, probes, reconnects, stop.

No mocks: changes are made through second IMAP connections, outages by restarting
Dovecot, refusing connections or blackholing a proxy (tests/proxy.py) in between.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from dovecot import NO_IDLE, Dovecot
from proxy import BlackholeProxy

from imapsync_bridge.agent import idle
from imapsync_bridge.agent.idle import IdleTiming, InboxWatcher
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.model import Flags

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
#: Short intervals so that outages resolve in about a second.
FAST = IdleTiming(
    probe_after=1.0,
    reply_timeout=1.0,
    check_interval=0.2,
    backoff_initial=0.2,
    backoff_max=0.5,
    auth_backoff=4.0,
)


class Changes:
    """The on_change callback: records (time, reason) and lets a test wait for one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen: list[tuple[float, str]] = []

    def __call__(self, reason: str) -> None:
        with self._cond:
            self.seen.append((time.monotonic(), reason))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def reasons(self) -> list[str]:
        with self._cond:
            return [r for _t, r in self.seen]

    def wait_for(self, reason: str, timeout: float, after: int = 0) -> float:
        """Wait for *reason* reported as change number *after* or later; the time it
        arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, got in self.seen[after:]:
                    if got == reason:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {reason!r} within {timeout} s: {self.seen}")
                self._cond.wait(left)


def connector(
    port: int,
    user: str,
    *,
    password: str = Dovecot.password,
    timeout: float = 5.0,
    attempts: list[float] | None = None,
) -> Callable[[], ImapMailbox]:
    """A plain-text connect() for the watcher; *attempts* collects when each was made."""

    def connect() -> ImapMailbox:
        if attempts is not None:
            attempts.append(time.monotonic())
        return ImapMailbox.connect(
            "127.0.0.1", port, security="none", username=user, password=password, timeout=timeout
        )

    return connect


@pytest.fixture
def watch() -> Iterator[Callable[..., tuple[InboxWatcher, Changes]]]:
    """Start watchers; each is stopped at the end of the test."""
    made: list[InboxWatcher] = []

    def start(
        connect: Callable[[], ImapMailbox], timing: IdleTiming = FAST
    ) -> tuple[InboxWatcher, Changes]:
        changes = Changes()
        watcher = InboxWatcher(connect, "INBOX", changes, timing=timing)
        made.append(watcher)
        watcher.start()
        return watcher, changes

    yield start
    for watcher in made:
        watcher.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def append(dc: Dovecot, user: str, n: int) -> float:
    """APPEND one message through a second connection; when it was done (monotonic)."""
    dc.append(user, dc.make_message(n), T0)
    return time.monotonic()


# -- what it reports ------------------------------------------------------------------------


def test_new_mail_flag_change_and_expunge_are_reported_within_a_second(dovecot, imap_user, watch):
    watcher, changes = watch(connector(dovecot.port, imap_user))
    changes.wait_for("reconnected", 5)  # also on the first connect: the service syncs
    assert watcher.state == "idle" and watcher.connected_since is not None

    mark = changes.mark()
    done = append(dovecot, imap_user, 1)
    assert changes.wait_for("new", 1.0, mark) - done < 1.0

    with dovecot.client(imap_user) as other:
        other.select_folder("INBOX")
        (uid,) = other.search("ALL")
        mark = changes.mark()
        other.add_flags([uid], [b"\\Seen"])
        done = time.monotonic()
        assert changes.wait_for("flags", 1.0, mark) - done < 1.0

        mark = changes.mark()
        other.delete_messages([uid])
        other.expunge()
        done = time.monotonic()
        assert changes.wait_for("expunge", 1.0, mark) - done < 1.0
    assert changes.reasons().count("reconnected") == 1
    assert watcher.reconnects == 0 and watcher.last_error is None


def test_the_echo_of_our_own_store_is_ignored_but_a_user_change_right_after_it_is_not(
    dovecot, imap_user, watch
):
    # The service tells the watcher what its last session left (set_known); a flag
    # notice that only repeats that is the echo of the agent's own STORE.
    watcher, changes = watch(connector(dovecot.port, imap_user))
    changes.wait_for("reconnected", 5)
    for n in range(3):
        append(dovecot, imap_user, n)
    changes.wait_for("new", 2.0)
    with dovecot.client(imap_user) as agent, dovecot.client(imap_user) as user:
        agent.select_folder("INBOX")
        user.select_folder("INBOX")
        first, second, third = agent.search("ALL")
        settled = changes.mark()
        # Dovecot tells IDLE clients 0.5 s after a change: wait long enough to know.
        time.sleep(1.0)
        assert changes.reasons()[settled:] == []

        watcher.set_known({first: Flags(seen=True), second: Flags(), third: Flags()})
        mark = changes.mark()
        agent.add_flags([first], [b"\\Seen"])  # the agent's own STORE
        time.sleep(1.5)
        assert "flags" not in changes.reasons()[mark:], "the echo started a session"

        # The agent stores again, and a user's change lands right after, on another
        # message and on the same one: each must still be reported.
        watcher.set_known({first: Flags(seen=True), second: Flags(flagged=True), third: Flags()})
        mark = changes.mark()
        agent.add_flags([second], [b"\\Flagged"])
        user.add_flags([third], [b"\\Seen"])
        changes.wait_for("flags", 1.5, mark)

        watcher.set_known({first: Flags(seen=True, flagged=True), second: Flags(flagged=True),
                           third: Flags(seen=True)})  # fmt: skip
        mark = changes.mark()
        agent.add_flags([first], [b"\\Flagged"])
        user.remove_flags([first], [b"\\Seen"])
        changes.wait_for("flags", 1.5, mark)

        # A message the last session does not know (outside the phone window) counts.
        watcher.set_known({})
        mark = changes.mark()
        agent.add_flags([third], [b"\\Flagged"])
        changes.wait_for("flags", 1.5, mark)


def test_changes_around_probes_are_not_lost(dovecot, imap_user, watch):
    # Probes (DONE, OK, IDLE again) every 0.3 s while mail keeps arriving.
    timing = IdleTiming(probe_after=0.3, reply_timeout=1.0, check_interval=0.1)
    watcher, changes = watch(connector(dovecot.port, imap_user), timing)
    changes.wait_for("reconnected", 5)
    for n in range(4):
        mark = changes.mark()
        append(dovecot, imap_user, n)
        changes.wait_for("new", 1.0, mark)  # Dovecot itself waits 0.5 s before telling
        time.sleep(0.1 * n)  # land in different phases of the probe cycle
    assert watcher.probes >= 2
    assert watcher.reconnects == 0 and watcher.state == "idle"


def test_watching_over_implicit_tls(dovecot, imap_user, watch):
    def tls_connect() -> ImapMailbox:
        return ImapMailbox.connect(
            "127.0.0.1",
            dovecot.tls_port,
            security="tls",
            username=imap_user,
            password=dovecot.password,
            ssl_context=dovecot.ssl_context(),
            timeout=5,
        )

    timing = IdleTiming(probe_after=0.3, reply_timeout=1.0, check_interval=0.1)
    watcher, changes = watch(tls_connect, timing)
    changes.wait_for("reconnected", 5)
    for n in range(2):
        mark = changes.mark()
        append(dovecot, imap_user, n)
        changes.wait_for("new", 1.0, mark)
        time.sleep(0.4)  # a probe between the messages
    assert watcher.probes >= 2 and watcher.reconnects == 0


def test_a_server_without_idle_is_reported_unsupported(watch):
    with Dovecot(profile=NO_IDLE) as own:
        watcher, changes = watch(connector(own.port, own.new_user()))
        wait_until(lambda: watcher.state == "unsupported", 3, "unsupported")
        assert changes.reasons() == ["no-idle"], "once: the service polls instead"


# -- noticing a dead connection and coming back ---------------------------------------------


def test_dovecot_restart_reconnects_and_changes_are_seen_again(watch):
    with Dovecot() as own:
        user = own.new_user()
        watcher, changes = watch(connector(own.port, user))
        changes.wait_for("reconnected", 5)
        mark = changes.mark()
        own.restart()
        changes.wait_for("reconnected", 5, mark)
        assert watcher.reconnects == 1 and watcher.state == "idle"
        assert watcher.last_error  # why it was lost, for `agent status`

        mark = changes.mark()
        done = append(own, user, 1)
        assert changes.wait_for("new", 1.0, mark) - done < 1.0


def test_blackholed_path_is_noticed_by_the_probe_and_recovered(dovecot, imap_user, watch):
    proxy = BlackholeProxy(dovecot.port)
    try:
        watcher, changes = watch(connector(proxy.port, imap_user, timeout=1.0))
        changes.wait_for("reconnected", 5)

        proxy.blackhole()  # nothing closes: only the probe can tell
        t = FAST
        bound = t.probe_after + t.check_interval + t.reply_timeout + 0.5
        took = wait_until(lambda: watcher.state != "idle", bound, "noticed")
        assert took >= t.probe_after * 0.9  # it was the probe, not a closed socket
        assert "no answer" in (watcher.last_error or "")

        proxy.restore()
        mark = changes.mark()
        changes.wait_for("reconnected", 5, mark)
        assert watcher.reconnects == 1
        mark = changes.mark()
        append(dovecot, imap_user, 2)
        changes.wait_for("new", 1.0, mark)
    finally:
        proxy.close()


def test_a_wall_clock_jump_probes_at_once(dovecot, imap_user, watch, monkeypatch):
    # probe_after stays 30 s: only the jump (sleep/resume) can make it probe this soon.
    timing = IdleTiming(reply_timeout=1.0, check_interval=0.2, backoff_initial=0.2, backoff_max=0.5)
    proxy = BlackholeProxy(dovecot.port)
    offset = [0.0]
    monkeypatch.setattr(idle, "_wall_clock", lambda: time.time() + offset[0])
    try:
        watcher, changes = watch(connector(proxy.port, imap_user, timeout=1.0), timing)
        changes.wait_for("reconnected", 5)

        offset[0] += 3600  # "slept an hour": the connection is fine, the probe says so
        wait_until(lambda: watcher.probes == 1, 2.0, "probed")
        assert watcher.state == "idle" and watcher.reconnects == 0

        proxy.blackhole()
        offset[0] += 3600  # resumed on a network where the old path is gone
        bound = timing.check_interval + timing.reply_timeout + 0.5
        wait_until(lambda: watcher.state != "idle", bound, "noticed")
        proxy.restore()
        mark = changes.mark()
        changes.wait_for("reconnected", 5, mark)
    finally:
        proxy.close()


# -- backoff --------------------------------------------------------------------------------


def test_refused_connections_are_retried_with_growing_waits(watch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: every connect is refused
        attempts: list[float] = []
        timing = IdleTiming(backoff_initial=0.1, backoff_max=1.0)
        watcher, _changes = watch(connector(s.getsockname()[1], "u", attempts=attempts), timing)
        time.sleep(2.0)
        n = len(attempts)
        # Waits are 0.5-1 x (0.1, 0.2, 0.4, 0.8, 1.0, ...): 5 to 7 attempts in 2 s.
        assert 4 <= n <= 8, attempts
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        for i, gap in enumerate(gaps):
            assert gap >= 0.5 * min(0.1 * 2**i, 1.0) - 0.01, gaps
        assert watcher.state == "backoff"
        assert "cannot connect" in (watcher.last_error or "")

        started = time.monotonic()
        watcher.stop()  # in the middle of a wait
        assert time.monotonic() - started < 0.5
        assert watcher.state == "stopped"


def test_a_refused_login_waits_the_long_backoff(watch):
    # Own instance: a failed login slows the next logins (Dovecot's auth penalty).
    with Dovecot() as own:
        attempts: list[float] = []
        timing = IdleTiming(backoff_initial=0.05, backoff_max=0.1, auth_backoff=4.0)
        connect = connector(own.port, own.new_user(), password="wrong", attempts=attempts)
        watcher, changes = watch(connect, timing)
        wait_until(lambda: watcher.state == "backoff", 3, "backing off")
        time.sleep(1.0)  # the short backoff would have retried ~10 times by now
        assert len(attempts) == 1
        assert "refused" in (watcher.last_error or "")
        assert changes.reasons() == []


# -- stopping and cost ----------------------------------------------------------------------


def test_stop_while_idle_is_quick_and_logs_out(dovecot, imap_user, watch):
    watcher, changes = watch(connector(dovecot.port, imap_user), IdleTiming())
    changes.wait_for("reconnected", 5)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert watcher.state == "stopped" and watcher.connected_since is None
    wait_until(
        lambda: any(
            f"imap({imap_user})" in line and "Logged out" in line
            for line in dovecot.log().splitlines()
        ),
        2,
        "logged out",
    )


def test_stop_while_a_probe_waits_on_a_dead_path_cuts_it(dovecot, imap_user, watch):
    proxy = BlackholeProxy(dovecot.port)
    try:
        timing = IdleTiming(probe_after=0.2, reply_timeout=10.0, check_interval=0.1)
        watcher, changes = watch(connector(proxy.port, imap_user), timing)
        changes.wait_for("reconnected", 5)
        proxy.blackhole()
        time.sleep(0.5)  # the probe's DONE is out, its answer would take 10 s to give up on
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 1.5
        assert watcher.state == "stopped"
    finally:
        proxy.close()


def test_stop_before_start_and_twice_is_harmless():
    watcher = InboxWatcher(lambda: None, "INBOX", print)  # type: ignore[arg-type,return-value]
    watcher.stop()
    watcher.stop()
    assert watcher.state == "stopped"


def test_idle_watching_costs_almost_no_cpu(dovecot, imap_user, watch):
    watcher, changes = watch(connector(dovecot.port, imap_user), IdleTiming())
    changes.wait_for("reconnected", 5)
    thread = next(t for t in threading.enumerate() if t.name == "inbox-watcher")
    assert thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    before = time.clock_gettime(clock)
    time.sleep(1.5)
    used = time.clock_gettime(clock) - before
    # The product target is < 0.5 CPU s per 60 s for the whole agent: 0.0125 s per 1.5 s.
    assert used < 0.004, f"{used:.4f} CPU s in 1.5 s"
    assert watcher.state == "idle"


def test_a_failing_on_change_does_not_end_the_watching(dovecot, imap_user):
    changes = Changes()

    def on_change(reason: str) -> None:
        changes(reason)
        raise RuntimeError("the caller's bug")

    watcher = InboxWatcher(connector(dovecot.port, imap_user), "INBOX", on_change, timing=FAST)
    watcher.start()
    try:
        changes.wait_for("reconnected", 5)
        mark = changes.mark()
        append(dovecot, imap_user, 1)
        changes.wait_for("new", 1.0, mark)
        assert watcher.state == "idle" and watcher.reconnects == 0
    finally:
        watcher.stop()


@pytest.mark.parametrize(
    "bad",
    [{"probe_after": 0}, {"reply_timeout": -1}, {"backoff_max": 0.5}, {"keepalive": (0, 1, 1)}],
)
def test_unusable_timings_are_refused(bad):
    with pytest.raises(ValueError):
        IdleTiming(**bad)


def test_the_backoff_stays_capped_after_days_of_outage():
    from tenacity import RetryCallState, Retrying

    watcher = InboxWatcher(lambda: None, "INBOX", print)  # type: ignore[arg-type,return-value]
    state = RetryCallState(Retrying(), None, (), {})
    state.set_exception((OSError, OSError("refused"), None))
    watcher._failures = 10_000  # a day and more of failed attempts (2**9999 overflows a float)
    assert 30.0 <= watcher._backoff(state) <= 60.0
