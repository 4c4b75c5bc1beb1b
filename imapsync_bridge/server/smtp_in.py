"""Inbound SMTP: mail sent to a phone address lands in that user's phone inbox at once.

The hosted server's "wireless device mail server" (DESIGN.md, Outgoing mail, second
paragraph). aiosmtpd's :class:`~aiosmtpd.smtp.SMTP` protocol is served with
``loop.create_server`` inside the server's own event loop (not aiosmtpd's threaded
``Controller``), beside the sync listener, over the same store. What it answers, and
why, is in ``docs/mail-flow.md`` ("Inbound SMTP"); in short:

* RCPT TO an address that is no user's phone address: ``550 5.1.1``; a user whose phone
  mailbox already holds ``max_unsynced`` messages the desktop has not taken: ``452
  4.2.2`` (the sender retries later; nothing is dropped); more than
  :data:`MAX_RECIPIENTS`: ``452 4.5.3``.
* Over ``max_message_size`` (SIZE is advertised): ``552 5.3.4``; a line over 998
  characters (a 1 MB header line): ``500 5.5.2``; NUL bytes or a bare CR/LF: ``554
  5.6.0`` — the desktop's IMAP server would not store those bytes as they came (Dovecot
  turns NUL into 0x80 and a bare LF into CRLF), so the two copies would differ and a
  message without Message-ID would get two keys and double.
* Anything else — broken MIME, 8-bit headers, no Message-ID, no Date — is stored exactly
  as it came, with no trace header added (so a retried transaction of a message without
  Message-ID has the same key and is recognised as the same message).
* A store failure: ``451 4.3.0`` (try again); nothing half-stored is acknowledged.

The message's key is made as the agent makes it from the desktop's copy
(:func:`message_identity`), so after the sync APPENDs it the two are one message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from imapsync_bridge.errors import StoreError
from imapsync_bridge.model import message_key, normalize_message_id
from imapsync_bridge.protocol import pki
from imapsync_bridge.server.store_api import InboundStore, NoSuchUser
from imapsync_bridge.server.store_schema import Delivery

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: a server must take at least 100
TIMEOUT = 300.0  # seconds of client silence before the connection is dropped

# Every reply this listener gives, in one place (enhanced codes, RFC 3463).
NO_SUCH_USER = "550 5.1.1 <{address}>: no such user"
MAILBOX_FULL = "452 4.2.2 mailbox full, try later"
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients"
TOO_BIG = "552 5.3.4 message too big"
LINE_TOO_LONG = "500 5.5.2 line too long: at most 998 characters per line (RFC 5322 2.1.1)"
NUL_BYTES = "554 5.6.0 NUL bytes are not allowed in a message (RFC 5322 2.3)"
BARE_NEWLINE = "554 5.6.0 bare CR or LF in the message: lines must end with CRLF (RFC 5321 2.3.8)"
TRY_LATER = "451 4.3.0 temporary failure, try again later"
ACCEPTED = "250 2.0.0 OK: delivered"

# aiosmtpd's own replies that refuse a message, as this listener words them.
_STOCK_REPLIES = {
    "500 Line too long": LINE_TOO_LONG,
    "552 Error: Too much mail data": TOO_BIG,
    "552 Error: message size exceeds fixed maximum": TOO_BIG,
}


# -- the message's identity, as the agent will see it on the desktop ------------------
def header_block(raw: bytes) -> bytes:
    """The header as IMAP ``BODY[HEADER]`` gives it (checked against Dovecot): up to and
    including the first empty line, the whole message when it has none."""
    if raw.startswith(b"\r\n"):
        return b"\r\n"
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 4]


def message_id_fields(header: bytes) -> bytes:
    """The Message-ID fields of a header, as ``BODY[HEADER.FIELDS (MESSAGE-ID)]`` gives
    them: also after a line that is no header field, where Python's parser would stop."""
    taken: list[bytes] = []
    taking = False
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if taking:
                taken.append(line)
            continue
        name, colon, _value = line.partition(b":")
        taking = bool(colon) and name.lower() == b"message-id"
        if taking:
            taken.append(line)
    return b"".join(line + b"\r\n" for line in taken) + b"\r\n"


def message_identity(raw: bytes) -> tuple[str, str | None]:
    """(key, Message-ID) of a message, exactly as the agent's IMAP adapter computes them
    for the desktop's copy after the sync APPENDs it: the Message-ID of the Message-ID
    field, else a hash of the header block and the size (:func:`.model.message_key`)."""
    fields = BytesHeaderParser(policy=compat32).parsebytes(message_id_fields(header_block(raw)))
    found = fields.get("Message-ID")
    message_id = normalize_message_id(found.encode("utf-8", "surrogateescape") if found else None)
    if message_id:
        return message_id, message_id
    return message_key(header_block(raw), len(raw))[0], None


def refusal(raw: bytes, max_size: int) -> str | None:
    """The reply refusing these message bytes, or None when they can be stored as they
    are (and will reach the desktop as they are)."""
    if len(raw) > max_size:
        return TOO_BIG
    if b"\x00" in raw:
        return NUL_BYTES
    if b"\r" in raw.replace(b"\r\n", b"") or b"\n" in raw.replace(b"\r\n", b""):
        return BARE_NEWLINE
    return None


