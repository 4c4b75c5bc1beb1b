"""The hosted store's interface, split by role (in the style of mbsync's ``driver.h``).

Narrow :class:`typing.Protocol` classes; :class:`.store.PhoneStore` (SQLite)
implements all of them, and a later PostgreSQL backend implements the same. Callers take
the narrowest one they need: the ``server add-user`` / ``pair-code`` commands an
:class:`AccountStore` (which also keeps the trigger secret made at pairing), the sync
listener a :class:`SyncStore` (plus the pairing half of :class:`AccountStore`), the
phone service (:mod:`.phone`) a :class:`MailboxStore`, the inbound SMTP listener
(:mod:`.smtp_in`) an :class:`InboundStore`.

Rules every implementation keeps:

* Every method is one transaction: it applies fully or not at all, and holds no state
  between calls (several server processes may share one database).
* No read-modify-write across statements: a change that depends on a row's current value
  decides in the statement that changes it (``UPDATE … WHERE … RETURNING``,
  ``DELETE … RETURNING``, ``INSERT … ON CONFLICT … RETURNING``), so it stays right under
  concurrent writers without relying on SQLite's single writer.
* Every failure is a :class:`StoreError` (or one of the subclasses below) with a
  one-line message. Whether a retry helps:

  ========================  ====================================================  ======
  error                     meaning                                               retry?
  ========================  ====================================================  ======
  :class:`NoSuchUser`       the user name is unknown                              no
  :class:`NoSuchMessage`    the phone id is unknown *or another user's* (the two   no
                            look the same on purpose)
  :class:`StoreConflict`    another writer changed the same state first; nothing  yes
                            was stored
  ``StoreError("bad …")``   an argument out of contract                           no
  ``StoreError("user       a duplicate                                           no
  exists…")`` / ``("…
  already registered…")``
  other ``StoreError``      the database failed: locked past the busy timeout     maybe
                            (retry helps), disk full, corrupt (it does not)
  ========================  ====================================================  ======
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from imapsync_bridge.errors import StoreError, TransientError
from imapsync_bridge.server.store_schema import (
    Delivery,
    PhoneAction,
    PhoneMessage,
    Snapshot,
    SyncRecord,
    User,
)

__all__ = [
    "AccountStore",
    "InboundStore",
    "MailboxStore",
    "NoSuchMessage",
    "NoSuchUser",
    "StoreConflict",
    "SyncStore",
]


class NoSuchUser(StoreError):
    """``no such user: 'NAME'``: a per-user method got an unknown user. Retry: no."""


class NoSuchMessage(StoreError):
    """``no message N``: the phone id does not exist or belongs to another user (never
    told apart, so one user cannot probe another's ids). Retry: no."""


class StoreConflict(StoreError, TransientError):
    """Another writer changed the same state between this call's start and its commit;
    the transaction was rolled back and nothing changed. Retry: yes, the whole call."""


class AccountStore(Protocol):
    """Users, pairing codes and agent certificates (the admin and pairing role)."""

    def add_user(self, name: str, address: str, desktop_address: str, window: int) -> User:
        """Create a user with an empty mailbox. Raises ``StoreError("bad …")`` for a name
        outside ``[a-z0-9._-]{1,64}``, a window outside 1..10000 or an empty/over-long
        address; ``StoreError("user exists: NAME")``. No retry helps either."""
        ...

    def get_user(self, name: str) -> User:
        """The user's record. Raises :class:`NoSuchUser`."""
        ...

    def set_pairing_code(self, user: str, token_hash: str, ttl_seconds: int = 86400) -> None:
        """Store the sha256 hex of a one-time code valid ``ttl_seconds``, replacing the
        user's unused one. Raises :class:`NoSuchUser`, ``StoreError("bad …")``."""
        ...

    def consume_pairing_code(self, token_hash: str) -> str | None:
        """Use up a code: its user if it was known and unexpired, else None (also for a
        second use; of two concurrent uses exactly one gets the user). Expired codes are
        swept on the way. Raises only database errors."""
        ...

    def register_certificate(
        self, user: str, serial: int, not_after: datetime | str, fingerprint: str | None = None
    ) -> None:
        """Record the user's new agent certificate, revoke every earlier one and reset
        ``last_seq`` to 0 (a fresh agent numbers its ops from 1); messages and pending
        phone actions are kept. Raises :class:`NoSuchUser`, ``StoreError("bad …")``,
        ``StoreError("certificate serial already registered: HEX")``."""
        ...

    def user_for_certificate(self, serial: int) -> str | None:
        """The user of a registered, unrevoked certificate, else None (expiry is TLS's
        job). Raises only database errors."""
        ...

    def set_trigger_secret(self, user: str, phrase: str, key: bytes) -> None:
        """Store the user's trigger secret (the sync phrase and the 32-byte token key),
        replacing the one of an earlier pairing. Raises :class:`NoSuchUser`,
        ``StoreError("bad …")``."""
        ...

    def trigger_secret(self, user: str) -> tuple[str, bytes] | None:
        """(sync phrase, token key) of the user's current pairing, None before the first
        (then no trigger mail can be sent). The trigger mail goes From the user's
        ``address`` To its ``desktop_address`` (:meth:`get_user`). Raises
        :class:`NoSuchUser`."""
        ...


class SyncStore(Protocol):
    """What the sync listener does for a connected agent (patent FIGs. 3-10)."""

    def last_seq(self, user: str) -> int:
        """The highest desktop op seq applied. Raises :class:`NoSuchUser`."""
        ...

    def apply_ops(self, user: str, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """Apply desktop ops once each, the batch in one transaction. Ops at or below
        ``last_seq`` are skipped (a resent batch); the rest must increase. Ops on a key
        the phone no longer holds are no-ops that still advance ``last_seq``; a ``put``
        for a key with a pending phone ``destroy`` is ignored (the user's destroy wins).
        Desktop ops never log phone actions nor set ``dirty``. Raises
        :class:`NoSuchUser`; ``StoreError("bad op: …")`` / ``("bad seq …")`` (nothing of
        the batch stored, no retry helps); :class:`StoreConflict` when another session
        applied ops for the user meanwhile (retry: resend the batch)."""
        ...

    def snapshot(self, user: str) -> Snapshot:
        """The phone's state for planning: window, every message, the keys of pending
        phone ``destroy``/``restore`` actions and the highest pending action seq.
        Raises :class:`NoSuchUser`."""
        ...

    def pending_actions(self, user: str, after_seq: int = 0) -> list[PhoneAction]:
        """Unacknowledged phone actions with ``seq > after_seq``, oldest first (the
        general server-to-agent action list). Raises :class:`NoSuchUser`."""
        ...

    def raw_message(self, user: str, key: str) -> bytes | None:
        """The stored RFC 5322 bytes of a key, None when the phone lacks it. Raises
        :class:`NoSuchUser`."""
        ...

    def ack_actions(self, user: str, up_to_seq: int) -> int:
        """Drop phone actions with ``seq <= up_to_seq``, clear ``dirty`` where nothing is
        pending, run the trash garbage collector (``up_to_seq=0``: only the GC); returns
        how many trash entries it dropped. Idempotent. Raises :class:`NoSuchUser`,
        ``StoreError("bad seq …")``."""
        ...

    def record_sync(self, user: str, summary: dict[str, Any]) -> None:
        """Record a completed session's time and JSON summary (not fsynced on its own).
        Raises :class:`NoSuchUser`, ``StoreError("bad sync summary: …")``."""
        ...

    def take_sync_request(self, user: str) -> str | None:
        """Remove and return the pending phone sync request (its time), None when there is
        none; of two concurrent takers exactly one gets it. Raises :class:`NoSuchUser`."""
        ...


class ListenerStore(AccountStore, SyncStore, Protocol):
    """What the sync listener needs: pairing (accounts and certificates) and the agent's
    sync; nothing of the phone user's mailbox operations."""


class MailboxStore(Protocol):
    """The phone user's view: the bounded mailbox, its changes and sync requests."""

    def get_user(self, name: str) -> User:
        """The user's record (window, addresses). Raises :class:`NoSuchUser`."""
        ...

    def list_folder(self, user: str, folder: str) -> list[PhoneMessage]:
        """``inbox`` or ``trash``, newest first by internaldate; equal dates keep the
        agent's put order (as the desktop lists them). ``raw`` is not filled. Raises
        :class:`NoSuchUser`, ``StoreError("bad folder …")``."""
        ...

    def get(self, user: str, id: int) -> PhoneMessage:
        """One message with ``raw``. Raises :class:`NoSuchUser`, :class:`NoSuchMessage`."""
        ...

    def trash(self, user: str, id: int) -> bool:
        """Move to the phone trash and log a ``trash`` action for the desktop, in one
        transaction; False (and no action) when it already was there. The same holds for
        :meth:`restore`, :meth:`set_seen`, :meth:`set_flagged`. Raises
        :class:`NoSuchUser`, :class:`NoSuchMessage`; no retry helps."""
        ...

    def restore(self, user: str, id: int) -> bool:
        """Move back to the inbox; logs ``restore``. As :meth:`trash`."""
        ...

    def destroy(self, user: str, id: int) -> bool:
        """Delete for good and leave the key as a ``destroy`` action (a tombstone) until
        the desktop acknowledges it; always True. Raises as :meth:`trash`."""
        ...

    def set_seen(self, user: str, id: int, seen: bool) -> bool:
        """Set ``\\Seen``; logs ``seen``/``unseen``. As :meth:`trash`."""
        ...

    def set_flagged(self, user: str, id: int, flagged: bool) -> bool:
        """Set ``\\Flagged``; logs ``flag``/``unflag``. As :meth:`trash`."""
        ...

    def counts(self, user: str) -> dict[str, int]:
        """``{"inbox", "trash", "pending_actions"}`` counts. Raises :class:`NoSuchUser`."""
        ...

    def last_sync(self, user: str) -> SyncRecord | None:
        """When the desktop last completed a sync, and its summary; None before the first.
        Raises :class:`NoSuchUser`."""
        ...

    def trigger_secret(self, user: str) -> tuple[str, bytes] | None:
        """(sync phrase, token key) for the trigger mail a sync request may send; as
        :meth:`AccountStore.trigger_secret`."""
        ...

    def request_sync(self, user: str) -> str:
        """Record that the phone user asked for a sync (one pending request per user:
        repeated requests merge into the first) and return the pending request's time.
        The server acts on it later (push notice or trigger mail) through
        :meth:`SyncStore.take_sync_request`. Raises :class:`NoSuchUser`."""
        ...


class InboundStore(Protocol):
    """What the inbound SMTP listener needs: find the phone user of a recipient, see
    whether their mailbox takes more, store a message. Nothing else of the mailbox."""

    def users_for_address(self, address: str) -> list[str]:
        """The users whose phone address is ``address`` (compared case-insensitively),
        by name; empty when there is none. Raises only database errors."""
        ...

    def unsynced_count(self, user: str) -> int:
        """How many messages that came in by SMTP the user's phone mailbox holds and the
        desktop has not taken yet (their ``restore`` action is unacknowledged). Raises
        :class:`NoSuchUser`."""
        ...

    def deliver(self, user: str, key: str, message_id: str | None, raw: bytes) -> Delivery:
        """Store ``raw`` unchanged in the user's phone inbox, arrival time now, unread, as
        a message the desktop lacks: it logs a ``restore`` phone action, which makes the
        next sync APPEND it to the desktop inbox (restore beats destroy; a failed APPEND
        keeps the action unacknowledged, so the message stays unsynced until it lands).

        In the same transaction, while the inbox holds more than the window, its oldest
        *synced* messages (not inbound-unsynced, not dirty) are evicted: deleted from the
        phone without an action, which the sync reads as an eviction (the desktop keeps
        its copy). When only unsynced messages are left the inbox may exceed the window
        until the next sync (bounded by ``max_unsynced``, checked by the caller).

        A key the phone already holds (any folder), or whose destroy tombstone is
        pending, is not stored again: ``Delivery.duplicate`` (the sync would map the two
        as one message anyway). Raises :class:`NoSuchUser`; ``StoreError("bad …")`` for
        an empty key or non-bytes ``raw`` (no retry helps); database errors (retry may
        help: nothing was stored)."""
        ...
