"""`agent run` with ``idle = true`` against a server that offers no IDLE: it polls.

The Dovecot here advertises no IDLE (tests/dovecot.py ``NO_IDLE``). The periodic timer
is an hour away, so only the fall-back poll (every ``poll_interval``) can bring a desktop
change or a trigger mail to the phone within seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bridge import Bridge, run_cli
from dovecot import NO_IDLE, Dovecot
from test_agent_run import stop_agent, wait_for

from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.trigger_mail import trigger_message


@pytest.fixture(scope="module")
def no_idle_dovecot() -> Iterator[Dovecot]:
    with Dovecot(profile=NO_IDLE) as server:
        yield server


@pytest.fixture
def bridge(no_idle_dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(no_idle_dovecot, tmp_path).start()
    try:
        yield b
    finally:
        b.stop()


def test_without_idle_the_agent_polls_for_desktop_changes_and_trigger_mail(
    bridge: Bridge,
) -> None:
    first = bridge.deliver(1)
    bridge.write_agent_config(
        bridge.agent_ini, idle="true", sync_interval="3600", poll_interval="1"
    )
    bridge.pair()
    with PhoneStore(bridge.server_dir / "phone.sqlite3") as store:
        secret = store.trigger_secret(bridge.phone_user)
    assert secret is not None
    phrase, key = secret
    agent = bridge.run_agent()
    try:
        wait_for(lambda: first in bridge.phone_inbox_ids(), 10, "the first sync")
        status = wait_for(
            lambda: (s := bridge.agent_status())["connections"] and s["connections"]["poll"] and s,
            5,
            "the fall-back shown in agent status",
        )
        assert status["connections"]["imap_idle"]["state"] == "unsupported"
        assert status["connections"]["poll"] == {
            "every": 1,
            "why": "the server offers no IDLE",
        }
        rc, out, _err = run_cli("agent", "status", "--config", str(bridge.agent_ini))
        assert rc == 0
        assert "polling     every 1 s (the server offers no IDLE)" in out

        # A desktop change: new mail reaches the phone by the poll, not the hour's timer.
        second = bridge.deliver(2)
        wait_for(lambda: second in bridge.phone_inbox_ids(), 6, "the polled desktop change")

        # A trigger mail, as the hosted server sends it: found, expunged, synced.
        now = datetime.now(UTC)
        raw = trigger_message(
            user=bridge.phone_user, sender="alice@phone.example",
            to=bridge.from_address, phrase=phrase, key=key, now=now,
        ).as_bytes()  # fmt: skip
        bridge.dovecot.append(bridge.user, raw, now)
        wait_for(lambda: "trigger mail: 1 valid" in bridge.agent_log(), 6, "the trigger")
        wait_for(lambda: len(bridge.mails()) == 2, 5, "the trigger expunged")
        assert re.search(r"sync \([a-z,]*trigger", bridge.agent_log()), bridge.agent_log()
        subjects = [m["subject"] for m in bridge.phone_list()["inbox"]]
        assert all(phrase not in s for s in subjects), "a trigger reached the phone"
        bridge.assert_in_sync()
        log = bridge.agent_log()
        assert log.count("the IMAP server offers no IDLE") == 1, log
        assert phrase not in log and key.hex() not in log
    finally:
        stop_agent(bridge, agent)
