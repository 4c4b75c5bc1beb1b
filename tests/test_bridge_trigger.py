"""Trigger mails end to end (patent FIG. 11, DESIGN.md invariant 7): real Dovecot, a real
SMTP server delivering into it, the hosted server and the agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge, run_cli
from dovecot import Dovecot

from imapsync_bridge.server.store import PhoneStore


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path, window=4).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def server_secret(bridge: Bridge) -> tuple[str, bytes] | None:
    with PhoneStore(bridge.server_dir / "phone.sqlite3") as store:
        return store.trigger_secret(bridge.phone_user)


def test_pairing_gives_both_sides_the_phrase_and_re_pairing_a_new_one(bridge: Bridge) -> None:
    secret = server_secret(bridge)
    assert secret is not None
    phrase, key = secret
    assert bridge.agent_status()["sync_phrase"] == phrase
    rc, out, err = run_cli("agent", "status", "--config", str(bridge.agent_ini))
    assert rc == 0 and phrase in out, err
    rc, out, err = run_cli("server", "pair-code", "--config", str(bridge.server_ini), "alice")
    assert rc == 0, err
    bridge.pair(code=out.strip().splitlines()[-1])
    again = server_secret(bridge)
    assert again is not None and again[0] != phrase and again[1] != key
    assert bridge.agent_status()["sync_phrase"] == again[0]
