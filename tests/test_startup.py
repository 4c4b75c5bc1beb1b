"""One-shot start-up (issue 9): `imapsync-bridge --help` and an `agent sync` that finds
nothing to do load only the modules they use, checked on the real process with
``python -X importtime`` (each heavy library below costs 25-60 ms of imports here)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import REPO, Bridge
from dovecot import Dovecot

#: Libraries the agent uses only for pairing, the server, the service or outgoing
#: mail, never for a sync session that finds nothing changed.
NOT_FOR_A_QUICK_SYNC = {
    "aiohttp", "aiosmtpd", "asyncio", "authlib", "cryptography", "keyring", "nh3",
    "requests", "schedule", "smtplib", "tenacity",
}  # fmt: skip


def imported_by(*argv: str) -> tuple[str, set[str]]:
    """stdout of `imapsync-bridge argv` run as its own process, and the top-level
    names of every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "imapsync_bridge.cli", *argv],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "imapsync_bridge" in names  # the listing is there at all
    return done.stdout, names


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path, window=4).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def test_help_loads_the_command_line_only() -> None:
    out, names = imported_by("--help")
    assert "agent" in out and "server" in out
    assert not names & (NOT_FOR_A_QUICK_SYNC | {"imapclient", "msgspec", "sqlite3"})


def test_a_no_change_agent_sync_loads_only_what_it_uses(bridge: Bridge) -> None:
    for n in range(1, 6):
        bridge.deliver(n)
    bridge.sync_ok()
    out, names = imported_by("agent", "sync", "--config", str(bridge.agent_ini))
    assert "fast_path=True" in out
    assert not names & NOT_FOR_A_QUICK_SYNC, sorted(names & NOT_FOR_A_QUICK_SYNC)
    bridge.assert_in_sync()
