"""The phone service: the phone user's operations, one layer for every front end.

Where it sits
-------------
``phone`` CLI, web page / JSON API, SMTP listeners  →  :class:`PhoneService`  →
:class:`.store_api.MailboxStore` (implemented by :class:`.store.PhoneStore`).

* The front ends authenticate the user, call one method, and only format the result:
  each result is a frozen dataclass with ``as_json()``, which gives exactly the field
  names of the contract (DESIGN.md: ``phone list --json``, ``GET /api/mailbox``,
  ``GET /api/messages/ID``, ``POST /api/messages/ID/ACTION``). No front end builds that
  JSON itself.
* The service takes the narrow :class:`.store_api.MailboxStore`, holds no state between
  calls (several server processes may run it over one database), and every call is one
  store transaction (``show`` parses after the read; a change re-reads after it).
* Errors: :class:`NoSuchMessage` for an unknown id *and* for another user's id (a web
  front end maps it to 404, the CLI to exit 1); :class:`.store_api.NoSuchUser`; other
  :class:`~imapsync_bridge.errors.StoreError` as documented in :mod:`.store_api`.
* Calls block (SQLite): asyncio front ends run them in a thread executor.
* ``show`` parses the stored message with the stdlib ``email`` package (modern policy,
  with a fallback for broken encodings) and reduces HTML to plain text with ``nh3``
  (every tag stripped, ``script``/``style`` content dropped, entities decoded). The
  result is plain text: a web page must still escape it when it renders it.
* ``request_sync`` records a pending request in the store's ``sync_requests`` table (one
  per user; repeats merge into the first); the hosted server acts on it later (a push
  notice to a connected agent, else the trigger mail) via
  :meth:`.store_api.SyncStore.take_sync_request`.
* ``sent`` and ``outbox`` are empty until outgoing mail (compose, send now / via desktop)
  exists; they are part of the typed result already (:class:`OutboxItem`).
"""

from __future__ import annotations

import builtins
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

import nh3

from imapsync_bridge.model import INBOX, TRASH
from imapsync_bridge.server.store_api import MailboxStore, NoSuchMessage, NoSuchUser
from imapsync_bridge.server.store_schema import PhoneMessage

__all__ = [
    "VERBS",
    "Attachment",
    "ChangeResult",
    "Mailbox",
    "MessageDetail",
    "MessageItem",
    "NoSuchMessage",
    "NoSuchUser",
    "OutboxItem",
    "PhoneService",
    "Status",
    "SyncRequest",
    "html_to_text",
]

MAX_TEXT = 1024 * 1024  # characters of body text returned by show (the raw stays whole)


@dataclass(frozen=True)
class MessageItem:
    """One message of a listing (``phone list --json``)."""

    id: int
    message_id: str | None
    subject: str
    sender: str
    date: str  # ISO 8601 UTC, the arrival time
    seen: bool
    flagged: bool
    folder: str

    @classmethod
    def of(cls, message: PhoneMessage) -> MessageItem:
        return cls(
            message.id,
            message.message_id,
            message.subject,
            message.from_addr,
            message.internaldate,
            message.seen,
            message.flagged,
            message.folder,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "subject": self.subject,
            "from": self.sender,
            "date": self.date,
            "seen": self.seen,
            "flagged": self.flagged,
        }


@dataclass(frozen=True)
class OutboxItem(MessageItem):
    """An outgoing message (``sent`` / ``outbox``): a listing entry plus ``to`` and
    ``state`` (queued, claimed, submitted, sent, failed)."""

    to: list[str] = field(default_factory=list)
    state: str = "queued"

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "to": list(self.to), "state": self.state}


@dataclass(frozen=True)
class Mailbox:
    """The whole ``phone list --json`` / ``GET /api/mailbox`` document."""

    user: str
    window: int
    inbox: list[MessageItem]
    trash: list[MessageItem]
    sent: list[OutboxItem]
    outbox: list[OutboxItem]

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "window": self.window,
            "inbox": [m.as_json() for m in self.inbox],
            "trash": [m.as_json() for m in self.trash],
            "sent": [m.as_json() for m in self.sent],
            "outbox": [m.as_json() for m in self.outbox],
        }


@dataclass(frozen=True)
class Attachment:
    name: str
    type: str
    size: int  # bytes after transfer decoding

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "size": self.size}


@dataclass(frozen=True)
class MessageDetail:
    """``GET /api/messages/ID``: the listing fields plus ``to``, ``cc``, ``text`` and
    ``attachments``; ``raw`` (the stored bytes) is for ``phone show``, not in the JSON."""

    message: MessageItem
    to: list[str]
    cc: list[str]
    text: str
    attachments: list[Attachment]
    raw: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            **self.message.as_json(),
            "to": list(self.to),
            "cc": list(self.cc),
            "text": self.text,
            "attachments": [a.as_json() for a in self.attachments],
        }


@dataclass(frozen=True)
class ChangeResult:
    """What a change verb did: ``changed`` False when there was nothing to change;
    ``message`` is the message after the change, None once destroyed."""

    verb: str
    id: int
    changed: bool
    message: MessageItem | None

    def as_json(self) -> dict[str, Any]:
        if self.message is None:
            return {"id": self.id, "destroyed": True}
        return self.message.as_json()


@dataclass(frozen=True)
class SyncRequest:
    requested_at: str  # the pending request's time (the first, when requests merged)


