"""The agent state file's schema version: checked on open, against a real SQLite file."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bridge import run_cli

from imapsync_bridge.agent.state import _MIGRATIONS, SCHEMA_VERSION, STATE_FILE, AgentState
from imapsync_bridge.errors import StoreError

TABLES = {"meta", "ledger", "outgoing", "quarantine", "trigger_keys"}


def _version_and_tables(path: Path) -> tuple[int, set[str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return version, {name for (name,) in rows}
    finally:
        conn.close()


def test_a_new_file_gets_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "state" / STATE_FILE
    AgentState(path).close()
    assert _version_and_tables(path) == (SCHEMA_VERSION, TABLES)


def test_an_empty_version_0_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    sqlite3.connect(path).close()  # an empty SQLite file: user_version 0
    assert _version_and_tables(path) == (0, set())
    state = AgentState(path)
    state.set_many({"server_user": "alice"})
    state.close()
    assert _version_and_tables(path) == (SCHEMA_VERSION, TABLES)


def test_a_current_file_is_opened_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    state = AgentState(path)
    state.set_many({"server_user": "alice"})
    state.close()
    state = AgentState(path)
    assert state.get("server_user") == "alice"
    state.close()
    assert _version_and_tables(path) == (SCHEMA_VERSION, TABLES)


def _written_by_a_newer_version(path: Path) -> None:
    AgentState(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def test_a_newer_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    _written_by_a_newer_version(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        AgentState(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "newer" in message and "upgrade imapsync-bridge" in message
    assert path.read_bytes() == before
    assert _version_and_tables(path)[0] == SCHEMA_VERSION + 1


def test_agent_status_with_a_newer_state_says_upgrade(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nstate_dir = state\nserver = 127.0.0.1:4465\n"
        "[imap]\nhost = 127.0.0.1\nsecurity = none\nusername = alice\n"
    )
    _written_by_a_newer_version(tmp_path / "state" / STATE_FILE)
    rc, _out, err = run_cli("agent", "status", "--config", str(ini))
    assert rc == 1
    (line,) = err.strip().splitlines()
    assert "newer imapsync-bridge" in line and "upgrade imapsync-bridge" in line


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="cannot open agent state"):
        AgentState(path)


def test_a_version_1_file_gains_the_trigger_keys_and_keeps_its_facts(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (name, value) VALUES ('user', 'alice')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    state = AgentState(path)
    assert state.get("user") == "alice" and state.used_trigger_keys() == set()
    state.close()
    assert _version_and_tables(path) == (SCHEMA_VERSION, TABLES)


def test_trigger_keys_are_kept_for_a_while_then_forgotten(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    week = timedelta(days=7)
    state.use_trigger_key("nonce:a", start, week)
    state.use_trigger_key("nonce:b", start + timedelta(days=6), week)
    assert state.used_trigger_keys() == {"nonce:a", "nonce:b"}
    state.use_trigger_key("nonce:c", start + week + timedelta(seconds=1), week)
    assert state.used_trigger_keys() == {"nonce:b", "nonce:c"}
    state.close()
