"""Submission: phone mail apps send through the hosted server (RFC 6409 style).

``[server] submission_listen``: aiosmtpd's protocol in the server's own loop, beside
inbound SMTP (:mod:`.smtp_in`, whose protocol wording, refusal checks and listener
plumbing it shares). DESIGN.md "Outgoing mail" is the contract; ``docs/mail-flow.md``
("Submission") the full table of replies. In short:

* STARTTLS with the server's certificate is required before anything but EHLO, NOOP,
  QUIT: AUTH is not advertised before it, and AUTH or MAIL before it is answered
  :data:`STARTTLS_FIRST` (a password never crosses the network in clear).
* AUTH PLAIN and LOGIN, login = the phone user name or phone address, checked by
  :class:`.credentials.Logins` (scrypt, in a worker thread, at most
  :data:`MAX_HASHING` at once) behind the process's one throttle: a wrong password is
  :data:`BAD_PASSWORD`, ten in a row for a user or from an address are
  :data:`THROTTLED` for five minutes. MAIL before AUTH: :data:`AUTH_FIRST`.
* The user sends as themselves only: the envelope sender and every ``From:`` address
  must be their phone or desktop address (:data:`NOT_YOURS`, :data:`FROM_NOT_YOURS`).
* Size, NUL bytes, bare CR/LF and over-long lines are refused as inbound SMTP refuses
  them (552, 554, 500).
* Accepted: ``X-Bridge-Via: desktop`` → via the desktop, no such header → send now; the
  header is taken out, and the bytes go to ``PhoneService.submit(user, raw,
  via_desktop=…, recipients=<the envelope's>)`` in a worker thread (send now talks SMTP
  to the relay in that call). The reply says what became of it (:func:`outcome`): 250
  sent / queued for your desktop / accepted, will retry; 554 when the relay refused it
  for good; a refusal of the service (:class:`.outgoing_mail.OutgoingRefused`) 554 5.7.1.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import re
import ssl
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from imapsync_bridge.errors import (
    BridgeError,
    ConfigError,
    MessageError,
    StoreError,
    TransientError,
)
from imapsync_bridge.server import smtp_in
from imapsync_bridge.server.credentials import Logins
from imapsync_bridge.server.outgoing_mail import OutgoingRefused, Relay
from imapsync_bridge.server.phone import OutboxItem, PhoneService
from imapsync_bridge.server.smtp_in import BridgeSMTP, SmtpListener, header_block, refusal
from imapsync_bridge.server.store_api import SubmissionStore

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100
MAX_HASHING = 4  # concurrent scrypt checks (16 MiB each) per listener
AUTH_LINE_LIMIT = 4096  # an AUTH PLAIN line with a 256-character UTF-8 password fits
VIA_HEADER = b"x-bridge-via"

AUTH_OK = "235 2.7.0 authentication successful"
BAD_PASSWORD = "535 5.7.8 authentication credentials invalid"
THROTTLED = "454 4.7.0 too many failed logins, try later"
STARTTLS_FIRST = "530 5.7.0 must issue STARTTLS first"
AUTH_FIRST = "530 5.7.0 authentication required"
NOT_YOURS = "553 5.7.1 <{address}>: not one of your addresses"
FROM_NOT_YOURS = "550 5.7.1 the From: header must name only your own addresses"
NO_FROM = "550 5.6.0 the message has no From: header"
BAD_VIA = '550 5.6.0 X-Bridge-Via: only "desktop" is understood'
TOO_MANY_RECIPIENTS = smtp_in.TOO_MANY_RECIPIENTS
TRY_LATER = smtp_in.TRY_LATER
ACCEPTED = "250 2.0.0 {how} (outbox id {id})"
REFUSED = "554 5.7.1 {reason}"  # the phone service refuses the message (OutgoingRefused)
_ENHANCED = re.compile(r"(?<![0-9.])5\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9.])")

_REWORDED = {
    **smtp_in._STOCK_REPLIES,
    "530 Must issue a STARTTLS command first": STARTTLS_FIRST,
    "530 5.7.0 Authentication required": AUTH_FIRST,
}

#: the hand-off: (user, message bytes, via_desktop, envelope recipients) → the outbox
#: entry; blocking. The envelope's recipients, not the headers', are where it goes: a
#: blind copy is in the envelope only.
Submit = Callable[[str, bytes, bool, list[str]], OutboxItem]


def phone_submit(store: SubmissionStore, relay: Relay | None, max_message_size: int) -> Submit:
    """The hand-off to the phone service: send now through ``[relay]`` in this call (the
    reply tells what became of it), or queue for the desktop."""
    service = PhoneService(store, relay, max_message_size=max_message_size, send_now_inline=True)

    def submit(user: str, raw: bytes, via_desktop: bool, recipients: list[str]) -> OutboxItem:
        return service.submit(user, raw, via_desktop=via_desktop, recipients=recipients)

    return submit


def outcome(item: OutboxItem, via_desktop: bool) -> str:
    """The reply to a message the phone service took, by the state it is in now: 250
    worded by that state, or 554 when it failed for good (a 5xx from the relay; the
    phone inbox has the ``Undelivered:`` notice too). A resubmitted Message-ID is
    answered by the state of the message already queued under it."""
    if item.state == "failed":
        return relay_refused(item.reason or "refused")
    if item.state == "sent":
        how = "sent"
    elif via_desktop:
        how = "queued for your desktop"
    elif item.state == "claimed":
        how = "accepted, being sent"
    elif item.reason:  # queued again after a 4xx (or no connection): the server retries
        how = "accepted, will retry"
    else:  # no [relay] in this process: the relay worker of `server run` sends it
        how = "accepted, queued for sending"
    return ACCEPTED.format(how=how, id=item.id)


def relay_refused(reason: str) -> str:
    """``554`` with the enhanced code of the refusal when it has a 5.x.x one."""
    text = " ".join(reason.split())
    found = _ENHANCED.search(text)
    code = found.group(0) if found else "5.0.0"
    return f"554 {code} not delivered: {text}"


# -- the message ---------------------------------------------------------------------------
def take_via(raw: bytes) -> tuple[bytes, list[str]]:
    """The message without its ``X-Bridge-Via`` fields (continuation lines too), and
    their values (unfolded, stripped, lower case). Only the header block is looked at;
    ``raw`` has CRLF line ends only (:func:`.smtp_in.refusal` checked)."""
    head = header_block(raw)
    body = raw[len(head) :]
    trailer = b"\r\n" if head.endswith(b"\r\n\r\n") else b""
    fields = head[: len(head) - len(trailer)]
    kept: list[bytes] = []
    values: list[bytes] = []
    taking = False
    for line in fields.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and kept + values:
            if taking:
                values[-1] += line
            else:
                kept.append(line)
            continue
        name, colon, value = line.partition(b":")
        taking = bool(colon) and name.rstrip(b" \t").lower() == VIA_HEADER
        if taking:
            values.append(value)
        else:
            kept.append(line)
    if not values:
        return raw, []
    stripped = b"\r\n".join(kept) + trailer + body
    return stripped, [v.decode("ascii", "replace").strip().lower() for v in values]


def header_addresses(raw: bytes, *names: str) -> list[str]:
    """The addresses of the named header fields (all occurrences), lower case."""
    header = BytesHeaderParser(policy=compat32).parsebytes(header_block(raw))
    values = [str(v) for name in names for v in header.get_all(name, [])]
    return [address.lower() for _, address in getaddresses(values) if address]


# -- the SMTP conversation -----------------------------------------------------------------
class SubmissionHandler:
    """aiosmtpd hooks: AUTH (ours, so the check runs in a thread), MAIL (own addresses),
    RCPT, DATA (the hand-off). Store and service calls run in worker threads."""

    def __init__(
        self,
        store: SubmissionStore,
        logins: Logins,
        max_message_size: int,
        submit: Submit | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.store = store
        self.logins = logins
        self.max_message_size = max_message_size
        self.submit = submit or phone_submit(store, relay, max_message_size)
        self._hashing = asyncio.Semaphore(MAX_HASHING)

    # AUTH: smtp_AUTH has checked EHLO, TLS, "already authenticated" and the mechanism
    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> str | None:
        peer = smtp_in._peer(session)
        given = await (_plain(server, args) if args[0] == "PLAIN" else _login(server, args))
        if given is None:
            return None  # answered already (501: bad base64, aborted)
        login, password = given
        address = session.peer[0] if isinstance(session.peer, tuple) else None
        async with self._hashing:
            found = await asyncio.to_thread(self.logins.check, login, password, address)
        if found.refused:
            log.warning("submission: login %r from %s refused: throttled", login, peer)
            return THROTTLED
        if found.user is None:
            log.warning("submission: bad password for %r from %s", login, peer)
            return BAD_PASSWORD
        session.authenticated = True
        session.auth_data = found.user  # type: ignore[assignment]  # typed None, holds any
        log.info("submission: %s logged in from %s (%s)", found.user, peer, args[0])
        return AUTH_OK

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        user = str(session.auth_data)
        try:
            own = await asyncio.to_thread(self._own_addresses, user)
        except (StoreError, OSError) as exc:
            log.error("submission: MAIL from %s failed: %s", user, exc)
            return TRY_LATER
        if address.lower() not in own:
            log.warning("submission: %s may not send as %r", user, address)
            return NOT_YOURS.format(address=address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        user, raw = str(session.auth_data), envelope.original_content or b""
        refused = refusal(raw, self.max_message_size) or await self._check(user, raw, envelope)
        if refused is not None:
            log.warning("submission: refused %d bytes from %s: %s", len(raw), user, refused)
            return refused
        raw, via = take_via(raw)
        via_desktop = bool(via)
        try:
            item = await asyncio.to_thread(
                self.submit, user, raw, via_desktop, list(envelope.rcpt_tos)
            )
        except OutgoingRefused as exc:
            reply = REFUSED.format(reason=" ".join(str(exc).split()))
            log.warning("submission: refused %d bytes from %s: %s", len(raw), user, reply)
            return reply
        except (MessageError, ConfigError) as exc:
            log.warning("submission: %d bytes from %s not taken: %s", len(raw), user, exc)
            return "554 5.6.0 " + " ".join(str(exc).split())
        except (TransientError, StoreError, BridgeError, OSError) as exc:
            log.error("submission: %d bytes from %s not taken: %s; 451", len(raw), user, exc)
            return TRY_LATER
        except Exception as exc:  # whatever the hand-off raises, the listener goes on
            log.error(
                "submission: %d bytes from %s not taken: %s: %s; 451",
                len(raw), user, type(exc).__name__, exc,
            )  # fmt: skip
            return TRY_LATER
        reply = outcome(item, via_desktop)
        log.info(
            "submission: %s sent %d bytes to %d recipients %s, %s (outbox id %s): %s",
            user, len(raw), len(envelope.rcpt_tos), "via the desktop" if via_desktop
            else "now", item.state, item.id, reply,
        )  # fmt: skip
        return reply

    async def _check(self, user: str, raw: bytes, envelope: Envelope) -> str | None:
        """The refusal of a message this user may not send as it is, else None."""
        _, via = take_via(raw)
        if any(value != "desktop" for value in via):
            return BAD_VIA
        senders = header_addresses(raw, "From")
        if not senders:
            return NO_FROM
        try:
            own = await asyncio.to_thread(self._own_addresses, user)
        except (StoreError, OSError) as exc:
            log.error("submission: DATA from %s failed: %s", user, exc)
            return TRY_LATER
        if any(sender not in own for sender in senders):
            return FROM_NOT_YOURS
        return None

    def _own_addresses(self, user: str) -> set[str]:
        record = self.store.get_user(user)
        return {record.address.lower(), record.desktop_address.lower()}


def _decode(text: str) -> bytes | None:
    try:
        return b"" if text == "=" else base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(data: bytes) -> str:
    """A login or password as text; invalid UTF-8 becomes a NUL, which no stored
    password has (``set-password`` refuses it), so it is a wrong password."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\x00"


