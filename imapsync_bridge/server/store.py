"""The hosted server's SQLite store: users, pairing, certificates, the bounded phone
mailbox, the phone action list and the agent's op sequencing.

Schema, migrations and header parsing live in :mod:`.store_schema`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imapsync_bridge.errors import StoreError
from imapsync_bridge.model import INBOX, TRASH
from imapsync_bridge.server import mailbox
from imapsync_bridge.server import store_schema as schema
from imapsync_bridge.server.store_api import NoSuchMessage, NoSuchUser, StoreConflict
from imapsync_bridge.server.store_schema import (
    Delivery,
    PhoneAction,
    PhoneMessage,
    Snapshot,
    SnapshotMessage,
    SyncRecord,
    User,
)

SYNCHRONOUS = "FULL"  # durable commits: an op is acked only once it is on disk

__all__ = [
    "Delivery",
    "PhoneAction",
    "PhoneMessage",
    "PhoneStore",
    "Snapshot",
    "SnapshotMessage",
    "SyncRecord",
    "User",
]

BUSY_TIMEOUT_SECONDS = 10.0
_USER_NAME = re.compile(r"[a-z0-9._-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class PhoneStore:
    """The hosted store over SQLite: implements :class:`.store_api.AccountStore`,
    :class:`.store_api.SyncStore`, :class:`.store_api.MailboxStore` and
    :class:`.store_api.InboundStore`, whose docstrings
    state each method's contract, errors and whether a retry helps.

    Semantics worth knowing beyond those:

    * Phone-side changes mark the message dirty and append one phone action in the same
      transaction; a change that changes nothing appends nothing and returns False. The
      statement that changes the row decides whether it changes (``UPDATE … WHERE
      column <> new RETURNING``), so two concurrent changes cannot both log an action.
    * Agent ops advance ``last_seq`` by compare-and-set (``UPDATE … WHERE last_seq =
      old RETURNING``): two sessions applying ops for one user cannot both commit; the
      loser gets :class:`.store_api.StoreConflict` and nothing of its batch is stored.
    * Trash garbage collection (after :meth:`ack_actions`): capacity is
      ``max(window, 10)``; while the trash holds more, its oldest *non-dirty* entries (by
      ``trashed_at``, then id) are dropped. Dirty entries are never dropped, so the trash
      may exceed capacity until the desktop acknowledges them. The inbox is never
      collected here: the agent evicts.

    Durability: WAL with ``synchronous=FULL``: an op is acknowledged to the agent after
    its commit, and the agent then forgets it; with NORMAL a power loss could roll back
    that commit and lose the op for good. The cost (one fsync per commit) is small at
    this write rate. Concurrency: one connection, guarded by a lock, usable from any
    thread; other processes (the ``phone`` CLI) may open the same file; writers take the
    lock up front (``BEGIN IMMEDIATE``) and wait up to the busy timeout. Calls block:
    asyncio code runs them in a thread executor, never on the event loop.

    Portability: the SQL is what PostgreSQL also accepts (``RETURNING``, ``ON CONFLICT``,
    ``CASE``); only the DDL in :mod:`.store_schema` and the pragmas are SQLite's. A
    PostgreSQL backend would run each method in REPEATABLE READ and turn serialization
    failures into :class:`.store_api.StoreConflict`, which also covers the op conditions
    that read ``phone_actions`` in a sub-select (``since``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        self.path = str(path)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(mailbox.one_line(f"cannot open {self.path}", exc)) from exc
        try:
            self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            self._conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            with self._tx() as conn:
                schema.migrate(conn)
        except (sqlite3.Error, ValueError, StoreError) as exc:
            self._conn.close()
            raise StoreError(mailbox.one_line(f"cannot open {self.path}", exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PhoneStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ---------------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool = True, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; any exception rolls it back; sqlite3 errors become StoreError.

        ``durable=False``: no fsync of its own (information only, e.g. when the last sync
        ran); the next durable commit carries it to disk.
        """
        with self._lock:
            conn = self._conn
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(mailbox.one_line("database error", exc)) from exc
            finally:
                if not durable:
                    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")

    def _now(self) -> str:
        return schema.stamp(self._clock())

    def _require_user(self, conn: sqlite3.Connection, user: str) -> tuple:
        row = conn.execute(
            "SELECT name, address, desktop_address, window_size, created, last_seq"
            " FROM users WHERE name = ?",
            (user,),
        ).fetchone()
        if row is None:
            raise NoSuchUser(f"no such user: {user!r}")
        return row

    # --- users ----------------------------------------------------------------------

    def add_user(self, name: str, address: str, desktop_address: str, window: int) -> User:
        if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
            raise StoreError(f"bad user name {name!r}: want [a-z0-9._-]{{1,64}}")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 10000:
            raise StoreError(f"bad window {window!r}: want an integer 1..10000")
        for label, value in (("address", address), ("desktop address", desktop_address)):
            if (
                not isinstance(value, str)
                or not value
                or len(value) > 320
                or value != value.strip()
            ):
                raise StoreError(f"bad {label} {value!r}")
        with self._tx() as conn:
            created = self._now()
            inserted = conn.execute(
                "INSERT INTO users (name, address, desktop_address, window_size, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, address, desktop_address, window, created),
            ).fetchall()
            if not inserted:
                raise StoreError(f"user exists: {name}")
        return User(name, address, desktop_address, window, created)

    def get_user(self, name: str) -> User:
        with self._tx(write=False) as conn:
            return User(*self._require_user(conn, name)[:5])

    # --- pairing codes and certificates ---------------------------------------------

    def set_pairing_code(self, user: str, token_hash: str, ttl_seconds: int = 86400) -> None:
        """Store the sha256 hex of a one-time code, replacing the user's unused one."""
        if not isinstance(token_hash, str) or not _SHA256_HEX.fullmatch(token_hash):
            raise StoreError("bad token hash: want 64 lowercase hex digits")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise StoreError(f"bad ttl {ttl_seconds!r}: want a positive integer")
        expires = schema.stamp(self._clock() + timedelta(seconds=ttl_seconds))
        with self._tx() as conn:
            self._require_user(conn, user)
            conn.execute("DELETE FROM pairing_codes WHERE user_name = ?", (user,))
            conn.execute("DELETE FROM pairing_codes WHERE token_hash = ?", (token_hash,))
            conn.execute(
                "INSERT INTO pairing_codes (token_hash, user_name, expires) VALUES (?, ?, ?)",
                (token_hash, user, expires),
            )

    def consume_pairing_code(self, token_hash: str) -> str | None:
        """The code's user if the code is known and unexpired; the code is used up.

        The delete that uses the code up is the read (``DELETE … RETURNING``): of two
        concurrent uses only one gets a row.
        """
        with self._tx() as conn:
            now = self._now()
            rows = conn.execute(
                "DELETE FROM pairing_codes WHERE token_hash = ? RETURNING user_name, expires",
                (token_hash,),
            ).fetchall()
            conn.execute("DELETE FROM pairing_codes WHERE expires <= ?", (now,))
        if not rows or rows[0][1] <= now:
            return None
        return str(rows[0][0])

    def register_certificate(
        self, user: str, serial: int, not_after: datetime | str, fingerprint: str | None = None
    ) -> None:
        """Record the user's new agent certificate; revoke all earlier ones; last_seq = 0."""
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            raise StoreError(f"bad serial {serial!r}: want a non-negative integer")
        try:
            expiry = schema.stamp(
                datetime.fromisoformat(not_after) if isinstance(not_after, str) else not_after
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise StoreError(mailbox.one_line("bad not_after", exc)) from exc
        with self._tx() as conn:
            self._require_user(conn, user)
            hex_serial = mailbox.serial_hex(serial)
            conn.execute(
                "UPDATE certificates SET revoked = 1 WHERE user_name = ? AND revoked = 0",
                (user,),
            )
            inserted = conn.execute(
                "INSERT INTO certificates (serial, user_name, fingerprint, not_after, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING RETURNING serial",
                (hex_serial, user, fingerprint, expiry, self._now()),
            ).fetchall()
            if not inserted:  # raising rolls the revocation back too
                raise StoreError(f"certificate serial already registered: {hex_serial}")
            conn.execute("UPDATE users SET last_seq = 0 WHERE name = ?", (user,))

    def user_for_certificate(self, serial: int) -> str | None:
        """The user of a registered, unrevoked certificate; expiry is checked by TLS."""
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            return None
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT user_name FROM certificates WHERE serial = ? AND revoked = 0",
                (mailbox.serial_hex(serial),),
            ).fetchone()
        return row[0] if row else None

    # --- the trigger secret (made at pairing) ---------------------------------------

    def set_trigger_secret(self, user: str, phrase: str, key: bytes) -> None:
        """Store the user's sync phrase and token key, replacing the earlier pair."""
        if not isinstance(phrase, str) or not 8 <= len(phrase) <= 200:
            raise StoreError("bad sync phrase: want 8..200 characters")
        if not isinstance(key, bytes) or len(key) != 32:
            raise StoreError("bad trigger key: want 32 bytes")
        with self._tx() as conn:
            self._require_user(conn, user)
            conn.execute(
                "INSERT INTO trigger_secrets (user_name, phrase, trigger_key, created)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_name) DO UPDATE SET"
                " phrase = excluded.phrase, trigger_key = excluded.trigger_key,"
                " created = excluded.created",
                (user, phrase, key.hex(), self._now()),
            )

    def trigger_secret(self, user: str) -> tuple[str, bytes] | None:
        """(sync phrase, token key), None before the user's first pairing."""
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            row = conn.execute(
                "SELECT phrase, trigger_key FROM trigger_secrets WHERE user_name = ?", (user,)
            ).fetchone()
        return (str(row[0]), bytes.fromhex(row[1])) if row else None

    # --- agent side -----------------------------------------------------------------

    def last_seq(self, user: str) -> int:
        with self._tx(write=False) as conn:
            return self._require_user(conn, user)[5]

    def apply_ops(self, user: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """Apply a batch of desktop ops in one transaction, each at most once.

        Ops at or below ``last_seq`` are skipped (a resent batch); the rest must come in
        increasing order. A bad op fails the whole batch and nothing of it is stored.
        ``last_seq`` moves by compare-and-set: if another session moved it meanwhile,
        :class:`StoreConflict` and nothing is stored.
        """
        for seq, _op in batch:
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise StoreError(f"bad seq {seq!r}: want a positive integer")
        with self._tx() as conn:
            first = last = self._require_user(conn, user)[5]
            now = self._now()
            for seq, op in batch:
                if seq <= last:
                    continue
                try:
                    mailbox.apply_op(conn, user, op, now)
                except (KeyError, TypeError, ValueError) as exc:
                    raise StoreError(mailbox.one_line("bad op", exc)) from exc
                last = seq
            moved = conn.execute(
                "UPDATE users SET last_seq = ? WHERE name = ? AND last_seq = ? RETURNING name",
                (last, user, first),
            ).fetchall()
            if not moved:
                raise StoreConflict(f"ops for {user!r} were applied concurrently; resend")

    def snapshot(self, user: str) -> Snapshot:
        with self._tx(write=False) as conn:
            window = self._require_user(conn, user)[3]
            rows = conn.execute(
                "SELECT id, msg_key, message_id, folder, seen, flagged, internaldate"
                " FROM messages WHERE user_name = ? ORDER BY id",
                (user,),
            ).fetchall()
            destroyed = conn.execute(
                "SELECT msg_key FROM phone_actions WHERE user_name = ? AND kind = 'destroy'"
                " ORDER BY seq",
                (user,),
            ).fetchall()
            restored = conn.execute(
                "SELECT DISTINCT msg_key FROM phone_actions WHERE user_name = ?"
                " AND kind = 'restore' ORDER BY msg_key",
                (user,),
            ).fetchall()
            top = conn.execute(
                "SELECT MAX(seq) FROM phone_actions WHERE user_name = ?", (user,)
            ).fetchone()[0]
        messages = [
            SnapshotMessage(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6]) for r in rows
        ]
        return Snapshot(
            window, messages, [r[0] for r in destroyed], top or 0, [r[0] for r in restored]
        )

    def pending_actions(self, user: str, after_seq: int = 0) -> list[PhoneAction]:
        """The user's unacknowledged phone actions with seq > after_seq, oldest first."""
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            rows = conn.execute(
                "SELECT seq, kind, msg_key, created FROM phone_actions"
                " WHERE user_name = ? AND seq > ? ORDER BY seq",
                (user, after_seq),
            ).fetchall()
        return [PhoneAction(*row) for row in rows]

    def raw_message(self, user: str, key: str) -> bytes | None:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            row = conn.execute(
                "SELECT raw FROM messages WHERE user_name = ? AND msg_key = ?", (user, key)
            ).fetchone()
        return bytes(row[0]) if row else None

    def ack_actions(self, user: str, up_to_seq: int) -> int:
        """Drop acknowledged phone actions, clear dirty where nothing is pending, run GC.

        Returns how many trash entries the garbage collector dropped.
        """
        if isinstance(up_to_seq, bool) or not isinstance(up_to_seq, int):
            raise StoreError(f"bad seq {up_to_seq!r}: want an integer")
        with self._tx() as conn:
            self._require_user(conn, user)
            conn.execute(
                "DELETE FROM phone_actions WHERE user_name = ? AND seq <= ?", (user, up_to_seq)
            )
            # An inbound message is taken once its restore action is acknowledged.
            conn.execute(
                "UPDATE messages SET dirty = 0, inbound = 0"
                " WHERE user_name = ? AND dirty = 1 AND NOT EXISTS"
                " (SELECT 1 FROM phone_actions a"
                "  WHERE a.user_name = messages.user_name AND a.msg_key = messages.msg_key)",
                (user,),
            )
            return mailbox.collect_garbage(conn, user)

    def record_sync(self, user: str, summary: dict[str, Any]) -> None:
        try:
            text = json.dumps(summary, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(mailbox.one_line("bad sync summary", exc)) from exc
        with self._tx(durable=False) as conn:
            self._require_user(conn, user)
            conn.execute(
                "UPDATE users SET last_sync = ?, last_summary = ? WHERE name = ?",
                (self._now(), text, user),
            )

    def last_sync(self, user: str) -> SyncRecord | None:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            row = conn.execute(
                "SELECT last_sync, last_summary FROM users WHERE name = ?", (user,)
            ).fetchone()
        if row[0] is None:
            return None
        return SyncRecord(row[0], json.loads(row[1]))

    def take_sync_request(self, user: str) -> str | None:
        """Remove and return the pending phone sync request (``DELETE … RETURNING``)."""
        with self._tx() as conn:
            self._require_user(conn, user)
            rows = conn.execute(
                "DELETE FROM sync_requests WHERE user_name = ? RETURNING requested", (user,)
            ).fetchall()
        return str(rows[0][0]) if rows else None

    # --- phone side -----------------------------------------------------------------

    def list_folder(self, user: str, folder: str) -> list[PhoneMessage]:
        """Messages of inbox or trash, newest first by internaldate.

        Equal internaldates keep the order the agent put them in (it pulls newest first,
        as the desktop lists them: higher UID first), so ties list as on the desktop.
        """
        mailbox.check_folder(folder)
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            rows = conn.execute(
                f"SELECT {mailbox.MESSAGE_COLUMNS} FROM messages WHERE user_name = ? AND folder = ?"
                " ORDER BY internaldate DESC, id ASC",
                (user, folder),
            ).fetchall()
        return [mailbox.phone_message(row) for row in rows]

    def get(self, user: str, id: int) -> PhoneMessage:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            row = conn.execute(
                f"SELECT {mailbox.MESSAGE_COLUMNS}, raw FROM messages"
                " WHERE user_name = ? AND id = ?",
                (user, mailbox.message_id_arg(id)),
            ).fetchone()
        if row is None:
            raise NoSuchMessage(f"no message {id}")
        return mailbox.phone_message(row[:-1], bytes(row[-1]))

    def trash(self, user: str, id: int) -> bool:
        return self._phone_change(user, id, "trash")

    def restore(self, user: str, id: int) -> bool:
        return self._phone_change(user, id, "restore")

    def destroy(self, user: str, id: int) -> bool:
        return self._phone_change(user, id, "destroy")

    def set_seen(self, user: str, id: int, seen: bool) -> bool:
        return self._phone_change(user, id, "seen" if seen else "unseen")

    def set_flagged(self, user: str, id: int, flagged: bool) -> bool:
        return self._phone_change(user, id, "flag" if flagged else "unflag")

    def counts(self, user: str) -> dict[str, int]:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            folders = dict(
                conn.execute(
                    "SELECT folder, COUNT(*) FROM messages WHERE user_name = ? GROUP BY folder",
                    (user,),
                ).fetchall()
            )
            pending = conn.execute(
                "SELECT COUNT(*) FROM phone_actions WHERE user_name = ?", (user,)
            ).fetchone()[0]
        return {
            "inbox": folders.get(INBOX, 0),
            "trash": folders.get(TRASH, 0),
            "pending_actions": pending,
        }

    def request_sync(self, user: str) -> str:
        """Record a phone sync request: one row per user in ``sync_requests``; a repeated
        request keeps the first one's time (one upsert, no read first)."""
        with self._tx() as conn:
            self._require_user(conn, user)
            row = conn.execute(
                "INSERT INTO sync_requests (user_name, requested) VALUES (?, ?)"
                " ON CONFLICT (user_name) DO UPDATE SET requested = sync_requests.requested"
                " RETURNING requested",
                (user, self._now()),
            ).fetchone()
        return str(row[0])

    def _phone_change(self, user: str, id: int, kind: str) -> bool:
        """One phone-user change + its action, in one transaction; False if a no-op."""
        with self._tx() as conn:
            self._require_user(conn, user)
            return mailbox.phone_change(conn, user, mailbox.message_id_arg(id), kind, self._now())

    # --- inbound SMTP -----------------------------------------------------------------

    def users_for_address(self, address: str) -> list[str]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT name FROM users WHERE lower(address) = lower(?) ORDER BY name",
                (address,),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def unsynced_count(self, user: str) -> int:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            count: int = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE user_name = ? AND inbound = 1", (user,)
            ).fetchone()[0]
        return count

    def deliver(self, user: str, key: str, message_id: str | None, raw: bytes) -> Delivery:
        """Store one inbound copy and keep the window (see the protocol's docstring).

        The duplicate check is the insert itself (``ON CONFLICT DO NOTHING RETURNING``);
        the eviction picks its victims in the statement that deletes them.
        """
        if not isinstance(key, str) or not key:
            raise StoreError("bad key: want a non-empty string")
        if not isinstance(raw, bytes):
            raise StoreError("bad raw message: want bytes")
        subject, from_addr = schema.parse_summary(raw)
        with self._tx() as conn:
            window = self._require_user(conn, user)[3]
            now = self._now()
            if conn.execute(
                "SELECT 1 FROM phone_actions WHERE user_name = ? AND msg_key = ?"
                " AND kind = 'destroy'",
                (user, key),
            ).fetchone():
                return Delivery(None, duplicate=True, evicted=0)
            inserted = conn.execute(
                "INSERT INTO messages (user_name, msg_key, message_id, folder, seen, flagged,"
                " internaldate, subject, from_addr, size, raw, dirty, inbound)"
                " VALUES (?, ?, ?, 'inbox', 0, 0, ?, ?, ?, ?, ?, 1, 1)"
                " ON CONFLICT (user_name, msg_key) DO NOTHING RETURNING id",
                (user, key, message_id, schema.date_text(self._clock()), subject, from_addr,
                 len(raw), raw),
            ).fetchall()  # fmt: skip
            if not inserted:
                held = conn.execute(
                    "SELECT id FROM messages WHERE user_name = ? AND msg_key = ?", (user, key)
                ).fetchone()
                return Delivery(held[0] if held else None, duplicate=True, evicted=0)
            conn.execute(
                "INSERT INTO phone_actions (user_name, kind, msg_key, created)"
                " VALUES (?, 'restore', ?, ?)",
                (user, key, now),
            )
            evicted = conn.execute(
                "DELETE FROM messages WHERE id IN ("
                " SELECT id FROM messages WHERE user_name = ? AND folder = 'inbox'"
                " AND inbound = 0 AND dirty = 0 ORDER BY internaldate ASC, id DESC"
                # never a negative LIMIT: SQLite reads it as "no limit"
                " LIMIT (SELECT CASE WHEN COUNT(*) > ? THEN COUNT(*) - ? ELSE 0 END"
                "  FROM messages WHERE user_name = ? AND folder = 'inbox')) RETURNING id",
                (user, window, window, user),
            ).fetchall()
        return Delivery(int(inserted[0][0]), duplicate=False, evicted=len(evicted))
