"""Schema, migrations, returned row shapes and row-value helpers of the server store.

Kept apart from :mod:`imapsync_bridge.server.store` so the store itself reads as the
contract. Portability notes (for a later PostgreSQL backend):

* Column names avoid SQL keywords (USER and WINDOW are reserved in PostgreSQL):
  ``user_name``, ``window_size``, ``msg_key`` instead of user, window, key.
* Booleans are INTEGER 0/1 with a CHECK; timestamps are fixed-width ISO 8601 UTC text
  (so string order is time order); certificate serials are lowercase hex text (X.509
  serials go up to 159 bits, far past a 64-bit INTEGER).
* Only the DDL below is dialect-specific (``INTEGER PRIMARY KEY AUTOINCREMENT`` would be
  ``BIGINT GENERATED ALWAYS AS IDENTITY``); AUTOINCREMENT is what guarantees that a phone
  id or an action seq is never reused, even after the highest row was deleted.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# The display summary of a stored mail (kept importable from here).
from imapsync_bridge.headers import parse_summary as parse_summary

SCHEMA_VERSION = 4

_SCHEMA_V1 = (
    """
    CREATE TABLE users (
        name            TEXT PRIMARY KEY,
        address         TEXT NOT NULL,
        desktop_address TEXT NOT NULL,
        window_size     INTEGER NOT NULL CHECK (window_size > 0),
        created         TEXT NOT NULL,
        last_seq        INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
        last_sync       TEXT,
        last_summary    TEXT
    )
    """,
    """
    CREATE TABLE pairing_codes (
        token_hash TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        expires    TEXT NOT NULL
    )
    """,
    "CREATE INDEX pairing_codes_user ON pairing_codes (user_name)",
    """
    CREATE TABLE certificates (
        serial      TEXT PRIMARY KEY,
        user_name   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        fingerprint TEXT,
        not_after   TEXT NOT NULL,
        revoked     INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        created     TEXT NOT NULL
    )
    """,
    "CREATE INDEX certificates_user ON certificates (user_name)",
    """
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        user_name   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        msg_key     TEXT NOT NULL,
        message_id  TEXT,
        folder      TEXT NOT NULL CHECK (folder IN ('inbox', 'trash')),
        seen        INTEGER NOT NULL DEFAULT 0 CHECK (seen IN (0, 1)),
        flagged     INTEGER NOT NULL DEFAULT 0 CHECK (flagged IN (0, 1)),
        internaldate TEXT NOT NULL,
        subject     TEXT NOT NULL DEFAULT '',
        from_addr   TEXT NOT NULL DEFAULT '',
        size        INTEGER NOT NULL,
        raw         BLOB NOT NULL,
        trashed_at  TEXT,
        dirty       INTEGER NOT NULL DEFAULT 0 CHECK (dirty IN (0, 1)),
        UNIQUE (user_name, msg_key)
    )
    """,
    "CREATE INDEX messages_folder ON messages (user_name, folder, internaldate)",
    """
    CREATE TABLE phone_actions (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        kind      TEXT NOT NULL CHECK (kind IN
                      ('trash', 'restore', 'destroy', 'seen', 'unseen', 'flag', 'unflag')),
        msg_key   TEXT NOT NULL,
        created   TEXT NOT NULL
    )
    """,
    "CREATE INDEX phone_actions_user ON phone_actions (user_name, msg_key)",
)

# v2: the phone user's pending sync request (one row per user; see PhoneStore.request_sync)
_SCHEMA_V2 = (
    """
    CREATE TABLE sync_requests (
        user_name TEXT PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        requested TEXT NOT NULL
    )
    """,
)

# v3: mail that came in over SMTP (``server/smtp_in.py``). ``inbound`` = 1 while the
# desktop has not taken the message (its ``restore`` phone action is unacknowledged):
# such a message counts against ``max_unsynced`` and is never evicted. Phone addresses
# are looked up case-insensitively at every RCPT TO, hence the expression index.
_SCHEMA_V3 = (
    "ALTER TABLE messages ADD COLUMN inbound INTEGER NOT NULL DEFAULT 0 CHECK (inbound IN (0, 1))",
    "CREATE INDEX messages_inbound ON messages (user_name, inbound)",
    "CREATE INDEX users_address ON users (lower(address))",
)

# v4: the user's trigger secret, made at each pairing (see PhoneStore.set_trigger_secret)
_SCHEMA_V4 = (
    """
    CREATE TABLE trigger_secrets (
        user_name   TEXT PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        phrase      TEXT NOT NULL,
        trigger_key TEXT NOT NULL,
        created     TEXT NOT NULL
    )
    """,
)

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _SCHEMA_V1,
    2: _SCHEMA_V2,
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
}  # target version -> statements


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; the caller holds a write transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"database schema version {version} is newer than this program ({SCHEMA_VERSION})"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {int(target)}")


# --- row shapes returned by the store -------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    address: str
    desktop_address: str
    window: int
    created: str


@dataclass(frozen=True)
class PhoneMessage:
    """A message as the phone user sees it; ``raw`` is filled by :meth:`PhoneStore.get`."""

    id: int
    key: str
    message_id: str | None
    folder: str
    seen: bool
    flagged: bool
    internaldate: str
    subject: str
    from_addr: str
    size: int
    dirty: bool
    raw: bytes | None = None


@dataclass(frozen=True)
class SnapshotMessage:
    id: int
    key: str
    message_id: str | None
    folder: str
    seen: bool
    flagged: bool
    internaldate: str


@dataclass(frozen=True)
class Snapshot:
    window: int
    messages: list[SnapshotMessage]
    destroyed: list[str]  # keys of pending 'destroy' phone actions (tombstones)
    action_seq: int  # highest pending phone action seq, 0 when none
    restored: list[str] = field(default_factory=list)  # keys with a pending 'restore'


@dataclass(frozen=True)
class PhoneAction:
    seq: int
    kind: str
    key: str
    created: str


@dataclass(frozen=True)
class Delivery:
    """What :meth:`.store_api.InboundStore.deliver` did with one copy of an inbound mail."""

    id: int | None  # the stored copy's phone id; for a duplicate the held copy's (None:
    # only a destroy tombstone of the key is left)
    duplicate: bool  # the phone already held this key (or its tombstone): nothing stored
    evicted: int  # synced inbox messages evicted (unmapped, not deleted) to keep the window


@dataclass(frozen=True)
class SyncRecord:
    at: str
    summary: dict[str, Any]


# --- timestamps -------------------------------------------------------------------------


def stamp(moment: datetime) -> str:
    """Fixed-width UTC text with microseconds, for created/expires/trashed_at."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def date_text(value: datetime | str) -> str:
    """An INTERNALDATE as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); naive input is taken as UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise TypeError("internaldate must be an ISO 8601 string or a datetime")
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
