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
* Outgoing mail (docs/mail-flow.md, "Outgoing"): :meth:`PhoneService.compose` builds
  the message and calls :meth:`PhoneService.submit`, which the submission listener also
  calls with a client's raw message. Send now: queued, then sent through ``[relay]`` at
  once in the calling process when the service has a :class:`.outgoing_mail.Relay`
  (``send_now_inline``), else by ``server run``'s relay worker; a 4xx leaves it queued
  for ``server run`` to retry with backoff. Via desktop: queued for the agent.
  ``sent`` lists the phone's Sent copies, ``outbox`` everything not sent yet (with its
  state, and the reason when failed).
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
from imapsync_bridge.server import outgoing_mail
from imapsync_bridge.server.outgoing_mail import OutgoingRefused, Relay
from imapsync_bridge.server.store_api import NoSuchMessage, NoSuchUser, PhoneServiceStore
from imapsync_bridge.server.store_schema import OutgoingMessage, PhoneMessage

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
    "OutgoingRefused",
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
    reason: str | None = None  # the server's reply, when failed (or deferred)

    @classmethod
    def of_outgoing(cls, m: OutgoingMessage) -> OutboxItem:
        folder = "sent" if m.state == "sent" else "outbox"
        # A sent message is read (it is the user's own); nothing in the outbox is flagged.
        return cls(m.id, m.message_id, m.subject, m.from_addr, m.date, m.state == "sent",
                   False, folder, list(m.recipients), m.state, m.reason)  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        out = {**super().as_json(), "to": list(self.to), "state": self.state}
        if self.state == "failed":
            out["reason"] = self.reason or ""
        return out


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

    def __init__(
        self,
        store: PhoneServiceStore,
        relay: Relay | None = None,
        *,
        max_message_size: int = 25 * 1024 * 1024,
        send_now_inline: bool = True,
    ) -> None:
        """``relay``: how send-now mail leaves (None: it waits queued for a process that
        has one); ``send_now_inline``: send it in this call (the CLI prints the state it
        reached) rather than leave it to ``server run``'s relay worker."""
        self._store = store
        self._relay = relay
        self._max_size = max_message_size
        self._inline = send_now_inline
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

    # --- outgoing ---------------------------------------------------------------------

    def compose(
        self,
        user: str,
        to: builtins.list[str],
        subject: str,
        body: str,
        via_desktop: bool,
        in_reply_to: int | None = None,
    ) -> OutboxItem:
        """Build the message (From: the phone address to send now, the desktop address
        via the desktop) and :meth:`submit` it. ``in_reply_to``: a phone id of the inbox
        or trash (:class:`NoSuchMessage` if unknown)."""
        account = self._store.get_user(user)
        sender = account.desktop_address if via_desktop else account.address
        reply_to = None
        if in_reply_to is not None:
            parent = self._store.get(user, in_reply_to)
            if parent.message_id:
                reply_to = (parent.message_id, _references(parent.raw or b""))
        outgoing_mail.check_form_text(to=", ".join(to), subject=subject, body=body)
        outgoing_mail.check_recipients(to)
        raw = outgoing_mail.compose_message(sender, to, subject, body, reply_to=reply_to)
        return self.submit(user, raw, via_desktop)

    def submit(
        self,
        user: str,
        raw: bytes,
        via_desktop: bool,
        recipients: builtins.list[str] | None = None,
    ) -> OutboxItem:
        """Queue a raw message (a Message-ID added when it has none; ``X-Bridge-Via`` and
        ``Bcc`` removed) and, to send now with a relay at hand, send it. ``recipients``:
        the envelope's (submission), else To/Cc/Bcc. Resubmitting a Message-ID returns
        the queued one (not sent twice). Raises :class:`OutgoingRefused`: too large, no
        or too many recipients, a From that is not the user's."""
        if len(raw) > self._max_size:
            raise OutgoingRefused(f"{len(raw)} bytes: over the limit of {self._max_size}")
        account = self._store.get_user(user)
        prepared, message_id, from_address, listed = outgoing_mail.prepare_submitted(raw)
        rcpts = list(recipients) if recipients else listed
        outgoing_mail.check_recipients(rcpts)
        own = {account.address.lower(), account.desktop_address.lower()}
        if from_address.lower() not in own:
            raise OutgoingRefused(f"From {from_address!r} is not one of {user}'s addresses")
        sender = from_address if via_desktop else account.address
        queued, new = self._store.queue_outgoing(
            user, message_id, via_desktop, sender, rcpts, prepared
        )
        if new and not via_desktop and self._relay is not None and self._inline:
            self._relay.send_due(self._store, user=user, id=queued.id)
            queued = self._store.get_outgoing(user, queued.id)
        return OutboxItem.of_outgoing(queued)

    def _sent(self, user: str) -> builtins.list[OutboxItem]:
        return [OutboxItem.of_outgoing(m) for m in self._store.list_outgoing(user, sent=True)]

    def _outbox(self, user: str) -> builtins.list[OutboxItem]:
        return [OutboxItem.of_outgoing(m) for m in self._store.list_outgoing(user, sent=False)]


def _references(raw: bytes) -> str:
    """The References of a message being replied to (RFC 5322 3.6.4), '' if none."""
    try:
        header = BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
        return " ".join(str(header.get("References", "")).split())
    except Exception:
        return ""


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
