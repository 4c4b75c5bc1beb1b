"""The agent's SQLite state: ledger, outgoing action list, quarantine, and small facts.

Order is the design (journal before acting): a planned phone action is written to the
outgoing list before it is sent and deleted only once the server acknowledged it; the
ledger is replaced in one transaction only when a whole session completed. A crash at
any point leaves the last completed ledger plus a journal of unacknowledged actions,
which the next session resends before it plans anew.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imapsync_bridge.errors import StoreError
from imapsync_bridge.model import Flags, LedgerEntry, QuarantinedMessage, Where

# PRAGMA user_version of the state file. 0 is a new, empty file; each later version has
# its statements in _MIGRATIONS. A file newer than this program is refused (see _migrate).
SCHEMA_VERSION = 3
STATE_FILE = "agent.sqlite3"  # in state_dir
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS ledger (
        key TEXT PRIMARY KEY,
        desktop TEXT NOT NULL,
        phone TEXT NOT NULL,
        seen INTEGER NOT NULL,
        flagged INTEGER NOT NULL,
        uid INTEGER,
        internaldate TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS outgoing (
        seq INTEGER PRIMARY KEY,
        op TEXT NOT NULL,
        raw BLOB
    )""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        key TEXT PRIMARY KEY,
        uid INTEGER,
        reason TEXT NOT NULL,
        since TEXT NOT NULL
    )""",
)
# v2: the once-only keys of trigger mails acted on (see AgentState.use_trigger_key)
_SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS trigger_keys (
        key TEXT PRIMARY KEY,
        used TEXT NOT NULL
    )""",
)
# v3: outgoing messages this agent is delivering (agent/outbox.py), by Message-ID, with
# the step each reached; a row is written before its step is taken and deleted only once
# the server acknowledged the final report.
_SCHEMA_V3 = (
    """CREATE TABLE IF NOT EXISTS deliveries (
        message_id TEXT PRIMARY KEY,
        server_id INTEGER NOT NULL,
        step TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        raw BLOB NOT NULL,
        reply TEXT NOT NULL DEFAULT '',
        updated TEXT NOT NULL
    )""",
)
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


def make_state_dir(path: Path) -> None:
    """The state directory, created when missing; one line, not a traceback, when it
    cannot be (a file in the way, no write permission for the service's user)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the state directory {path}: {exc.strerror}; "
            "`agent check` says what to do"
        ) from None


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the state file to SCHEMA_VERSION in one transaction; refuse a newer one.

    A newer file was written by a newer imapsync-bridge: this one cannot know what its
    tables mean, and writing to it could lose pending actions, so it stops instead.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: agent state version {version} was written by a newer "
                f"imapsync-bridge (this one reads up to version {SCHEMA_VERSION}); "
                "upgrade imapsync-bridge"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={int(target)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass(frozen=True)
class DeliveryRecord:
    """One outgoing message's recorded step (see :mod:`imapsync_bridge.sync.outgoing`)."""

    message_id: str
    server_id: int
    step: str
    sender: str
    recipients: list[str]
    raw: bytes
    reply: str = ""


@dataclass(frozen=True)
class PendingOp:
    seq: int
    op: dict[str, Any]
    raw: bytes | None


class AgentState:
    """One agent's state database (``state_dir/agent.sqlite3``)."""

    def __init__(self, path: Path) -> None:
        make_state_dir(path.parent)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open agent state: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged action must never reappear after a power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            _migrate(self._db, path)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{path}: cannot open agent state: {exc}") from None
        except StoreError:
            self._db.close()
            raise
        self.path = path

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False`` for facts only shown to the user (when the
        last sync ran): no fsync of its own; the next durable commit carries it."""
        try:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: agent state: {exc}") from None
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")

    # -- small facts -----------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    def meta(self) -> dict[str, str]:
        """All small facts at once (one read per session instead of one per fact)."""
        return dict(self._db.execute("SELECT name, value FROM meta").fetchall())

    def get_int(self, name: str, default: int = 0) -> int:
        value = self.get(name)
        return int(value) if value is not None else default

    def set_many(self, values: dict[str, str | int | None], durable: bool = True) -> None:
        with self.transaction(durable) as db:
            self._set_many(db, values)

    @staticmethod
    def _set_many(db: sqlite3.Connection, values: dict[str, str | int | None]) -> None:
        for name, value in values.items():
            if value is None:
                db.execute("DELETE FROM meta WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, str(value)),
                )

    def agent_instance(self) -> str:
        """A random id for this state; a fresh state is a new agent to the server."""
        instance = self.get("agent_instance")
        if instance is None:
            instance = uuid.uuid4().hex
            self.set_many({"agent_instance": instance})
        return instance

    # -- ledger ----------------------------------------------------------------------
    def ledger(self) -> dict[str, LedgerEntry]:
        rows = self._db.execute(
            "SELECT key, desktop, phone, seen, flagged, uid, internaldate FROM ledger"
        )
        return {row[0]: _entry(row) for row in rows}

    def commit_session(
        self,
        ledger: dict[str, LedgerEntry],
        meta: dict[str, str | int | None],
        quarantine: list[QuarantinedMessage],
        acknowledged_up_to: int = 0,
    ) -> None:
        """Replace the ledger and the quarantine, record the session's facts, and retire
        the acknowledged actions, atomically (one commit, one fsync).

        The quarantine lists what this session could not handle; each session tries
        those messages again, so one that became fine drops off by itself.
        """
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        with self.transaction() as db:
            db.execute("DELETE FROM outgoing WHERE seq <= ?", (acknowledged_up_to,))
            db.execute("DELETE FROM quarantine")
            db.executemany(
                "INSERT INTO quarantine (key, uid, reason, since) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                [(q.key, q.uid, q.reason, now) for q in quarantine],
            )
            db.execute("DELETE FROM ledger")
            db.executemany(
                "INSERT INTO ledger (key, desktop, phone, seen, flagged, uid, internaldate) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.key,
                        e.desktop.value,
                        e.phone.value,
                        int(e.flags.seen),
                        int(e.flags.flagged),
                        e.uid,
                        e.internaldate.isoformat() if e.internaldate else None,
                    )
                    for e in ledger.values()
                ],
            )
            self._set_many(db, meta)

    # -- outgoing action list ----------------------------------------------------------
    def journal(self, ops: Iterable[tuple[dict[str, Any], bytes | None]]) -> list[PendingOp]:
        """Give each op the next sequence number and store it before it is sent."""
        pending = []
        with self.transaction() as db:
            seq = self.get_int("next_seq", 1)
            for op, raw in ops:
                db.execute(
                    "INSERT INTO outgoing (seq, op, raw) VALUES (?, ?, ?)",
                    (seq, json.dumps(op), raw),
                )
                pending.append(PendingOp(seq, op, raw))
                seq += 1
            self._set_many(db, {"next_seq": seq})
        return pending

    def pending_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outgoing").fetchone()[0])

    def pending(self) -> list[PendingOp]:
        rows = self._db.execute("SELECT seq, op, raw FROM outgoing ORDER BY seq")
        return [PendingOp(seq, json.loads(op), raw) for seq, op, raw in rows]

    def skip_sequence_past(self, server_last_seq: int) -> None:
        """A restored backup must not reuse numbers the server already applied."""
        if self.get_int("next_seq", 1) <= server_last_seq:
            self.set_many({"next_seq": server_last_seq + 1})

    # -- trigger mails ---------------------------------------------------------------
    def used_trigger_keys(self) -> set[str]:
        """The once-only keys of the trigger mails acted on (kept for a while, see
        :meth:`use_trigger_key`): a mail with one of them is a replay."""
        return {row[0] for row in self._db.execute("SELECT key FROM trigger_keys")}

    def use_trigger_key(self, key: str, at: datetime, keep: timedelta) -> None:
        """Record a trigger's once-only key durably (before its mail is expunged, so a
        crash in between cannot make it count twice) and forget keys older than *keep*."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO trigger_keys (key, used) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET used = excluded.used",
                (key, _utc_text(at)),
            )
            db.execute("DELETE FROM trigger_keys WHERE used < ?", (_utc_text(at - keep),))

    # -- outgoing deliveries -----------------------------------------------------------
    def delivery(self, message_id: str) -> DeliveryRecord | None:
        row = self._db.execute(
            "SELECT message_id, server_id, step, sender, recipients, raw, reply"
            " FROM deliveries WHERE message_id = ?",
            (message_id,),
        ).fetchone()
        return _delivery(row) if row else None

    def deliveries(self) -> list[DeliveryRecord]:
        """Every delivery not yet acknowledged by the server, oldest server id first."""
        rows = self._db.execute(
            "SELECT message_id, server_id, step, sender, recipients, raw, reply"
            " FROM deliveries ORDER BY server_id"
        )
        return [_delivery(row) for row in rows]

    def record_delivery(self, record: DeliveryRecord) -> None:
        """Write a delivery's step durably (FULL fsync): called *before* the step."""
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO deliveries (message_id, server_id, step, sender, recipients, raw,"
                " reply, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id)"
                " DO UPDATE SET step = excluded.step, reply = excluded.reply,"
                " updated = excluded.updated",
                (record.message_id, record.server_id, record.step, record.sender,
                 json.dumps(record.recipients), record.raw, record.reply, now),
            )  # fmt: skip

    def forget_delivery(self, message_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM deliveries WHERE message_id = ?", (message_id,))

    # -- quarantine ------------------------------------------------------------------
    def quarantined(self) -> list[QuarantinedMessage]:
        rows = self._db.execute("SELECT key, uid, reason FROM quarantine ORDER BY since, key")
        return [QuarantinedMessage(key, uid, reason) for key, uid, reason in rows]


def _utc_text(moment: datetime) -> str:
    """Fixed-width UTC text: string order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _delivery(row: tuple[Any, ...]) -> DeliveryRecord:
    message_id, server_id, step, sender, recipients, raw, reply = row
    return DeliveryRecord(
        message_id, server_id, step, sender, json.loads(recipients), bytes(raw), reply
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    key, desktop, phone, seen, flagged, uid, internaldate = row
    return LedgerEntry(
        key=key,
        desktop=Where(desktop),
        phone=Where(phone),
        flags=Flags(bool(seen), bool(flagged)),
        uid=uid,
        internaldate=datetime.fromisoformat(internaldate) if internaldate else None,
    )
