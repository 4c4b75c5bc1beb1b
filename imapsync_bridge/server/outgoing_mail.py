"""Outgoing messages on the hosted server: building them, and sending them now.

* :func:`compose_message`: a proper RFC 5322 message from the phone's compose form
  (From, To, Subject, Date, Message-ID, In-Reply-To/References when replying), CRLF.
* :func:`prepare_submitted`: a client's raw message made ready to queue: a Message-ID
  added when it has none (the key that makes sending exactly once), the internal
  ``X-Bridge-Via`` marker and ``Bcc`` removed, the recipients read from the header.
* :func:`bounce_notice`: the ``Undelivered:`` message put in the phone inbox.
* :class:`Relay`: send now through ``[relay]``: claims due messages (so two processes
  never send one twice), records "in data" before DATA, and records the outcome.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32
from email.utils import format_datetime, getaddresses, make_msgid

from imapsync_bridge import smtp_out
from imapsync_bridge.config import MailServer
from imapsync_bridge.errors import BridgeError
from imapsync_bridge.server.store_api import RelayStore
from imapsync_bridge.server.store_schema import OutgoingMessage
from imapsync_bridge.sync.outgoing import MAX_RECIPIENTS, Outcome, bounce_subject

log = logging.getLogger(__name__)

STALE_CLAIM = timedelta(minutes=10)  # a relay claim older than this was left by a crash
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_DROPPED = (b"x-bridge-via", b"bcc")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # C0 and DEL, tab allowed


class OutgoingRefused(BridgeError):
    """The message cannot be queued (no recipients, too large, not the user's address)."""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def compose_message(
    sender: str,
    to: list[str],
    subject: str,
    body: str,
    *,
    now: datetime | None = None,
    reply_to: tuple[str, str] | None = None,
) -> bytes:
    """The message bytes; ``reply_to`` = (the replied message's Message-ID, its
    References) adds In-Reply-To and References (RFC 5322 3.6.4)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(addr_spec=sender)
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=domain_of(sender))
    if reply_to is not None:
        parent, references = reply_to
        msg["In-Reply-To"] = parent
        msg["References"] = f"{references} {parent}".strip()
    msg.set_content(body)
    return msg.as_bytes()


def _split(raw: bytes) -> tuple[bytes, bytes]:
    found = _HEADER_END.search(raw)
    if found is None:
        return raw, b""
    return raw[: found.start()], raw[found.start() :]


def prepare_submitted(raw: bytes) -> tuple[bytes, str, str, list[str]]:
    """(raw to queue, Message-ID, From address, recipients from To/Cc/Bcc)."""
    head, rest = _split(raw)
    header = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    recipients = [a for _n, a in getaddresses(header.get_all("to", []) + header.get_all("cc", [])
                  + header.get_all("bcc", [])) if a]  # fmt: skip
    senders = [a for _n, a in getaddresses(header.get_all("from", [])) if a]
    lines = re.split(rb"\r?\n(?![ \t])", head)  # one entry per field, folded lines kept
    kept = [line for line in lines if line.split(b":", 1)[0].strip().lower() not in _DROPPED]
    message_id = str(header.get("Message-ID", "")).strip()
    if not message_id:
        message_id = make_msgid(domain=domain_of(senders[0] if senders else "localhost"))
        kept.insert(0, f"Message-ID: {message_id}".encode())
    return b"\r\n".join(kept) + rest, message_id, senders[0] if senders else "", recipients


def check_form_text(**fields: str) -> None:
    """Refuse a compose field with a line break (in a header it would start a header of
    its own: a ``Bcc:`` smuggled in), a control character in a header or a NUL anywhere
    (RFC 5322 allows neither), or text no mail can carry (a lone surrogate, which JSON
    allows), naming the field."""
    for name, value in fields.items():
        if name != "body" and len(value.splitlines()) > 1:
            raise OutgoingRefused(f"{name} contains a line break")
        if "\x00" in value or (name != "body" and _CONTROL.search(value)):
            raise OutgoingRefused(f"{name} contains a control character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OutgoingRefused(f"{name} is not valid Unicode text") from None


def check_recipients(recipients: list[str]) -> None:
    if not recipients:
        raise OutgoingRefused("the message has no recipients")
    if len(recipients) > MAX_RECIPIENTS:
        raise OutgoingRefused(f"{len(recipients)} recipients: at most {MAX_RECIPIENTS}")


def bounce_notice(message: OutgoingMessage, phone_address: str, reply: str) -> bytes:
    """The phone's notice that ``message`` was refused for good, with the reply. Its
    Message-ID is derived from the message's, so it is stored once."""
    digest = hashlib.sha256(message.message_id.encode()).hexdigest()[:16]
    domain = domain_of(phone_address)
    notice = EmailMessage(policy=SMTP)
    notice["From"] = f"Mail Delivery System <mailer-daemon@{domain}>"
    notice["To"] = phone_address
    notice["Subject"] = bounce_subject(message.subject)
    notice["Date"] = format_datetime(datetime.now(UTC))
    notice["Message-ID"] = f"<undelivered.{message.id}.{digest}@{domain}>"
    notice["In-Reply-To"] = message.message_id
    notice["Auto-Submitted"] = "auto-replied"
    notice.set_content(
        f"Your message could not be delivered to {', '.join(message.recipients)}.\n\n"
        f"The mail server replied:\n\n    {reply}\n\n"
        f"Subject: {message.subject}\nMessage-ID: {message.message_id}\n"
    )
    return notice.as_bytes()


class Relay:
    """Send now through ``[relay]``; blocking (asyncio callers use a thread)."""

    def __init__(self, server: MailServer, hostname: str) -> None:
        self.server = server
        self.hostname = hostname

    def send_due(
        self, store: RelayStore, user: str | None = None, id: int | None = None
    ) -> list[tuple[OutgoingMessage, str]]:
        """Send every due send-now message (or one user's / one id); returns each with
        the state it is in now. Claims a crashed relay left are recovered first."""
        requeued, unsure = store.recover_relay_claims(STALE_CLAIM)
        if requeued or unsure:
            log.warning("relay: %d stale claim(s) requeued, %d taken as sent", requeued, unsure)
        return [(m, self._send_one(store, m)) for m in store.claim_for_relay(user, id)]

    def _send_one(self, store: RelayStore, message: OutgoingMessage) -> str:
        assert message.raw is not None
        result = smtp_out.send(
            self.server, message.sender, message.recipients, message.raw,
            local_hostname=self.hostname, before_data=lambda: store.relay_in_data(message.id),
        )  # fmt: skip
        notice = None
        if result.outcome in (Outcome.ACCEPTED, Outcome.UNKNOWN):
            state = "sent"  # UNKNOWN: DATA began, so it is never sent twice
        elif result.outcome is Outcome.PERMANENT:
            state = "failed"
            phone_address = store.get_user(message.user).address
            notice = bounce_notice(message, phone_address, result.reply)
        else:
            state = "deferred"
        store.record_outcome(message.user, message.id, state, result.reply, notice)
        log.info(
            "relay: %s for %s %s%s: %s", message.message_id, message.user, state,
            " (outcome unknown: not sent again)" if result.outcome is Outcome.UNKNOWN else "",
            result.reply,
        )  # fmt: skip
        return "queued" if state == "deferred" else state
