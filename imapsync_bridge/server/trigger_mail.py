"""The hosted server's half of the trigger mail (patent FIG. 11): make the secret at
pairing, and send the mail through the relay when the phone asks for a sync and the
agent's push connection is down.

The mail goes from the phone address to the user's corporate (desktop) address, so it
arrives in the very inbox the agent watches; its Subject is the sync phrase and its
``X-Bridge-Trigger`` header a token signed with the key shared at pairing (see
:mod:`imapsync_bridge.sync.trigger` for what the agent accepts). The agent expunges it:
the user never sees it, neither on the desktop nor on the phone.
"""

from __future__ import annotations

import secrets
import smtplib
import ssl
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from imapsync_bridge.config import MailServer
from imapsync_bridge.errors import AuthError, MailRefused, TransientError
from imapsync_bridge.sync.trigger import TOKEN_HEADER, make_token

#: Easy to read and type on a phone: no 0/O, no 1/I/L. 16 symbols: ~79 bits.
PHRASE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
PHRASE_GROUPS = 4
PHRASE_GROUP_SIZE = 4
KEY_BYTES = 32
SMTP_TIMEOUT = 30.0

BODY = """\
This message asks your imapsync-bridge agent to synchronize your phone mailbox now.
It was sent by your phone mail service because you asked for a sync.

The agent removes this message from your inbox when it sees it; you may ignore it.
"""


def new_sync_phrase() -> str:
    """A fresh secret phrase, e.g. ``sync-7KQ2-MX4P-9RTA-XW3H`` (matched ignoring case,
    spaces and hyphens, so it can be typed by hand on any phone keyboard)."""
    groups = (
        "".join(secrets.choice(PHRASE_ALPHABET) for _ in range(PHRASE_GROUP_SIZE))
        for _ in range(PHRASE_GROUPS)
    )
    return "-".join(("sync", *groups))


def new_trigger_key() -> bytes:
    """A fresh HMAC key for the trigger token (256 bits)."""
    return secrets.token_bytes(KEY_BYTES)


def trigger_message(
    *, user: str, sender: str, to: str, phrase: str, key: bytes, now: datetime
) -> EmailMessage:
    """The trigger mail itself, token signed for this moment with a fresh nonce."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = phrase
    message["Date"] = format_datetime(now.astimezone(UTC))
    domain = sender.rpartition("@")[2] or None
    message["Message-ID"] = make_msgid("sync-trigger", domain=domain)
    message[TOKEN_HEADER] = make_token(key, user, secrets.token_hex(16), int(now.timestamp()))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to it
    message.set_content(BODY)
    return message


def send_trigger_mail(
    relay: MailServer,
    *,
    user: str,
    sender: str,
    to: str,
    phrase: str,
    key: bytes,
    now: datetime | None = None,
) -> str:
    """Send one trigger mail through the relay; returns its Message-ID.

    ``relay.security``: ``tls`` (implicit TLS), ``starttls`` (required: a server that
    does not offer it is refused, never used in plain text) or ``none`` (plain; the
    configuration allows it only for a loopback host). Certificates are verified with
    the system's trust store. AUTH when the relay has a username.

    Raises :class:`TransientError` when the relay cannot be reached, drops the
    connection or answers 4xx (try again later), :class:`MailRefused` for a 5xx or a
    refused login, :class:`AuthError` when TLS fails (certificate not trusted, STARTTLS
    not offered).
    """
    message = trigger_message(
        user=user, sender=sender, to=to, phrase=phrase, key=key, now=now or datetime.now(UTC)
    )
    _submit(relay, sender, [to], message)
    return str(message["Message-ID"])


def _submit(relay: MailServer, sender: str, recipients: list[str], message: EmailMessage) -> None:
    where = f"relay {relay.host}:{relay.port}"
    try:
        smtp = _connect(relay)
        try:
            if relay.username:
                smtp.login(relay.username, relay.password() or "")
            refused = smtp.send_message(message, sender, recipients)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _text in exc.recipients.values()]
        detail = "; ".join(f"{r}: {c} {_text(t)}" for r, (c, t) in exc.recipients.items())
        raise _by_code(min(codes), f"{where} refused the recipient ({detail})") from None
    except smtplib.SMTPAuthenticationError as exc:
        reply = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        raise MailRefused(f"{where} refused the login: {reply}") from None
    except smtplib.SMTPResponseException as exc:
        raise _by_code(exc.smtp_code, f"{where}: {exc.smtp_code} {_text(exc.smtp_error)}") from None
    except smtplib.SMTPNotSupportedError as exc:
        raise AuthError(f"{where}: {exc}") from None
    except ssl.SSLError as exc:
        raise AuthError(f"{where}: TLS failed: {exc.reason or exc}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise TransientError(f"{where}: {exc or type(exc).__name__}") from None
    if refused:
        raise MailRefused(f"{where} refused {', '.join(sorted(refused))}")


def _connect(relay: MailServer) -> smtplib.SMTP:
    """A connected session in the relay's security mode (EHLO done)."""
    if relay.security == "tls":
        context = ssl.create_default_context()
        return smtplib.SMTP_SSL(relay.host, relay.port, timeout=SMTP_TIMEOUT, context=context)
    smtp = smtplib.SMTP(relay.host, relay.port, timeout=SMTP_TIMEOUT)
    try:
        if relay.security == "starttls":
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError(
                    "STARTTLS is required (security = starttls) but not offered"
                )
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
    except BaseException:
        smtp.close()
        raise
    return smtp


def _by_code(code: int, text: str) -> MailRefused | TransientError:
    return TransientError(text) if 400 <= code < 500 else MailRefused(text)


def _text(reply: bytes | str) -> str:
    value = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(value.split())[:300]
