"""The phone mailbox's rows: what each desktop op and phone-user change does to them.

Functions over a connection inside the caller's transaction (:class:`.store.PhoneStore`
owns transactions, users and the public contract); no commit happens here.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from imapsync_bridge.errors import StoreError
from imapsync_bridge.model import INBOX, TRASH
from imapsync_bridge.server import store_schema as schema
from imapsync_bridge.server.store_api import NoSuchMessage
from imapsync_bridge.server.store_schema import Delivery, PhoneMessage

FOLDERS = (INBOX, TRASH)
MIN_TRASH_CAPACITY = 10
MESSAGE_COLUMNS = (
    "id, msg_key, message_id, folder, seen, flagged, internaldate, subject, from_addr, size, dirty"
)

PHONE_CHANGES: dict[str, tuple[str, object]] = {
    "trash": ("folder", TRASH),
    "restore": ("folder", INBOX),
    "seen": ("seen", 1),
    "unseen": ("seen", 0),
    "flag": ("flagged", 1),
    "unflag": ("flagged", 0),
}


def phone_change(conn: sqlite3.Connection, user: str, id: int, kind: str, now: str) -> bool:
    """One phone-user change and its phone action; False when it changes nothing.

    The changing statement is also the check (``WHERE column <> new … RETURNING``): no
    value read earlier decides, so concurrent writers cannot both log the same change.
    """
    if kind == "destroy":
        rows = conn.execute(
            "DELETE FROM messages WHERE user_name = ? AND id = ? RETURNING msg_key", (user, id)
        ).fetchall()
    else:
        column, value = PHONE_CHANGES[kind]
        if column == "folder":
            rows = conn.execute(
                "UPDATE messages SET folder = ?, dirty = 1, trashed_at = ?"
                " WHERE user_name = ? AND id = ? AND folder <> ? RETURNING msg_key",
                (value, now if kind == "trash" else None, user, id, value),
            ).fetchall()
        else:
            rows = conn.execute(
                f"UPDATE messages SET {column} = ?, dirty = 1"
                f" WHERE user_name = ? AND id = ? AND {column} <> ? RETURNING msg_key",
                (value, user, id, value),
            ).fetchall()
        if not rows and exists(conn, user, id):
            return False
    if not rows:
        raise NoSuchMessage(f"no message {id}")
    conn.execute(
        "INSERT INTO phone_actions (user_name, kind, msg_key, created) VALUES (?, ?, ?, ?)",
        (user, kind, rows[0][0], now),
    )
    return True


def exists(conn: sqlite3.Connection, user: str, id: int) -> bool:
    return (
        conn.execute("SELECT 1 FROM messages WHERE user_name = ? AND id = ?", (user, id)).fetchone()
        is not None
    )


def apply_op(conn: sqlite3.Connection, user: str, op: dict[str, Any], now: str) -> None:
    """One desktop op inside the caller's transaction (no action, no dirty mark)."""
    kind, key = op["kind"], op["key"]
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
    row = conn.execute(
        "SELECT id, folder FROM messages WHERE user_name = ? AND msg_key = ?", (user, key)
    ).fetchone()
    if kind == "put":
        folder = check_folder(op.get("folder", INBOX))
        seen, flagged = flag_value(op["seen"]), flag_value(op["flagged"])
        if row is not None:
            set_folder(conn, row, folder, now)
            conn.execute(
                "UPDATE messages SET seen = ?, flagged = ? WHERE id = ?", (seen, flagged, row[0])
            )
            return
        if conn.execute(
            "SELECT 1 FROM phone_actions WHERE user_name = ? AND msg_key = ? AND kind = 'destroy'",
            (user, key),
        ).fetchone():
            return  # the phone user destroyed it; that wins over a late put
        raw = op["raw"]
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise TypeError("raw must be bytes")
        raw = bytes(raw)
        subject, from_addr = schema.parse_summary(raw)
        conn.execute(
            "INSERT INTO messages (user_name, msg_key, message_id, folder, seen, flagged,"
            " internaldate, subject, from_addr, size, raw, trashed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user,
                key,
                op.get("message_id"),
                folder,
                seen,
                flagged,
                schema.date_text(op["internaldate"]),
                subject,
                from_addr,
                len(raw),
                raw,
                now if folder == TRASH else None,
            ),
        )
    elif kind == "flags":
        if row is not None:
            set_flags_unless_changed(conn, user, row[0], key, op)
    elif kind == "move":
        folder = check_folder(op["folder"])
        if row is not None:
            set_folder(conn, row, folder, now)
    elif kind == "evict":
        if row is not None and not changed_by_phone_since(conn, user, key, op.get("since")):
            conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
    elif kind == "destroy":
        if row is not None:
            conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
    else:
        raise ValueError(f"unknown op kind {kind!r}")


#: The phone actions that change each flag column.
FLAG_ACTIONS = {"seen": ("seen", "unseen"), "flagged": ("flag", "unflag")}


