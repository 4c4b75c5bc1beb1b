"""SMTP servers for the mail tests (outgoing, trigger, submission): aiosmtpd on loopback.

:class:`MailServer` plays the corporate SMTP server (the agent's ``[smtp]``) or the hosted
server's ``[relay]``. Every accepted message is recorded (``received``) and, for a
recipient at ``corp.example``, APPENDed over IMAP into that Dovecot user's INBOX (the
local part names the user), as a delivery agent hands mail over — so mail really arrives.

It can be told to answer a reply of its choosing at MAIL, RCPT or end of DATA
(``answer("rcpt", "450 4.2.0 try later", times=1)``), and to call ``hooks[stage]()``
at ``mail`` (before it answers MAIL FROM: nothing taken yet) or ``data`` (the message
taken and recorded, its 250 not yet sent) — where fault tests SIGKILL a process.

With ``oauth2`` (a function from an access token to its user, or None: e.g.
``AuthorizationServer.user_of``) it offers AUTH OAUTHBEARER and XOAUTH2 (``options`` may
need ``auth_require_tls=False`` on plain loopback) and records who logged in (``logins``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from dovecot import Dovecot


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message_id(self) -> str:
        header = BytesHeaderParser(policy=compat32).parsebytes(self.raw)
        return str(header.get("Message-ID", ""))


@dataclass
class _Reply:
    text: str
    times: int | None  # None: for good


@dataclass
class MailServer:
    dovecot: Dovecot | None = None
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    hooks: dict[str, Callable[[], None]] = field(default_factory=dict)
    #: aiosmtpd ``SMTP`` keyword options (``tls_context``, ``require_starttls``,
    #: ``authenticator``...), e.g. for a relay that wants STARTTLS and AUTH
    options: dict[str, Any] = field(default_factory=dict)
    oauth2: Callable[[str], str | None] | None = None
    logins: list[tuple[str, str]] = field(default_factory=list)  # (mechanism, user)
    _replies: dict[str, _Reply] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    def answer(self, stage: str, reply: str, times: int | None = None) -> None:
        """Answer ``reply`` at ``stage`` (mail, rcpt, data), ``times`` times or for good."""
        self._replies[stage] = _Reply(reply, times)

    def clear(self) -> None:
        self._replies.clear()

    def ids(self) -> list[str]:
        with self._lock:
            return [r.message_id for r in self.received]

    def _canned(self, stage: str) -> str | None:
        reply = self._replies.get(stage)
        if reply is None:
            return None
        if reply.times is not None:
            reply.times -= 1
            if reply.times <= 0:
                del self._replies[stage]
        return reply.text

    # aiosmtpd handler hooks
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if "mail" in self.hooks:
            await asyncio.to_thread(self.hooks["mail"])
        canned = self._canned("mail")
        if canned:
            return canned
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        canned = self._canned("rcpt")
        if canned:
            return canned
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        canned = self._canned("data")
        if canned:
            return canned
        with self._lock:
            self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
        for rcpt in envelope.rcpt_tos:
            user, _, domain = rcpt.partition("@")
            if self.dovecot is not None and domain == "corp.example":
                now = dt.datetime.now(dt.UTC)
                await asyncio.to_thread(self.dovecot.append, user, raw, now)
        if "data" in self.hooks:
            await asyncio.to_thread(self.hooks["data"])
        return "250 2.0.0 queued as test"

    # SASL OAUTHBEARER (RFC 7628) and XOAUTH2, offered only when ``oauth2`` is set
    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        return await self._bearer(server, args, "OAUTHBEARER")

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        return await self._bearer(server, args, "XOAUTH2")

    async def _bearer(self, server: SMTP, args: list[str], mechanism: str) -> AuthResult:
        # args: the mechanism, then the initial response when the client sent one
        data = base64.b64decode(args[1]) if len(args) > 1 else await server.challenge_auth("")
        if not isinstance(data, bytes) or self.oauth2 is None:
            return AuthResult(success=False, handled=False)
        text = data.decode("utf-8", "replace")
        fields = dict(f.split("=", 1) for f in text.split("\x01") if "=" in f)
        claimed = fields.get("user") or text.partition("a=")[2].partition(",")[0]
        token = fields.get("auth", "").removeprefix("Bearer ")
        user = self.oauth2(token)
        if user is None or user != claimed:
            return AuthResult(success=False, handled=False)
        self.logins.append((mechanism, user))
        return AuthResult(success=True, handled=False, auth_data=LoginPassword(user.encode(), b""))

    def start(self) -> MailServer:
        options = dict(self.options)
        if self.oauth2 is None:
            options.setdefault("auth_exclude_mechanism", ["OAUTHBEARER", "XOAUTH2"])
        self._controller = Controller(
            self, hostname=self.host, port=self.port, server_hostname="smtp.test",
            ready_timeout=10, **options,
        )  # fmt: skip
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def __enter__(self) -> MailServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
