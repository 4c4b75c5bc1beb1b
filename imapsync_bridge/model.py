"""Plain data shared by the agent, the server and the pure sync logic (no I/O here).

A message is known on both sides by its *key*: its Message-ID when it has one, else a
hash of its headers and size (see :func:`message_key`). Keys, not UIDs or phone ids,
are what the sync logic compares, so a UIDVALIDITY change or a re-pairing cannot make
one message look like two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from imapsync_bridge.headers import parse_headers

INBOX = "inbox"
TRASH = "trash"
GONE = "gone"
DESTROYED = "destroyed"

_MESSAGE_ID = re.compile(rb"<[^<>\s]{1,900}>")


class Where(StrEnum):
    """Where one side holds a message."""

    INBOX = INBOX
    TRASH = TRASH
    GONE = GONE  # not held (never had it, evicted from the phone window, dropped by GC)
    DESTROYED = DESTROYED  # the user destroyed it on this side (a tombstone, phone only)


@dataclass(frozen=True)
class Flags:
    seen: bool = False
    flagged: bool = False


@dataclass(frozen=True)
class FlagChange:
    """The flags a sync sets (True) or clears (False); None leaves a flag alone.

    A flag action carries only what the plan changes, never the whole flag state: a
    user who reads a message while a sync is flagging it keeps the read (the lost-update
    race of two-way sync).
    """

    seen: bool | None = None
    flagged: bool | None = None

    @classmethod
    def between(cls, old: Flags, new: Flags) -> FlagChange:
        return cls(
            seen=new.seen if new.seen != old.seen else None,
            flagged=new.flagged if new.flagged != old.flagged else None,
        )

    def applied_to(self, flags: Flags) -> Flags:
        return Flags(
            seen=flags.seen if self.seen is None else self.seen,
            flagged=flags.flagged if self.flagged is None else self.flagged,
        )

    def __bool__(self) -> bool:
        return self.seen is not None or self.flagged is not None


def normalize_message_id(raw: bytes | str | None) -> str | None:
    """The ``<...>`` part of a Message-ID header, or None when there is no usable one."""
    if raw is None:
        return None
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    found = _MESSAGE_ID.search(data)
    if not found:
        return None
    return found.group(0).decode("ascii", "replace")


HASH_KEY_PREFIX = "sha256:"


def message_id_of(key: str) -> str | None:
    """The Message-ID a key stands for, or None for a header-hash key."""
    return None if key.startswith(HASH_KEY_PREFIX) else key


def header_hash_key(header_bytes: bytes, size: int) -> str:
    """Key for a message without a Message-ID: hash of its header block and its size.

    Dovecot keeps the bytes of a message as they were delivered, so the same message
    hashes the same in the inbox, in Trash and after a UIDVALIDITY change.
    """
    digest = hashlib.sha256()
    digest.update(header_bytes.replace(b"\r\n", b"\n"))
    digest.update(str(size).encode())
    return HASH_KEY_PREFIX + digest.hexdigest()[:40]


def message_key(header_bytes: bytes, size: int) -> tuple[str, str | None]:
    """(key, message_id) for a message, from its header block and RFC822 size."""
    msg = parse_headers(header_bytes)
    raw_id = msg.get("Message-ID")
    message_id = normalize_message_id(raw_id.encode("utf-8", "surrogateescape") if raw_id else None)
    if message_id:
        return message_id, message_id
    return header_hash_key(header_bytes, size), None


@dataclass(frozen=True)
class DesktopMessage:
    """One message of the desktop inbox as the agent sees it now."""

    uid: int
    key: str
    internaldate: datetime  # timezone-aware, UTC
    size: int
    flags: Flags
    modseq: int | None = None  # with CONDSTORE: the MODSEQ these flags were read at


@dataclass(frozen=True)
class DesktopFact:
    """Where one known message is on the desktop now, found by the agent."""

    where: Where  # INBOX, TRASH or GONE (expunged = destroyed on the desktop)
    flags: Flags = Flags()
    uid: int | None = None  # its UID in the inbox (or in Trash), when known
    internaldate: datetime | None = None
    modseq: int | None = None  # with CONDSTORE: the MODSEQ the flags were read at


@dataclass(frozen=True)
class PhoneFact:
    """Where one message is in the phone mailbox now (from the server's snapshot)."""

    where: Where  # INBOX, TRASH, GONE or DESTROYED
    flags: Flags = Flags()
    phone_id: int | None = None
    internaldate: datetime | None = None
    restored: bool = False  # the user restored it since the last sync (maybe re-deleted)


@dataclass(frozen=True)
class LedgerEntry:
    """What both sides agreed on for one message at the end of the last completed sync.

    ``desktop`` is INBOX, TRASH or GONE; ``phone`` is INBOX, TRASH or GONE. The ledger is
    what makes an eviction (phone GONE by our own normalization) different from a delete
    (phone TRASH or a DESTROYED tombstone, made by the user).
    """

    key: str
    desktop: Where
    phone: Where
    flags: Flags
    uid: int | None = None
    internaldate: datetime | None = None

    @property
    def state(self) -> str:
        """Human name of the entry, as `agent status` shows it."""
        if self.desktop is Where.INBOX:
            return "mapped" if self.phone is Where.INBOX else "evicted"
        if self.desktop is Where.TRASH:
            return "trashed"
        return "destroyed"


@dataclass(frozen=True)
class MailboxStatus:
    """One desktop mailbox's counts (STATUS, or a SELECT's answer)."""

    uidvalidity: int
    uidnext: int
    messages: int
    highestmodseq: int | None  # None when the server does not offer CONDSTORE


@dataclass(frozen=True)
class DesktopStatus:
    """The inbox's and Trash's counts: what the fast path compares between sessions."""

    inbox: MailboxStatus
    trash: MailboxStatus

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DesktopStatus:
        data = json.loads(text)
        return cls(MailboxStatus(**data["inbox"]), MailboxStatus(**data["trash"]))

    def of(self, where: Where) -> MailboxStatus:
        return self.inbox if where is Where.INBOX else self.trash


@dataclass(frozen=True)
class QuarantinedMessage:
    key: str
    uid: int | None
    reason: str
