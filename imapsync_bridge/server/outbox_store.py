"""The outgoing queue of the hosted store (patent FIG. 12's "outgoing sync queue").

A mixin of :class:`.store.PhoneStore` (same connection, lock and transactions), kept in
its own module so the store stays readable. It implements :class:`.store_api.OutboxStore`
(the phone service), :class:`.store_api.RelayStore` (send now through ``[relay]``) and the
delivery half of :class:`.store_api.SyncStore` (send via the desktop); their docstrings
are the contract.

States (``outbox.state``, what the phone sees)::

    send now:      queued ─relay claims─▶ claimed ─250─▶ sent        (5xx ▶ failed)
    via desktop:   queued ─snapshot─▶ claimed ─agent: 250─▶ submitted ─in Sent─▶ sent
                                                                     (5xx/refused ▶ failed)
    deferred (4xx, connection): back to queued with ``next_attempt`` = now + backoff

Every transition is one ``UPDATE … WHERE state IN (allowed) RETURNING``: a repeated or
late report (the agent resends after a crash) changes nothing, and a message that is
``sent`` or ``failed`` never moves again. The ``Undelivered:`` notice of a failed message
is stored in the same transaction as the failure, by the inbound path (so the desktop
inbox gets it too, once).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from imapsync_bridge.errors import StoreError
from imapsync_bridge.model import message_key
from imapsync_bridge.server import mailbox
from imapsync_bridge.server import store_schema as schema
from imapsync_bridge.server.store_api import NoSuchMessage
from imapsync_bridge.server.store_schema import OutgoingMessage
from imapsync_bridge.sync.outgoing import retry_delay

_COLUMNS = (
    "user_name, id, message_id, via_desktop, sender, recipients, subject, from_addr, date, state,"
    " reason, attempts, filed"
)
OPEN_STATES = ("queued", "claimed", "submitted")
REPORTS = ("submitted", "sent", "failed", "deferred", "filed")
# Which states each report may move a message from (anything else: no change).
_FROM: dict[str, tuple[str, ...]] = {
    "submitted": ("queued", "claimed"),
    "sent": ("queued", "claimed", "submitted"),
    "failed": ("queued", "claimed", "submitted"),
    "deferred": ("queued", "claimed"),
}


def _row(row: tuple[Any, ...], raw: bytes | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        user=row[0], id=row[1], message_id=row[2], via_desktop=bool(row[3]), sender=row[4],
        recipients=json.loads(row[5]), subject=row[6], from_addr=row[7], date=row[8],
        state=row[9], reason=row[10], attempts=row[11], filed=bool(row[12]), raw=raw,
    )  # fmt: skip


class OutboxTables:
    """The outgoing queue's methods; mixed into :class:`.store.PhoneStore`."""

    if TYPE_CHECKING:
        _clock: Any

        def _tx(
            self, write: bool = True, durable: bool = True
        ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _now(self) -> str: ...

        def _require_user(self, conn: sqlite3.Connection, user: str) -> tuple[Any, ...]: ...

    def _at(self, moment: datetime) -> str:
        return schema.stamp(moment)

    # --- the phone service ------------------------------------------------------------

    def queue_outgoing(
        self,
        user: str,
        message_id: str,
        via_desktop: bool,
        sender: str,
        recipients: list[str],
        raw: bytes,
    ) -> tuple[OutgoingMessage, bool]:
        """Queue a message; (the row, True) — or (the held row, False) when the user's
        queue already has this Message-ID (a client's retry: not queued twice)."""
        if not message_id or not isinstance(raw, bytes) or not recipients:
            raise StoreError("bad outgoing message: want a Message-ID, recipients and bytes")
        subject, from_addr = schema.parse_summary(raw)
        with self._tx() as conn:
            self._require_user(conn, user)
            now = self._now()
            rows = conn.execute(
                "INSERT INTO outbox (user_name, message_id, via_desktop, sender, recipients,"
                " subject, from_addr, created, date, raw, state, next_attempt)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)"
                f" ON CONFLICT (user_name, message_id) DO NOTHING RETURNING {_COLUMNS}",
                (user, message_id, int(via_desktop), sender, json.dumps(recipients), subject,
                 from_addr, now, schema.date_text(self._clock()), raw, now),
            ).fetchall()  # fmt: skip
            if rows:
                return _row(rows[0]), True
            held = conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE user_name = ? AND message_id = ?",
                (user, message_id),
            ).fetchone()
        return _row(held), False

    def list_outgoing(self, user: str, sent: bool) -> list[OutgoingMessage]:
        """``sent=True``: the phone's Sent (state sent), else its outbox; newest first."""
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE user_name = ?"
                f" AND (state = 'sent') = ? ORDER BY id DESC",
                (user, int(sent)),
            ).fetchall()
        return [_row(r) for r in rows]

    def get_outgoing(self, user: str, id: int) -> OutgoingMessage:
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            row = conn.execute(
                f"SELECT {_COLUMNS}, raw FROM outbox WHERE user_name = ? AND id = ?",
                (user, mailbox.message_id_arg(id)),
            ).fetchone()
        if row is None:
            raise NoSuchMessage(f"no outgoing message {id}")
        return _row(row[:-1], bytes(row[-1]))

    # --- send now: the relay ------------------------------------------------------------

    def claim_for_relay(
        self, user: str | None = None, id: int | None = None
    ) -> list[OutgoingMessage]:
        """Take due send-now messages (one user's, one id, or all) for the relay: queued →
        claimed, in one statement, so two processes never take the same message."""
        where = ["via_desktop = 0", "state = 'queued'", "next_attempt <= ?"]
        args: list[Any] = []
        with self._tx(write=False) as conn:  # the common case, nothing due: no write lock
            due = conn.execute(
                "SELECT 1 FROM outbox WHERE via_desktop = 0 AND state = 'queued'"
                " AND next_attempt <= ? LIMIT 1",
                (self._now(),),
            ).fetchone()
        if due is None:
            return []
        with self._tx() as conn:
            now = self._now()
            args.append(now)
            if user is not None:
                where.append("user_name = ?")
                args.append(user)
            if id is not None:
                where.append("id = ?")
                args.append(id)
            rows = conn.execute(
                f"UPDATE outbox SET state = 'claimed', claimed_at = ?, in_data = 0"
                f" WHERE {' AND '.join(where)} RETURNING {_COLUMNS}, raw",
                [now, *args],
            ).fetchall()
        return [_row(r[:-1], bytes(r[-1])) for r in sorted(rows, key=lambda r: r[1])]

    def relay_in_data(self, id: int) -> None:
        """Record, durably, that the relay is about to send DATA for this message."""
        with self._tx() as conn:
            conn.execute("UPDATE outbox SET in_data = 1 WHERE id = ? AND state = 'claimed'", (id,))

    def recover_relay_claims(self, older_than: timedelta) -> tuple[int, int]:
        """Claims left by a relay that died: those that never reached DATA go back to
        queued; those that did are taken as sent (never sent twice). Returns the counts."""
        with self._tx() as conn:
            cutoff = self._at(self._clock() - older_than)
            requeued = conn.execute(
                "UPDATE outbox SET state = 'queued', claimed_at = NULL WHERE via_desktop = 0"
                " AND state = 'claimed' AND claimed_at < ? AND in_data = 0 RETURNING id",
                (cutoff,),
            ).fetchall()
            unsure = conn.execute(
                "UPDATE outbox SET state = 'sent', reason = ? WHERE via_desktop = 0"
                " AND state = 'claimed' AND claimed_at < ? AND in_data = 1 RETURNING id",
                ("unconfirmed: the relay stopped after sending the data", cutoff),
            ).fetchall()
        return len(requeued), len(unsure)

    # --- both paths: an outcome ---------------------------------------------------------

    def record_outcome(
        self, user: str, id: int, state: str, reply: str, notice: bytes | None = None
    ) -> bool:
        """Move a message to ``state`` (``submitted``, ``sent``, ``failed``, ``deferred``
        = back to queued after a backoff, ``filed`` = its desktop Sent copy exists) with
        the server's reply; True when it changed. A ``failed`` that changes stores
        ``notice`` (the ``Undelivered:`` message) in the phone inbox, once."""
        if state not in REPORTS:
            raise StoreError(f"bad outgoing state {state!r}")
        with self._tx() as conn:
            window = self._require_user(conn, user)[3]
            now = self._now()
            if state == "filed":
                rows = conn.execute(
                    "UPDATE outbox SET filed = 1 WHERE user_name = ? AND id = ? AND filed = 0"
                    " RETURNING id",
                    (user, id),
                ).fetchall()
                return bool(rows)
            allowed = _FROM[state]
            marks = ", ".join("?" for _ in allowed)
            if state == "deferred":
                rows = conn.execute(
                    "UPDATE outbox SET state = 'queued', attempts = attempts + 1, reason = ?,"
                    " claimed_at = NULL, in_data = 0 WHERE user_name = ? AND id = ?"
                    f" AND state IN ({marks}) RETURNING attempts",
                    (reply, user, id, *allowed),
                ).fetchall()
                if rows:
                    later = self._clock() + timedelta(seconds=retry_delay(rows[0][0]))
                    conn.execute(
                        "UPDATE outbox SET next_attempt = ? WHERE id = ?", (self._at(later), id)
                    )
                return bool(rows)
            rows = conn.execute(
                f"UPDATE outbox SET state = ?, reason = ? WHERE user_name = ? AND id = ?"
                f" AND state IN ({marks}) RETURNING id",
                (state, reply if state == "failed" else None, user, id, *allowed),
            ).fetchall()
            if rows and state == "failed" and notice is not None:
                key, message_id = message_key(
                    notice.split(b"\r\n\r\n", 1)[0] + b"\r\n", len(notice)
                )
                mailbox.store_inbound(
                    conn, user, window, key, message_id, notice, now,
                    schema.date_text(self._clock()),
                )  # fmt: skip
            return bool(rows)

    # --- via the desktop: the sync listener ---------------------------------------------

    def claim_deliveries(self, user: str, limit: int, max_bytes: int) -> list[OutgoingMessage]:
        """Due via-desktop messages for the user's agent, oldest first, at most ``limit``
        and about ``max_bytes`` of raw bytes (always at least one): queued ones become
        claimed; claimed and submitted ones are offered again (the agent's own record,
        keyed by Message-ID, makes that harmless)."""
        with self._tx() as conn:
            self._require_user(conn, user)
            now = self._now()
            rows = conn.execute(
                f"SELECT {_COLUMNS}, length(raw) FROM outbox WHERE user_name = ?"
                " AND via_desktop = 1 AND state IN ('queued', 'claimed', 'submitted')"
                " AND next_attempt <= ? ORDER BY id LIMIT ?",
                (user, now, limit),
            ).fetchall()
            chosen: list[int] = []
            total = 0
            for row in rows:
                if chosen and total + row[-1] > max_bytes:
                    break
                chosen.append(row[1])
                total += row[-1]
            if not chosen:
                return []
            marks = ", ".join("?" for _ in chosen)
            conn.execute(
                f"UPDATE outbox SET state = 'claimed', claimed_at = ? WHERE state = 'queued'"
                f" AND id IN ({marks})",
                (now, *chosen),
            )
            out = conn.execute(
                f"SELECT {_COLUMNS}, raw FROM outbox WHERE id IN ({marks}) ORDER BY id", chosen
            ).fetchall()
        return [_row(r[:-1], bytes(r[-1])) for r in out]

    def sent_to_file(self, user: str, limit: int) -> list[OutgoingMessage]:
        """Send-now messages sent but not yet filed in the desktop Sent folder."""
        with self._tx(write=False) as conn:
            self._require_user(conn, user)
            rows = conn.execute(
                f"SELECT {_COLUMNS}, raw FROM outbox WHERE user_name = ? AND via_desktop = 0"
                " AND state = 'sent' AND filed = 0 ORDER BY id LIMIT ?",
                (user, limit),
            ).fetchall()
        return [_row(r[:-1], bytes(r[-1])) for r in rows]
