"""`agent run` as a user runs it: a real process against the real Dovecot and server."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import REPO, Bridge
from dovecot import Dovecot
from proxy import RewritingProxy
from test_bridge_crash import Killer

from imapsync_bridge.agent.desktop import CATCH_UP_AFTER


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path).start()
    try:
        yield b
    finally:
        b.stop()


def start_agent(bridge: Bridge, **options: str) -> subprocess.Popen[bytes]:
    assert bridge.server is not None
    bridge.write_agent_config(bridge.agent_ini, **options)
    bridge.pair()
    return bridge.run_agent()


def stop_agent(bridge: Bridge, agent: subprocess.Popen[bytes]) -> float:
    """SIGTERM; returns how long it took to exit (asserting exit 0)."""
    started = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(10)
    except subprocess.TimeoutExpired:
        agent.kill()
        raise AssertionError("agent run did not stop within 10 s of SIGTERM") from None
    assert code == 0, bridge.agent_log()
    return time.monotonic() - started


def test_periodic_sync_without_idle_and_sigterm_stops_it(bridge: Bridge) -> None:
    for n in range(1, 4):
        bridge.deliver(n)
    agent = start_agent(bridge, idle="false", sync_interval="1", poll_interval="1")
    try:
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 3, 10, "the first sync")
        # The push link is up, so a phone change would come at once: make a desktop
        # change, which only the timer finds without IDLE.
        new = bridge.deliver(4)
        wait_for(lambda: new in bridge.phone_inbox_ids(), 10, "the periodic sync")
        status = wait_for(
            lambda: (s := bridge.agent_status())["running"] and s["next_sync"] and s, 5, "status"
        )
        assert status["connections"]["push"]["state"] == "connected"
        bridge.assert_in_sync()
    finally:
        took = stop_agent(bridge, agent)
    assert took < 10
    assert bridge.agent_status()["running"] is False


def test_sigint_stops_it_too(bridge: Bridge) -> None:
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    wait_for(lambda: bridge.agent_status()["running"], 10, "the service running")
    agent.send_signal(signal.SIGINT)
    assert agent.wait(10) == 0, bridge.agent_log()


def test_a_phone_change_reaches_the_desktop_by_push(bridge: Bridge) -> None:
    first = bridge.deliver(1)
    second = bridge.deliver(2)
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    try:
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 2, 10, "the first sync")
        wait_for(
            lambda: bridge.agent_status()["connections"]["push"]["state"] == "connected",
            10,
            "the push link",
        )
        bridge.phone("delete", str(bridge.phone_id(first)))
        started = time.monotonic()
        wait_for(lambda: first in bridge.desktop_ids(bridge.trash), 5, "the delete on the desktop")
        took = time.monotonic() - started
        bridge.phone("read", str(bridge.phone_id(second)))
        wait_for(
            lambda: next(m for m in bridge.mails() if m.message_id == second).seen,
            5,
            "the read flag on the desktop",
        )
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)
    assert took < 5


def test_a_burst_of_phone_changes_gives_a_handful_of_syncs(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 7)]
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    try:
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 6, 10, "the first sync")
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        phone_ids = [bridge.phone_id(m) for m in ids]
        for round_ in range(100):  # flag, then unflag, each message in turn
            verb = "flag" if round_ % 2 == 0 else "unflag"
            bridge.phone(verb, str(phone_ids[(round_ // 2) % 6]))
        # 100 changes, each flag undone by the next change: all flags end clear.
        wait_for(
            lambda: (
                not any(m.flagged for m in bridge.mails())
                and not bridge.phone_list()["inbox"][0]["flagged"]
            ),
            10,
            "the burst carried over",
        )
        time.sleep(1)
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)
    syncs = bridge.agent_log().count("sync (phone")
    assert 1 <= syncs <= 25, f"{syncs} syncs for a burst of 100 phone changes"


def test_the_idle_echo_of_a_phone_change_starts_no_session_and_a_user_change_still_syncs(
    bridge: Bridge,
) -> None:
    ids = [bridge.deliver(n) for n in (1, 2)]
    agent = start_agent(bridge, idle="true", sync_interval="3600")

    def connected() -> bool:
        conns = bridge.agent_status()["connections"] or {}
        return conns.get("push", {}).get("state") == "connected" and (
            conns.get("imap_idle", {}).get("state") == "idle"
        )

    def new_sessions(since: int) -> list[str]:
        return [line for line in bridge.agent_log()[since:].splitlines() if " sync (" in line]

    def on_desktop(message_id: str) -> Any:
        return next(m for m in bridge.mails() if m.message_id == message_id)

    try:
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 2, 10, "the first sync")
        wait_for(connected, 10, "IDLE and the push link")
        time.sleep(1.5)  # the first sessions' own notices are over
        first, second = (bridge.phone_id(m) for m in ids)

        since = len(bridge.agent_log())
        bridge.phone("flag", str(first))
        wait_for(lambda: on_desktop(ids[0]).flagged, 5, "the flag on the desktop", every=0.01)
        time.sleep(1.5)  # Dovecot tells IDLE 0.5 s after the STORE: its echo has come
        sessions = new_sessions(since)
        assert len(sessions) == 1 and "sync (phone" in sessions[0], sessions

        # The phone reads the other message; the user flags it on the desktop right
        # after the agent's STORE (inside Dovecot's 0.5 s notice delay): one notice
        # carries both, and the user's flag must reach the phone (by that notice's
        # session, or by any session that began after it).
        bridge.phone("read", str(second))
        wait_for(lambda: on_desktop(ids[1]).seen, 5, "the read on the desktop", every=0.01)
        with bridge.imap() as client:
            client.add_flags([bridge.desktop_uid(ids[1])], [b"\\Flagged"])
        wait_for(
            lambda: next(m for m in bridge.phone_list()["inbox"] if m["id"] == second)["flagged"],
            5,
            "the desktop flag on the phone",
        )
        time.sleep(1.0)
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)


def test_after_a_session_a_few_noops_let_the_server_catch_up_then_it_is_quiet(
    bridge: Bridge,
) -> None:
    # Stock Dovecot re-reads a just-changed Maildir at the first sync a second or two
    # later; the agent's NOOPs in those seconds pay that instead of the next session.
    # A user sees it as a bounded burst of NOOPs after each change, and silence after.
    noops = RewritingProxy(bridge.dovecot.port, rb" NOOP\r\n$", rb" NOOP\r\n")  # counts
    first = bridge.deliver(1)
    bridge.write_agent_config(bridge.agent_ini, imap_port=noops.port, sync_interval="3600")
    bridge.pair()
    agent = bridge.run_agent()
    try:
        wait_for(lambda: bridge.phone_inbox_ids() == [first], 10, "the first sync")
        wait_for(
            lambda: (
                (bridge.agent_status()["connections"] or {}).get("push", {}).get("state")
                == "connected"
            ),
            10,
            "the push link",
        )
        time.sleep(CATCH_UP_AFTER[-1] + 0.5)
        before = noops.rewritten
        bridge.phone("flag", str(bridge.phone_id(first)))
        wait_for(lambda: bridge.mails()[0].flagged, 5, "the flag on the desktop")
        time.sleep(CATCH_UP_AFTER[-1] + 0.5)
        after_change = noops.rewritten - before
        time.sleep(2.0)
        assert 1 <= after_change <= len(CATCH_UP_AFTER), after_change
        assert noops.rewritten - before == after_change, "NOOPs went on with nothing new"
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)
        noops.close()


def test_request_sync_goes_over_the_push_link_when_the_agent_is_connected(
    bridge: Bridge,
) -> None:
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    try:
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        wait_for(lambda: bridge.agent_status()["last_sync"], 10, "the first sync")
        new = bridge.deliver(1)  # no IDLE, long timer: only the request brings it
        bridge.phone("request-sync")
        wait_for(lambda: new in bridge.phone_inbox_ids(), 5, "the requested sync")
        assert bridge.mails() and all(m.message_id == new for m in bridge.mails()), (
            "a trigger mail reached the desktop although the push link was up"
        )
    finally:
        stop_agent(bridge, agent)
    assert "changed (sync_request)" in bridge.agent_log()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_process(bridge: Bridge) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = (bridge.server_dir / "server-run.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run",
         "--config", str(bridge.server_ini)],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    wait_for(
        lambda: "sync listener on" in (bridge.server_dir / "server-run.log").read_text(),
        15,
        "server run",
    )
    return process


def test_the_hosted_server_killed_and_restarted_under_a_running_agent(bridge: Bridge) -> None:
    """`server run` as a process of its own on a fixed port, SIGKILLed and started again:
    the agent notices, reconnects with backoff, and the next phone change still syncs."""
    port = free_port()
    bridge.stop()
    ini = bridge.server_ini.read_text()
    bridge.server_ini.write_text(
        re.sub(r"sync_listen = .*", f"sync_listen = 127.0.0.1:{port}", ini)
    )
    first, second = bridge.deliver(1), bridge.deliver(2)
    server = server_process(bridge)
    agent = None
    try:
        bridge.write_agent_config(
            bridge.agent_ini, server=f"127.0.0.1:{port}", idle="false", sync_interval="3600"
        )
        bridge.pair()
        agent = bridge.run_agent()
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 2, 10, "the first sync")
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        server.kill()
        server.wait(5)
        bridge.phone("delete", str(bridge.phone_id(first)))  # made while the server is down
        wait_for(
            lambda: "push link to the server lost" in bridge.agent_log(), 5, "the loss noticed"
        )
        time.sleep(2)  # a few reconnect attempts against a closed port
        server = server_process(bridge)
        wait_for(lambda: first in bridge.desktop_ids(bridge.trash), 70, "the change made meanwhile")
        bridge.phone("read", str(bridge.phone_id(second)))
        wait_for(
            lambda: next(m for m in bridge.mails() if m.message_id == second).seen,
            5,
            "the next change, by push",
        )
        bridge.assert_in_sync()
        assert agent.poll() is None, "agent run died"
    finally:
        if agent is not None:
            stop_agent(bridge, agent)
        server.kill()
        server.wait(5)
    attempts = bridge.agent_log().count("push link to the server: ")
    assert attempts <= 8, f"{attempts} reconnect attempts in a few seconds: a storm"


@pytest.mark.parametrize("frame_type", ["ops", "ack_actions", "complete"])
def test_sigkill_of_agent_run_mid_session(
    dovecot: Dovecot, tmp_path: Path, frame_type: str
) -> None:
    """The running service SIGKILLed at a frame of an update session (the server takes
    the frame; the agent never reads the answer); a new `agent run` converges, with
    nothing lost or doubled."""
    killer = Killer()
    bridge = Bridge(dovecot, tmp_path, window=6).start(observer=killer)
    try:
        for n in range(1, 8):
            bridge.deliver(n)
        agent = start_agent(bridge, idle="false", sync_interval="3600")
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 6, 10, "the first sync")
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        time.sleep(0.5)  # the session for the push link's arrival is done: the agent idles
        before = set(bridge.desktop_ids())
        killer.arm(agent.pid, frame_type, 1)
        new = [bridge.deliver(n) for n in (20, 21)]  # pulled by the session: ops
        victim = bridge.phone_inbox_ids()[-1]
        bridge.phone("delete", str(bridge.phone_id(victim)))  # pushed: the session starts
        wait_for(killer.fired.is_set, 10, f"the kill at {frame_type}")
        assert agent.wait(5) == -signal.SIGKILL
        agent = bridge.run_agent()
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the restarted agent")
        wait_for(
            lambda: victim in bridge.desktop_ids(bridge.trash), 10, "the delete, after restart"
        )
        wait_for(
            lambda: set(new) <= set(bridge.phone_inbox_ids()), 10, "the new mail, after restart"
        )
        stop_agent(bridge, agent)
        bridge.assert_in_sync()
        alive = set(bridge.desktop_ids()) | set(bridge.desktop_ids(bridge.trash))
        assert before | set(new) <= alive, f"lost: {sorted(before | set(new) - alive)}"
    finally:
        bridge.stop()


def test_inbound_mail_reaches_the_desktop_by_push(bridge: Bridge) -> None:
    agent = start_agent(bridge, idle="false", sync_interval="3600")
    try:
        wait_for(lambda: bridge.agent_status()["connections"], 10, "the push link")
        wait_for(lambda: bridge.agent_status()["last_sync"], 10, "the first sync")
        assert bridge.server is not None
        mail = (
            b"From: someone@example.net\r\nTo: alice@phone.example\r\n"
            b"Subject: to the phone\r\nMessage-ID: <inbound-push@example.net>\r\n\r\nhello\r\n"
        )
        with smtplib.SMTP("127.0.0.1", bridge.server.ports["smtp"], timeout=10) as client:
            client.sendmail("someone@example.net", ["alice@phone.example"], mail)
        wait_for(
            lambda: "<inbound-push@example.net>" in bridge.desktop_ids(), 5, "the desktop copy"
        )
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)
    assert "changed (inbound_mail)" in bridge.agent_log()


def test_agent_sync_beside_agent_run_takes_its_turn(bridge: Bridge) -> None:
    for n in range(1, 4):
        bridge.deliver(n)
    agent = start_agent(bridge, idle="false", sync_interval="1")
    try:
        wait_for(lambda: len(bridge.phone_inbox_ids()) == 3, 10, "the first sync")
        for n in range(4, 7):
            bridge.deliver(n)
            bridge.sync_ok()  # one session at a time: the lock, never two at once
        bridge.assert_in_sync()
        assert len(bridge.phone_inbox_ids()) == 6
    finally:
        stop_agent(bridge, agent)