# -- the SMTP conversation -------------------------------------------------------------
class InboundHandler:
    """aiosmtpd hooks: RCPT decides per recipient, DATA stores one copy per user.

    Every store call runs in a worker thread (SQLite blocks). Any failure becomes a 4xx
    reply and a log line: the connection, and the listener, go on.
    """

    def __init__(
        self,
        store: InboundStore,
        max_message_size: int,
        max_unsynced: int,
    ) -> None:
        self.store = store
        self.max_message_size = max_message_size
        self.max_unsynced = max_unsynced

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        peer = _peer(session)
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        try:
            users = await asyncio.to_thread(self.store.users_for_address, address)
            if not users:
                log.info("smtp in: refused %r from %s: no such user", address, peer)
                return NO_SUCH_USER.format(address=address)
            for user in users:
                unsynced = await asyncio.to_thread(self.store.unsynced_count, user)
                if unsynced >= self.max_unsynced:
                    log.warning(
                        "smtp in: refused %r (%s) from %s: %d unsynced messages, the limit",
                        address, user, peer, unsynced,
                    )  # fmt: skip
                    return MAILBOX_FULL
        except (StoreError, OSError) as exc:
            log.error("smtp in: RCPT %r from %s failed: %s", address, peer, exc)
            return TRY_LATER
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        peer, sender = _peer(session), envelope.mail_from
        refused = refusal(raw, self.max_message_size)
        if refused is not None:
            log.warning(
                "smtp in: refused %d bytes from %r via %s: %s", len(raw), sender, peer, refused
            )
            return refused
        key, message_id = message_identity(raw)
        try:
            users: list[str] = []
            for address in envelope.rcpt_tos:
                found = await asyncio.to_thread(self.store.users_for_address, address)
                users += [user for user in found if user not in users]
            done: dict[str, Delivery] = {}
            for user in users:
                try:
                    done[user] = await asyncio.to_thread(
                        self.store.deliver, user, key, message_id, raw
                    )
                except NoSuchUser:  # removed since RCPT: no copy to make
                    continue
        except (StoreError, OSError) as exc:
            log.error(
                "smtp in: %s (%d bytes) from %r via %s not stored: %s; answered 451",
                key, len(raw), sender, peer, exc,
            )  # fmt: skip
            return TRY_LATER
        log.info(
            "smtp in: accepted %s (%d bytes) from %r via %s for %s",
            key, len(raw), sender, peer, ", ".join(_outcome(u, d) for u, d in done.items()),
        )  # fmt: skip
        return ACCEPTED


def _outcome(user: str, delivery: Delivery) -> str:
    if delivery.duplicate:
        return f"{user} (duplicate of id {delivery.id}, not stored again)"
    evicted = f", {delivery.evicted} evicted" if delivery.evicted else ""
    return f"{user} (id {delivery.id}{evicted})"


def _peer(session: Session | None) -> str:
    peer = session.peer if session is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class BridgeSMTP(SMTP):
    """aiosmtpd's protocol, with its stock refusals worded like ours (enhanced codes) and
    logged once each. Shared by inbound SMTP and submission (:mod:`.submission`), which
    adds its own wordings in :attr:`reworded` and its name in :attr:`log_name`."""

    log_name = "smtp in"
    reworded: dict[str, str] = _STOCK_REPLIES

    async def push(self, status: Any) -> None:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else str(status)
        for stock, ours in self.reworded.items():
            if text.startswith(stock):
                log.warning("%s: refused %s: %s", self.log_name, _peer(self.session), ours)
                text = ours
                break
        await super().push(text)


InboundSMTP = BridgeSMTP  # the inbound listener's protocol is the shared one as it is


def starttls_context(data_dir: Path) -> ssl.SSLContext:
    """STARTTLS with the server certificate, offered but not required: mail comes from
    any MTA, and refusing those without (or with older) TLS would only make them send in
    clear or not at all. TLS 1.2 and up, no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(data_dir / pki.SERVER_CRT, data_dir / pki.SERVER_KEY)
    return context


class SmtpListener:
    """The Listener plumbing (see :class:`.app.Listener`) of an aiosmtpd protocol served
    with ``loop.create_server`` in the running loop; subclasses make the protocol."""

    def __init__(
        self, hostname: str, max_message_size: int, tls_context: ssl.SSLContext | None
    ) -> None:
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.tls_context = tls_context
        self._server: asyncio.Server | None = None
        self._connections: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def protocol(self) -> SMTP:
        """A new protocol instance for one connection."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What every listener's aiosmtpd protocol is made with."""
        return {
            "data_size_limit": self.max_message_size,
            "enable_SMTPUTF8": True,
            "hostname": self.hostname,
            "ident": "imapsync-bridge",
            "tls_context": self.tls_context,
            "timeout": TIMEOUT,
            "loop": asyncio.get_running_loop(),
        }

    def _connection(self) -> SMTP:
        protocol = self.protocol()
        self._connections.add(protocol)
        return protocol

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        """Stop listening and drop open connections; a transaction not yet answered 250
        was not acknowledged, so its sender retries (each store call is a transaction:
        nothing is half-stored)."""
        if self._server is None:
            return
        self._server.close()
        for protocol in list(self._connections):
            if protocol.transport is not None:
                protocol.transport.close()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the connections' handler tasks see their cancellation


class SmtpInListener(SmtpListener):
    """The Listener (see :class:`.app.Listener`) for ``[server] smtp_listen``."""

    def __init__(
        self,
        store: InboundStore,
        *,
        hostname: str,
        max_message_size: int,
        max_unsynced: int,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(hostname, max_message_size, tls_context)
        self.handler = InboundHandler(store, max_message_size, max_unsynced)

    def protocol(self) -> SMTP:
        return InboundSMTP(self.handler, **self.settings())