async def _first_response(server: SMTP, args: list[str], prompt: str) -> bytes | None:
    """The mechanism's first client response: the initial response given with AUTH, or
    the answer to a challenge; None (answered, or the client gave up) when unusable."""
    if len(args) > 1:
        data = _decode(args[1])
    else:
        answer = await server.challenge_auth(prompt)
        if answer is MISSING:
            return None
        assert isinstance(answer, bytes)
        data = answer
    if data is None:
        await server.push("501 5.5.2 cannot decode base64")
    return data


async def _plain(server: SMTP, args: list[str]) -> tuple[str, str] | None:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``; an authzid other than the login
    (acting for someone else) is refused as a bad login."""
    data = await _first_response(server, args, "")
    if data is None:
        return None
    parts = data.split(b"\x00")
    if len(parts) != 3:
        await server.push("501 5.5.2 cannot split the PLAIN response")
        return None
    authzid, login, password = parts
    if authzid and authzid != login:
        return "", ""  # checked like any bad login: counted, 535
    return _text(login), _text(password)


async def _login(server: SMTP, args: list[str]) -> tuple[str, str] | None:
    """The LOGIN mechanism: user name and password in two base64 challenges."""
    login = await _first_response(server, args, "Username:")
    if login is None:
        return None
    password = await server.challenge_auth("Password:")
    if password is MISSING:
        return None
    assert isinstance(login, bytes) and isinstance(password, bytes)
    return _text(login), _text(password)


class SubmissionSMTP(BridgeSMTP):
    """The shared protocol with submission's wordings and a longer AUTH line."""

    log_name = "submission"
    reworded = _REWORDED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # per connection: aiosmtpd's own dict is shared by every instance of the class
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": AUTH_LINE_LIMIT}
        )


class SubmissionListener(SmtpListener):
    """The Listener (see :class:`.app.Listener`) for ``[server] submission_listen``."""

    def __init__(
        self,
        store: SubmissionStore,
        logins: Logins,
        *,
        hostname: str,
        max_message_size: int,
        tls_context: ssl.SSLContext,
        submit: Submit | None = None,
        relay: Relay | None = None,
    ) -> None:
        """``relay``: how send-now mail leaves (``[server]``'s ``[relay]``; None: it waits
        queued for a process that has one)."""
        super().__init__(hostname, max_message_size, tls_context)
        self.handler = SubmissionHandler(store, logins, max_message_size, submit, relay)

    def protocol(self) -> SMTP:
        return SubmissionSMTP(
            self.handler,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            **self.settings(),
        )
