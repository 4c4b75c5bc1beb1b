"""send_trigger_mail against a real SMTP server (aiosmtpd delivering into Dovecot): what
arrives, each security mode, and how each kind of failure is reported."""

from __future__ import annotations

import socket
import ssl
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

import pytest
import smtp_servers
from aiosmtpd.smtp import AuthResult, LoginPassword
from dovecot import Dovecot

from imapsync_bridge.config import MailServer
from imapsync_bridge.errors import AuthError, MailRefused, TransientError
from imapsync_bridge.server.trigger_mail import new_sync_phrase, new_trigger_key, send_trigger_mail
from imapsync_bridge.sync.trigger import parse_token, token_mac

PHRASE = new_sync_phrase()
KEY = new_trigger_key()


def send(relay: MailServer, to: str) -> str:
    return send_trigger_mail(relay, user="alice", sender="alice@phone.example", to=to,
                             phrase=PHRASE, key=KEY)  # fmt: skip


def plain(smtp: smtp_servers.MailServer) -> MailServer:
    return MailServer("relay", smtp.host, smtp.port, "none", "", None)


def test_the_trigger_mail_arrives_as_specified(dovecot: Dovecot, imap_user: str) -> None:
    with smtp_servers.MailServer(dovecot) as smtp:
        message_id = send(plain(smtp), f"{imap_user}@corp.example")
        (got,) = smtp.received
    raw = got.raw
    assert got.rcpt_tos == [f"{imap_user}@corp.example"]
    mail = BytesParser(policy=default).parsebytes(raw)
    assert (mail["Subject"], mail["From"], mail["To"], mail["Message-ID"].strip()) == (
        PHRASE, "alice@phone.example", f"{imap_user}@corp.example", message_id,
    )  # fmt: skip
    token = parse_token(mail["X-Bridge-Trigger"])
    assert token is not None and token.mac == token_mac(KEY, "alice", token.nonce, token.ts)
    assert mail["Date"] is not None and "synchronize" in mail.get_content()


@pytest.mark.parametrize(
    ("reply", "error"),
    [("452 4.2.2 mailbox full", TransientError), ("550 5.1.1 no such user", MailRefused)],
)
def test_a_refusal_is_transient_for_4xx_and_permanent_for_5xx(
    dovecot: Dovecot, reply: str, error: type[Exception]
) -> None:
    with smtp_servers.MailServer(dovecot) as smtp:
        smtp.answer("rcpt", reply)
        with pytest.raises(error, match=reply.split()[0]):
            send(plain(smtp), "nobody@corp.example")
        assert smtp.received == []


def test_an_unreachable_relay_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(TransientError, match=f"relay 127.0.0.1:{port}"):
        send(MailServer("relay", "127.0.0.1", port, "none", "", None), "a@corp.example")


def test_starttls_is_required_verified_and_carries_auth(
    dovecot: Dovecot, imap_user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dovecot.cert_path is not None and dovecot.key_path is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(dovecot.cert_path, dovecot.key_path)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, data):  # type: ignore[no-untyped-def]
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"relay-secret", handled=False)

    password = tmp_path / "relay.pass"
    password.write_text("relay-secret\n")
    password.chmod(0o600)
    to = f"{imap_user}@corp.example"
    with smtp_servers.MailServer(dovecot) as bare:  # offers no STARTTLS: never sent in plain text
        with pytest.raises(AuthError, match="STARTTLS"):
            send(MailServer("relay", bare.host, bare.port, "starttls", "", None), to)
        assert bare.received == []
    options = {"tls_context": context, "require_starttls": True, "authenticator": authenticator}
    with smtp_servers.MailServer(dovecot, options=options) as smtp:
        relay = MailServer("relay", smtp.host, smtp.port, "starttls", "phone-relay", password)
        with pytest.raises(AuthError, match="TLS"):  # the test CA is not trusted yet
            send(relay, to)
        monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert_path))
        send(relay, to)
        assert logins == [(b"phone-relay", b"relay-secret")] and len(smtp.received) == 1
        password.write_text("wrong\n")
        with pytest.raises(MailRefused, match="refused the login: 535"):
            send(relay, to)
