"""Sending one message over SMTP (smtplib): the hosted server's relay and the agent's
corporate SMTP server both go through :func:`send`.

Why the transaction is driven step by step (MAIL, RCPT, then DATA) rather than with
``sendmail``: the caller must record "sending" durably between the last RCPT and DATA
(``before_data``), because only failures before DATA are safe to retry (FACTS.md,
"Sending exactly once"). The outcome is classified by :func:`.sync.outgoing.classify`.

All or nothing per message: if any recipient is refused, the transaction is reset and
nothing is sent, so a message has one state (a 5xx for one recipient fails it; only 4xx
refusals defer it).

Security as configured: ``tls`` (implicit TLS), ``starttls`` (required: no plaintext
fallback) or ``none`` (the config allows it only for a loopback host); AUTH (LOGIN or
PLAIN, as smtplib picks) when a username is set, or with ``auth = oauth2`` SASL
OAUTHBEARER or XOAUTH2 with a fresh access token. Nothing secret is logged.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from imapsync_bridge.config import MailServer
from imapsync_bridge.errors import ConnectionLost, LoginRefused
from imapsync_bridge.oauth2 import tokens
from imapsync_bridge.oauth2.providers import oauthbearer, pick_mechanism, xoauth2
from imapsync_bridge.sync.outgoing import Outcome, classify

log = logging.getLogger(__name__)

TIMEOUT = 30.0
CONNECT_ATTEMPTS = 3  # tries to reach the server within one send (tenacity, backoff)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    code: int | None
    reply: str  # the server's reply text (or what failed), one line, for the phone

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


class _Unreachable(Exception):
    """Connecting or greeting failed: nothing was sent (tenacity retries these)."""


def _failed(exc: smtplib.SMTPResponseException, data_started: bool) -> Result:
    return Result(classify(exc.smtp_code, data_started), exc.smtp_code,
                  _reply(exc.smtp_code, exc.smtp_error))  # fmt: skip


def _reply(code: int | None, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    text = " ".join(text.split())[:1000]
    return f"{code} {text}" if code is not None else text


@retry(
    retry=retry_if_exception_type(_Unreachable),
    stop=stop_after_attempt(CONNECT_ATTEMPTS),
    wait=wait_exponential(multiplier=0.2, max=2),
    reraise=True,
)
def _connect(server: MailServer, local_hostname: str, timeout: float) -> smtplib.SMTP:
    context = ssl.create_default_context()
    try:
        conn: smtplib.SMTP
        if server.security == "tls":
            conn = smtplib.SMTP_SSL(
                server.host, server.port, local_hostname, timeout=timeout, context=context
            )
        else:
            conn = smtplib.SMTP(server.host, server.port, local_hostname, timeout=timeout)
        conn.ehlo()
        if server.security == "starttls":
            conn.starttls(context=context)
            conn.ehlo()
    except (OSError, smtplib.SMTPException) as exc:
        raise _Unreachable(f"cannot reach {server.host}:{server.port}: {exc}") from exc
    return conn


def send(
    server: MailServer,
    sender: str,
    recipients: list[str],
    raw: bytes,
    *,
    local_hostname: str | None = None,
    before_data: Callable[[], None] | None = None,
    timeout: float = TIMEOUT,
) -> Result:
    """One SMTP transaction; never raises for SMTP or network trouble (the result says
    what happened), but ``before_data``'s own errors (a failed durable record) propagate
    before DATA is sent. A ``BridgeError`` from the password lookup propagates."""
    password = server.password() if server.username else None
    token = tokens.access_token(server) if server.auth == "oauth2" else None
    try:
        conn = _connect(server, local_hostname or socket.gethostname(), timeout)
    except _Unreachable as exc:
        return Result(Outcome.TEMPORARY, None, _reply(None, str(exc)))
    data_started = False
    try:
        if server.username:
            try:
                _login(conn, server, password, token)
            except smtplib.SMTPAuthenticationError as exc:
                # The account's problem, not the message's: retried later, not failed.
                log.error("%s:%s refused the [%s] login", server.host, server.port, server.role)
                if token is not None:  # the next attempt refreshes first
                    tokens.forget_access_token(server)
                return Result(
                    Outcome.TEMPORARY, exc.smtp_code, _reply(exc.smtp_code, exc.smtp_error)
                )
        options = [f"SIZE={len(raw)}"] if conn.has_extn("size") else []
        code, message = conn.mail(sender, options)
        if code != 250:
            conn.rset()
            return Result(classify(code, False), code, _reply(code, message))
        for rcpt in recipients:
            code, message = conn.rcpt(rcpt)
            if code not in (250, 251):
                conn.rset()
                return Result(classify(code, False), code, _reply(code, message))
        if before_data is not None:
            before_data()
        data_started = True
        try:
            code, message = conn.data(raw)
        except smtplib.SMTPDataError as exc:  # DATA itself refused: nothing was taken
            return Result(
                classify(exc.smtp_code, False), exc.smtp_code, _reply(exc.smtp_code, exc.smtp_error)
            )
        return Result(classify(code, True), code, _reply(code, message))
    except smtplib.SMTPResponseException as exc:
        return Result(
            classify(exc.smtp_code, data_started),
            exc.smtp_code,
            _reply(exc.smtp_code, exc.smtp_error),
        )
    except (OSError, smtplib.SMTPException) as exc:
        return Result(classify(None, data_started), None, _reply(None, f"connection failed: {exc}"))
    finally:
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            conn.close()


def _login(
    conn: smtplib.SMTP, server: MailServer, password: str | None, token: tokens.AccessToken | None
) -> None:
    """AUTH as configured: with the password, or with the OAuth2 access token."""
    if token is None:
        conn.login(server.username, password or "")
    else:
        _oauth2_login(conn, server, token.value)


def _oauth2_login(conn: smtplib.SMTP, server: MailServer, token: str) -> None:
    """AUTH OAUTHBEARER or XOAUTH2 with the initial response; an error challenge (334)
    is answered with an empty line, so the server ends with its 5xx."""
    offered = set(conn.esmtp_features.get("auth", "").upper().split())
    mechanism = pick_mechanism(offered)
    if mechanism is None:
        raise smtplib.SMTPNotSupportedError(
            f"{server.host}:{server.port} offers neither OAUTHBEARER nor XOAUTH2"
        )
    initial = (
        oauthbearer(server.username, token, server.host, server.port)
        if mechanism == "OAUTHBEARER"
        else xoauth2(server.username, token)
    )
    conn.auth(mechanism, lambda challenge=None: initial if challenge is None else "")


def probe(server: MailServer, *, timeout: float = TIMEOUT) -> None:
    """Connect, secure and log in as configured, then QUIT, sending nothing (``agent
    check``). ``ConnectionLost`` when the server cannot be reached or secured,
    ``LoginRefused`` when it refuses the login; no message names a secret."""
    password = server.password() if server.username else None
    token = tokens.access_token(server) if server.auth == "oauth2" else None
    where = f"{server.host}:{server.port}"
    try:
        conn = _connect(server, socket.gethostname(), timeout)
    except _Unreachable as exc:
        raise ConnectionLost(str(exc)) from None
    try:
        if server.username:
            _login(conn, server, password, token)
    except smtplib.SMTPAuthenticationError as exc:
        reply = _reply(exc.smtp_code, exc.smtp_error)
        raise LoginRefused(f"{where} refused the login as {server.username!r}: {reply}") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise ConnectionLost(f"{where}: AUTH failed: {exc}") from None
    finally:
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            conn.close()


__all__ = ["Result", "probe", "send"]
