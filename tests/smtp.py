"""A corporate SMTP server for tests: aiosmtpd on loopback delivering into the test Dovecot.

Each accepted message gets a ``Received:`` line and is APPENDed (IMAP, as a delivery agent
would hand it over) to the INBOX of the Dovecot user named by each recipient's local part,
so ``user7-123@corp.example`` lands in Dovecot user ``user7-123``'s inbox. The mail then
really arrives where the agent looks, as the trigger mail does in production.

    with CorporateSmtp(dovecot) as smtp:
        smtplib.SMTP(smtp.host, smtp.port).sendmail(...)
        smtp.delivered  # [(user, raw bytes), ...]

Keyword options go to aiosmtpd's ``SMTP`` (``tls_context``, ``require_starttls``,
``authenticator``, ...); :attr:`CorporateSmtp.rcpt_reply` set to e.g. ``"452 4.2.2 full"``
refuses every recipient with that reply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from email.utils import format_datetime
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from dovecot import Dovecot


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Deliver:
    """aiosmtpd handler: DATA → one IMAP APPEND per recipient (550 when that fails)."""

    def __init__(self, owner: CorporateSmtp) -> None:
        self.owner = owner

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if self.owner.rcpt_reply is not None:
            return self.owner.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        now = dt.datetime.now(dt.UTC)
        received = (
            f"Received: from {session.host_name or 'unknown'} by corp-smtp.test (aiosmtpd);"
            f" {format_datetime(now)}\r\n"
        ).encode()
        for rcpt in envelope.rcpt_tos:
            user = rcpt.partition("@")[0]
            try:
                await asyncio.to_thread(
                    self.owner.dovecot.append, user, received + content, now
                )  # fmt: skip
            except Exception as exc:  # the test sees the 550 and the reason
                return f"550 delivery to {rcpt} failed: {exc}"
            self.owner.delivered.append((user, received + content))
        return "250 delivered"


class CorporateSmtp:
    """aiosmtpd's threaded :class:`Controller` on 127.0.0.1 and a free port."""

    host = "127.0.0.1"

    def __init__(self, dovecot: Dovecot, **smtp_options: Any) -> None:
        self.dovecot = dovecot
        self.port = _free_port()
        self.delivered: list[tuple[str, bytes]] = []
        self.rcpt_reply: str | None = None
        self._controller = Controller(
            _Deliver(self), hostname=self.host, port=self.port, **smtp_options
        )

    def start(self) -> CorporateSmtp:
        self._controller.start()  # raises when the listener does not come up
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> CorporateSmtp:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
