"""`agent run` as a user runs it: a real process against the real Dovecot and server."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import Bridge
from dovecot import Dovecot


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