@dataclass(frozen=True)
class Status:
    """``GET /api/status`` as far as the store knows it; ``agent_connected`` comes from
    the sync listener's registry and is added by the front end."""

    last_desktop_sync: str | None
    pending_to_desktop: int
    window: int

    def as_json(self) -> dict[str, Any]:
        return {
            "last_desktop_sync": self.last_desktop_sync,
            "pending_to_desktop": self.pending_to_desktop,
            "window": self.window,
        }


#: The change verbs of the CLI and of ``POST /api/messages/ID/ACTION``.
VERBS = ("delete", "restore", "destroy", "read", "unread", "flag", "unflag")


class PhoneService:
    """The phone user's operations over a :class:`.store_api.MailboxStore`."""

    def __init__(self, store: MailboxStore) -> None:
        self._store = store
        self._changes: dict[str, Callable[[str, int], bool]] = {
            "delete": store.trash,
            "restore": store.restore,
            "destroy": store.destroy,
            "read": lambda user, id: store.set_seen(user, id, True),
            "unread": lambda user, id: store.set_seen(user, id, False),
            "flag": lambda user, id: store.set_flagged(user, id, True),
            "unflag": lambda user, id: store.set_flagged(user, id, False),
        }

    # --- reading ----------------------------------------------------------------------

    def list(self, user: str) -> Mailbox:
        """The mailbox document: inbox and trash newest first, sent and outbox."""
        window = self._store.get_user(user).window
        inbox = [MessageItem.of(m) for m in self._store.list_folder(user, INBOX)]
        trash = [MessageItem.of(m) for m in self._store.list_folder(user, TRASH)]
        return Mailbox(user, window, inbox, trash, self._sent(user), self._outbox(user))

    def show(self, user: str, id: int) -> MessageDetail:
        """One message with its recipients, plain text and attachment list. Raises
        :class:`NoSuchMessage` (unknown or another user's id)."""
        message = self._store.get(user, id)
        raw = message.raw or b""
        to, cc, text, attachments = parse_message(raw)
        return MessageDetail(MessageItem.of(message), to, cc, text, attachments, raw)

    def status(self, user: str) -> Status:
        """Last desktop sync, changes not yet taken by the desktop, window."""
        window = self._store.get_user(user).window
        last = self._store.last_sync(user)
        pending = self._store.counts(user)["pending_actions"]
        return Status(last.at if last else None, pending, window)

    # --- changes ----------------------------------------------------------------------

    def change(self, user: str, verb: str, id: int) -> ChangeResult:
        """Apply one of :data:`VERBS`; the desktop follows at the next sync. Raises
        :class:`NoSuchMessage`; ``ValueError`` for an unknown verb (a usage error)."""
        try:
            apply = self._changes[verb]
        except KeyError:
            raise ValueError(f"unknown phone verb {verb!r}") from None
        changed = apply(user, id)
        after = None if verb == "destroy" else MessageItem.of(self._store.get(user, id))
        return ChangeResult(verb, id, changed, after)

    def delete(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "delete", id)

    def restore(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "restore", id)

    def destroy(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "destroy", id)

    def read(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "read", id)

    def unread(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "unread", id)

    def flag(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "flag", id)

    def unflag(self, user: str, id: int) -> ChangeResult:
        return self.change(user, "unflag", id)

    def request_sync(self, user: str) -> SyncRequest:
        """Record a sync request (see the module docstring); repeats merge."""
        return SyncRequest(self._store.request_sync(user))

    # --- outgoing (none yet) ----------------------------------------------------------

    def _sent(self, user: str) -> builtins.list[OutboxItem]:
        return []  # outgoing mail is not stored yet (compose comes with the outbox)

    def _outbox(self, user: str) -> builtins.list[OutboxItem]:
        return []


# --- parsing for show (hostile input: never raises) --------------------------------------

_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|tr|h[1-6]|blockquote|pre|table)\b[^>]*>", re.I)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(markup: str) -> str:
    """HTML as plain text: block tags become line breaks, every tag is stripped (script
    and style with their content) by nh3, entities are decoded, whitespace tidied."""
    marked = _BLOCK_TAG.sub("\n", markup)
    cleaned = nh3.clean(marked, tags=set(), strip_comments=True)
    text = html.unescape(cleaned)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def parse_message(raw: bytes) -> tuple[list[str], list[str], str, list[Attachment]]:
    """(to, cc, text, attachments) of a raw message; empty values at worst."""
    try:
        msg = BytesParser(policy=policy.default).parsebytes(raw)
    except Exception:
        return [], [], raw.decode("utf-8", "replace")[:MAX_TEXT], []
    return (
        _addresses(msg, "to"),
        _addresses(msg, "cc"),
        _body_text(msg)[:MAX_TEXT],
        _attachments(msg),
    )


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    try:
        values = [str(v) for v in msg.get_all(name, [])]
    except Exception:  # a header the modern policy cannot parse: take it raw
        values = [str(v) for _, v in msg.raw_items() if _.lower() == name]
    found = []
    for display, address in getaddresses(values):
        if address or display:
            found.append(f"{display} <{address}>" if display else address)
    return found


def _body_text(msg: EmailMessage) -> str:
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
    except Exception:
        part = None
    if part is None:
        return ""
    content = _part_text(part).replace("\r\n", "\n")
    return html_to_text(content) if part.get_content_type() == "text/html" else content


def _part_text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except Exception:
        pass
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _attachments(msg: EmailMessage) -> list[Attachment]:
    found = []
    try:
        parts = list(msg.iter_attachments()) if msg.is_multipart() else []
    except Exception:
        return []
    for part in parts:
        try:
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            found.append(Attachment(part.get_filename() or "", part.get_content_type(), size))
        except Exception:
            continue
    return found