def set_flags_unless_changed(
    conn: sqlite3.Connection, user: str, id: int, key: str, op: dict[str, Any]
) -> None:
    """Compare-and-set of each flag the op names: the agent planned from the snapshot
    at phone action ``since``; a flag the phone user changed after that is newer than
    the plan and stays (the next session carries it to the desktop)."""
    for column, kinds in FLAG_ACTIONS.items():
        if op[column] is None:
            continue
        value = flag_value(op[column])
        if not changed_by_phone_since(conn, user, key, op["since"], kinds):
            conn.execute(f"UPDATE messages SET {column} = ? WHERE id = ?", (value, id))


def changed_by_phone_since(
    conn: sqlite3.Connection,
    user: str,
    key: str,
    since: object,
    kinds: tuple[str, ...] | None = None,
) -> bool:
    """Whether the phone user changed the message (in one of ``kinds``, else in any way)
    after phone action ``since``: then it is newer than the agent's plan. ``None``: the
    op is unconditional."""
    if since is None:
        return False
    if isinstance(since, bool) or not isinstance(since, int):
        raise TypeError(f"since must be an integer, not {since!r}")
    query = "SELECT 1 FROM phone_actions WHERE user_name = ? AND msg_key = ? AND seq > ?"
    args: list[object] = [user, key, since]
    if kinds:
        query += f" AND kind IN ({', '.join('?' for _ in kinds)})"
        args += kinds
    return conn.execute(query + " LIMIT 1", args).fetchone() is not None


def set_folder(conn: sqlite3.Connection, row: tuple, folder: str, now: str) -> None:
    if row[1] != folder:
        conn.execute(
            "UPDATE messages SET folder = ?, trashed_at = ? WHERE id = ?",
            (folder, now if folder == TRASH else None, row[0]),
        )


def collect_garbage(conn: sqlite3.Connection, user: str) -> int:
    window = conn.execute("SELECT window_size FROM users WHERE name = ?", (user,)).fetchone()[0]
    capacity = max(window, MIN_TRASH_CAPACITY)
    total = conn.execute(
        "SELECT COUNT(*) FROM messages WHERE user_name = ? AND folder = 'trash'", (user,)
    ).fetchone()[0]
    if total <= capacity:
        return 0
    victims = conn.execute(
        "SELECT id FROM messages WHERE user_name = ? AND folder = 'trash' AND dirty = 0"
        " ORDER BY trashed_at, id LIMIT ?",
        (user, total - capacity),
    ).fetchall()
    conn.executemany("DELETE FROM messages WHERE id = ?", victims)
    return len(victims)


def phone_message(row: tuple, raw: bytes | None = None) -> PhoneMessage:
    (id_, key, message_id, folder, seen, flagged, date, subject, from_addr, size, dirty) = row
    return PhoneMessage(
        id_,
        key,
        message_id,
        folder,
        bool(seen),
        bool(flagged),
        date,
        subject,
        from_addr,
        size,
        bool(dirty),
        raw,
    )


def check_folder(folder: object) -> str:
    if folder not in FOLDERS:
        raise StoreError(f"bad folder {folder!r}: want inbox or trash")
    return str(folder)


def flag_value(value: object) -> int:
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise TypeError(f"flag must be a boolean, not {value!r}")
    return int(value)


def message_id_arg(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NoSuchMessage(f"no message {value}")
    return value


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def one_line(context: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{context}: {text}"


def store_inbound(
    conn: sqlite3.Connection,
    user: str,
    window: int,
    key: str,
    message_id: str | None,
    raw: bytes,
    now: str,
    internaldate: str,
) -> Delivery:
    """Store one inbound copy and keep the window (:meth:`.store_api.InboundStore.deliver`),
    inside the caller's transaction: SMTP in, and the phone's ``Undelivered:`` notices.

    The duplicate check is the insert itself (``ON CONFLICT DO NOTHING RETURNING``);
    the eviction picks its victims in the statement that deletes them.
    """
    subject, from_addr = schema.parse_summary(raw)
    if conn.execute(
        "SELECT 1 FROM phone_actions WHERE user_name = ? AND msg_key = ? AND kind = 'destroy'",
        (user, key),
    ).fetchone():
        return Delivery(None, duplicate=True, evicted=0)
    inserted = conn.execute(
        "INSERT INTO messages (user_name, msg_key, message_id, folder, seen, flagged,"
        " internaldate, subject, from_addr, size, raw, dirty, inbound)"
        " VALUES (?, ?, ?, 'inbox', 0, 0, ?, ?, ?, ?, ?, 1, 1)"
        " ON CONFLICT (user_name, msg_key) DO NOTHING RETURNING id",
        (user, key, message_id, internaldate, subject, from_addr, len(raw), raw),
    ).fetchall()
    if not inserted:
        held = conn.execute(
            "SELECT id FROM messages WHERE user_name = ? AND msg_key = ?", (user, key)
        ).fetchone()
        return Delivery(held[0] if held else None, duplicate=True, evicted=0)
    conn.execute(
        "INSERT INTO phone_actions (user_name, kind, msg_key, created) VALUES (?, 'restore', ?, ?)",
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
