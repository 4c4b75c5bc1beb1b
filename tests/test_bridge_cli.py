"""The command-line contract of DESIGN.md, end to end: files, output and exit codes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from bridge import REPO, Bridge, run_cli
from dovecot import Dovecot

from imapsync_bridge.protocol import pki


def test_pairing_leaves_the_key_private_and_pins_the_servers_ca(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    bridge = Bridge(dovecot, tmp_path).start()
    try:
        # The code carries the CA's fingerprint: the agent can check the server with it.
        _token, fingerprint = pki.parse_pairing_code(bridge.code)
        ca = (bridge.server_dir / "ca.crt").read_bytes()
        assert pki.ca_fingerprint(ca).startswith(fingerprint)
        bridge.pair()
        state = bridge.agent_ini.parent / "state"
        assert stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600
        assert (state / "server-ca.crt").read_bytes() == ca
        assert pki.certificate_user((state / "agent.crt").read_bytes()) == bridge.phone_user
        status = bridge.agent_status()
        assert status["paired"] is True and status["last_sync"] is None
        expected = {
            "paired", "server", "user", "window", "last_sync", "last_result", "last_error",
            "pending_actions", "pending", "mapped", "quarantined", "sync_phrase", "folders",
            "service", "running", "connections", "next_sync",
        }  # fmt: skip
        assert set(status) == expected
        bridge.deliver(1)
        bridge.sync_ok()
        status = bridge.agent_status()
        assert (status["user"], status["window"], status["last_result"]) == ("alice", 6, "ok")
        listing = bridge.phone_list()
        assert set(listing) == {"user", "window", "inbox", "trash", "sent", "outbox"}
        message = listing["inbox"][0]
        assert set(message) == {"id", "message_id", "subject", "from", "date", "seen", "flagged"}
        assert message["date"].endswith(("Z", "+00:00"))
        shown = subprocess.run(
            [sys.executable, "-m", "imapsync_bridge.cli", "phone", "--config",
             str(bridge.server_ini), "--user", "alice", "show", str(message["id"])],
            capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
        )  # fmt: skip
        assert shown.returncode == 0 and b"Subject: Message 1\r\n" in shown.stdout
    finally:
        bridge.stop()


def test_exit_codes_follow_the_contract(dovecot: Dovecot, tmp_path: Path) -> None:
    bridge = Bridge(dovecot, tmp_path).start()
    try:
        # usage error
        rc, _out, err = run_cli("agent", "sync")
        assert rc == 2 and "--config" in err
        # configuration error
        rc, _out, err = run_cli("agent", "sync", "--config", str(tmp_path / "missing.ini"))
        assert rc == 2
        # operational failure: an unknown phone message
        rc, _out, err = run_cli(
            "phone", "--config", str(bridge.server_ini), "--user", "alice", "read", "999"
        )
        assert rc == 1 and len(err.strip().splitlines()) == 1
        # add-user prints the code alone on its last line, through the real entry point
        done = subprocess.run(
            [sys.executable, "-m", "imapsync_bridge.cli", "server", "add-user", "--config",
             str(bridge.server_ini), "bob", "--address", "bob@phone.example",
             "--desktop-address", "bob@corp.example"],
            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        code = done.stdout.strip().splitlines()[-1]
        assert " " not in code and pki.parse_pairing_code(code)
        # the same user twice is an operational failure with one line
        rc, _out, err = run_cli(
            "server", "add-user", "--config", str(bridge.server_ini), "bob",
            "--address", "b@p", "--desktop-address", "b@c",
        )  # fmt: skip
        assert rc == 1 and len(err.strip().splitlines()) == 1
        listing = json.loads(
            run_cli("phone", "--config", str(bridge.server_ini), "--user", "bob", "list",
                    "--json")[1]
        )  # fmt: skip
        assert listing["window"] == 50  # the server's default_window
    finally:
        bridge.stop()


def test_phone_verbs_go_through_the_service(tmp_path: Path, capsys) -> None:
    """`phone show --json`, a change verb and `request-sync`, in process (no Dovecot)."""
    from imapsync_bridge.cli import main
    from imapsync_bridge.server.store import PhoneStore

    assert main(["server", "init", "--data-dir", str(tmp_path / "srv")]) == 0
    ini = str(tmp_path / "srv" / "server.ini")
    assert main(["server", "add-user", "--config", ini, "alice", "--address", "a@p",
                 "--desktop-address", "a@c"]) == 0  # fmt: skip
    raw = b"Message-ID: <1@x>\r\nSubject: Hi\r\nFrom: a@x\r\nTo: b@x\r\n\r\nbody\r\n"
    with PhoneStore(tmp_path / "srv" / "phone.sqlite3") as store:
        store.apply_ops("alice", [(1, {
            "kind": "put", "key": "<1@x>", "message_id": "<1@x>", "raw": raw,
            "internaldate": "2024-04-01T08:00:00Z", "seen": False, "flagged": False,
        })])  # fmt: skip
        (message,) = store.snapshot("alice").messages
    phone = ["phone", "--config", ini, "--user", "alice"]
    capsys.readouterr()
    assert main([*phone, "show", "--json", str(message.id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["subject"], shown["to"], shown["text"]) == ("Hi", ["b@x"], "body\n")
    assert main([*phone, "read", str(message.id)]) == 0
    assert capsys.readouterr().out == f"read {message.id}: done\n"
    assert main([*phone, "request-sync"]) == 0
    assert capsys.readouterr().out.startswith("sync requested")
    with PhoneStore(tmp_path / "srv" / "phone.sqlite3") as store:
        assert store.take_sync_request("alice") is not None
    assert main([*phone, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inbox"][0]["seen"] is True


def test_a_no_change_sync_refreshes_last_sync_at_most_once_a_minute(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """It writes nothing else; a failure recorded before is cleared at once."""
    bridge = Bridge(dovecot, tmp_path).start()
    try:
        bridge.pair()
        bridge.deliver(1)
        bridge.sync_ok()
        first = bridge.agent_status()["last_sync"]
        assert "fast_path=True" in bridge.sync_ok()
        assert bridge.agent_status()["last_sync"] == first  # within the minute: unwritten
        path = tmp_path / "agent" / "state" / "agent.sqlite3"

        def set_meta(name: str, value: str) -> None:
            with contextlib.closing(sqlite3.connect(path)) as state, state:
                state.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

        set_meta("last_error", "an old failure")
        assert "fast_path=True" in bridge.sync_ok()
        assert bridge.agent_status()["last_error"] is None
        set_meta("last_sync", "2026-01-01T00:00:00+00:00")
        assert "fast_path=True" in bridge.sync_ok()
        assert bridge.agent_status()["last_sync"] > "2026-01-01T00:00:00+00:00"
    finally:
        bridge.stop()
