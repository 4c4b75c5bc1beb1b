"""Submission (issue 8, test 5): phone mail apps send through ``submission_listen``.

The real hosted server (``server run`` in a thread, its aiosmtpd submission listener on
a free port, ``Running.ports["submission"]``), spoken to with the stdlib's ``smtplib``
over STARTTLS, the client verifying the server's certificate against the CA of
``server init``; passwords set with ``server set-password``. Up to the hand-off to
``PhoneService.submit`` the tests record what the listener hands over (its ``submit``
hook); the end-to-end tests at the end go through the real ``PhoneService.submit`` to
``[relay]`` (an aiosmtpd server, ``tests/smtp_servers.py``) and the phone's outbox.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import smtplib
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bridge import ServerThread, run_cli
from smtp_servers import MailServer
from test_agent_run import wait_for
from test_smtp_in import set_options

from imapsync_bridge.errors import TransientError
from imapsync_bridge.protocol import pki
from imapsync_bridge.server.app import init_server
from imapsync_bridge.server.phone import OutboxItem, OutgoingRefused
from imapsync_bridge.server.submission import SubmissionListener, take_via

MAX_SIZE = 64 * 1024
PASSWORD = "Phone pass 1"


@dataclass
class Handed:
    """What the listener handed to the phone service, and what it answers with."""

    calls: list[tuple[str, bytes, bool]] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    fail: Exception | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, user: str, raw: bytes, via_desktop: bool, to: list[str]) -> OutboxItem:
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.calls.append((user, raw, via_desktop))
            self.recipients.append(to)
            n = len(self.calls)
        state = "queued" if via_desktop else "sent"
        return OutboxItem(n, None, "", user, "", True, False, "outbox", [], state)


@dataclass
class Hosted:
    ini: Path
    thread: ServerThread
    handed: Handed

    @property
    def port(self) -> int:
        return self.thread.ports["submission"]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ini.parent / pki.CA_CRT))

    def connect(self, tls: bool = True, source: str = "127.0.0.1") -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        if tls:
            client.starttls(context=self.context())
        return client

    def login(self, user: str = "alice", password: str = PASSWORD) -> smtplib.SMTP:
        client = self.connect()
        client.login(user, password)
        return client


def set_password(ini: Path, user: str, password: str) -> None:
    old = sys.stdin
    sys.stdin = io.StringIO(password + "\n")
    try:
        rc, _out, err = run_cli("server", "set-password", "--config", str(ini), user)
    finally:
        sys.stdin = old
    assert rc == 0, err


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[Hosted]:
    ini = init_server(
        tmp_path / "server", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
    )
    set_options(ini, max_message_size=MAX_SIZE)
    for user in ("alice", "bob"):
        rc, _out, err = run_cli(
            "server", "add-user", "--config", str(ini), user, "--address",
            f"{user}@phone.example", "--desktop-address", f"{user}@corp.example",
        )  # fmt: skip
        assert rc == 0, err
        set_password(ini, user, PASSWORD if user == "alice" else "bob's own")
    thread = ServerThread(ini).start()
    handed = Handed()
    assert thread.running is not None
    listener = thread.running.listeners["submission"]
    assert isinstance(listener, SubmissionListener)
    listener.handler.submit = handed  # the hand-off hook: record instead of sending
    try:
        yield Hosted(ini, thread, handed)
    finally:
        thread.stop()


def message(*headers: str, sender: str = "alice@phone.example", body: str = "hi\r\n") -> bytes:
    lines = [
        f"From: Alice <{sender}>",
        "To: Carol <carol@example.net>",
        "Subject: from the phone",
        f"Message-ID: <sub.{time.monotonic_ns()}@phone.example>",
        "Date: Mon, 02 Dec 2024 10:00:00 +0000",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


# -- TLS and AUTH ----------------------------------------------------------------------
def test_before_starttls_no_auth_is_offered_and_auth_or_mail_are_refused(hosted: Hosted) -> None:
    with hosted.connect(tls=False) as client:
        code, ehlo = client.ehlo()
        assert code == 250 and b"STARTTLS" in ehlo and b"AUTH" not in ehlo
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD)) == (
            530,
            b"5.7.0 must issue STARTTLS first",
        )
        assert client.docmd("MAIL", "FROM:<alice@phone.example>") == (
            530,
            b"5.7.0 must issue STARTTLS first",
        )
        assert client.noop()[0] == 250  # the connection goes on
    assert hosted.handed.calls == []


def test_the_client_verifies_the_servers_certificate(hosted: Hosted) -> None:
    with hosted.connect(tls=False) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())  # not our CA: refused
    with hosted.connect() as client:
        assert client.sock is not None
        cert = client.sock.getpeercert()  # type: ignore[attr-defined]
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
        code, ehlo = client.ehlo()
        assert b"AUTH LOGIN PLAIN" in ehlo and b"STARTTLS" not in ehlo


def test_mail_without_auth_is_530(hosted: Hosted) -> None:
    with hosted.connect() as client:
        client.ehlo()
        assert client.mail("alice@phone.example") == (530, b"5.7.0 authentication required")
        assert client.rcpt("carol@example.net")[0] == 530


def test_good_and_wrong_passwords_plain_and_login_by_name_or_address(hosted: Hosted) -> None:
    with hosted.connect() as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login("alice", "not it")
        assert (wrong.value.smtp_code, wrong.value.smtp_error) == (
            535,
            b"5.7.8 authentication credentials invalid",
        )
        assert client.login("alice", PASSWORD) == (235, b"2.7.0 authentication successful")
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))[0] == 503
    with hosted.connect() as client:
        client.ehlo()
        client.user, client.password = "ALICE@phone.example", PASSWORD
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
    with hosted.connect() as client:
        client.ehlo()
        client.user, client.password = "bob", PASSWORD  # alice's password is not bob's
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("LOGIN", client.auth_login)
        # acting for another user (an authzid) is a bad login
        blob = base64.b64encode(f"bob\0alice\0{PASSWORD}".encode()).decode()
        assert client.docmd("AUTH", "PLAIN " + blob)[0] == 535
        assert client.docmd("AUTH", "PLAIN not-base64!")[0] == 501


def auth_plain(hosted: Hosted, source: str, login: str, password: str, times: int = 1) -> int:
    """AUTH PLAIN ``times`` over one connection from ``source`` (a loopback address of
    its own, so the throttle sees a client of its own); the last reply code."""
    with hosted.connect(source=source) as client:
        client.ehlo()
        for _ in range(times):
            code = int(client.docmd("AUTH", "PLAIN " + plain(login, password))[0])
    return code


def test_ten_bad_passwords_throttle_the_user_even_with_the_right_one(hosted: Hosted) -> None:
    assert auth_plain(hosted, "127.0.0.2", "alice", "guess", times=9) == 535
    assert auth_plain(hosted, "127.0.0.3", "alice", PASSWORD) == 235  # her count starts again
    assert auth_plain(hosted, "127.0.0.4", "alice", "guess", times=5) == 535
    assert auth_plain(hosted, "127.0.0.5", "ALICE@phone.example", "guess", times=5) == 535
    with hosted.connect(source="127.0.0.6") as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD)) == (
            454,
            b"4.7.0 too many failed logins, try later",
        )
        assert client.docmd("AUTH", "PLAIN " + plain("bob", "bob's own"))[0] == 235
    assert hosted.thread.running is not None
    assert hosted.thread.running.logins.throttle.refused("user:alice")


def test_ten_bad_passwords_from_an_address_throttle_it_for_every_user(hosted: Hosted) -> None:
    assert auth_plain(hosted, "127.0.0.7", "bob", "guess", times=5) == 535
    assert auth_plain(hosted, "127.0.0.7", "nobody", "guess", times=4) == 535
    assert auth_plain(hosted, "127.0.0.7", "alice", PASSWORD) == 235  # resets alice, not .7
    assert auth_plain(hosted, "127.0.0.7", "nobody", "guess") == 535  # the tenth in a row
    assert auth_plain(hosted, "127.0.0.7", "alice", PASSWORD) == 454
    assert auth_plain(hosted, "127.0.0.8", "alice", PASSWORD) == 235
    assert auth_plain(hosted, "127.0.0.8", "bob", "bob's own") == 235


def test_passwords_are_never_logged(hosted: Hosted, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with hosted.connect() as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + plain("alice", "Wrong guess 7"))[0] == 535
        client.user, client.password = "alice", PASSWORD
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
    text = caplog.text
    assert "submission: bad password for 'alice' from 127.0.0.1:" in text
    assert "submission: alice logged in from 127.0.0.1:" in text
    for secret in ("Wrong guess 7", PASSWORD, plain("alice", "Wrong guess 7")):
        assert secret not in text
    assert base64.b64encode(PASSWORD.encode()).decode() not in text


# -- what the user may send ------------------------------------------------------------
def test_the_envelope_sender_must_be_one_of_the_users_addresses(hosted: Hosted) -> None:
    with hosted.login() as client:
        assert client.mail("bob@phone.example") == (
            553,
            b"5.7.1 <bob@phone.example>: not one of your addresses",
        )
        assert client.mail("<>")[0] == 553
        assert client.mail("ALICE@corp.example")[0] == 250  # the desktop address is hers
        client.rset()
        raw = message(sender="alice@corp.example")
        assert client.sendmail("alice@phone.example", ["carol@example.net"], raw) == {}
    assert [(u, r, v) for u, r, v in hosted.handed.calls] == [("alice", raw, False)]


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (message(sender="bob@phone.example"), "550 5.7.1 the From: header must name only"),
        (message("From: mallory@example.org"), "550 5.7.1 the From: header must name only"),
        (b"To: carol@example.net\r\nSubject: x\r\n\r\nhi\r\n", "550 5.6.0 the message has no"),
        (message("X-Bridge-Via: now"), '550 5.6.0 X-Bridge-Via: only "desktop"'),
        (message(body="a\x00b\r\n"), "554 5.6.0 NUL bytes"),
        (message(body="bare\nline\r\n"), "554 5.6.0 bare CR or LF"),
    ],
)
def test_messages_the_user_may_not_send_are_refused(hosted: Hosted, raw: bytes, reply: str) -> None:
    with hosted.login() as client:
        client.mail("alice@phone.example")
        client.rcpt("carol@example.net")
        code, text = client.data(raw)
        assert f"{code} {text.decode()}".startswith(reply)
        assert client.noop()[0] == 250
    assert hosted.handed.calls == []


def test_the_envelope_recipients_are_handed_over_blind_copies_too(hosted: Hosted) -> None:
    raw = message("Cc: dave@example.net")
    to = ["carol@example.net", "dave@example.net", "Eve@example.net"]  # Eve: a blind copy
    with hosted.login() as client:
        assert client.sendmail("alice@phone.example", to, raw) == {}
    assert hosted.handed.calls == [("alice", raw, False)]
    assert hosted.handed.recipients == [to]


def test_too_large_is_552_declared_or_not(hosted: Hosted) -> None:
    huge = message(body=("y" * 76 + "\r\n") * (MAX_SIZE // 78 + 10))
    with hosted.login() as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:
            client.sendmail("alice@phone.example", ["carol@example.net"], huge)
        assert (declared.value.smtp_code, declared.value.smtp_error) == (
            552,
            b"5.3.4 message too big",
        )
        client.rset()
        assert client.mail("alice@phone.example")[0] == 250
        assert client.rcpt("carol@example.net")[0] == 250
        assert client.data(huge) == (552, b"5.3.4 message too big")
    assert hosted.handed.calls == []


# -- the hand-off ----------------------------------------------------------------------
def test_send_now_hands_over_the_bytes_as_they_came(hosted: Hosted) -> None:
    raw = message()
    with hosted.login() as client:
        assert client.sendmail("alice@phone.example", ["carol@example.net"], raw) == {}
        assert client.noop()[0] == 250
    assert hosted.handed.calls == [("alice", raw, False)]


def test_x_bridge_via_desktop_goes_via_the_desktop_without_the_header(hosted: Hosted) -> None:
    raw = message("X-Bridge-Via:\r\n  Desktop ", body="X-Bridge-Via: desktop\r\n")
    with hosted.login("alice@phone.example") as client:
        client.mail("alice@phone.example")
        client.rcpt("carol@example.net")
        assert client.data(raw) == (250, b"2.0.0 queued for your desktop (outbox id 1)")
    ((user, handed, via),) = hosted.handed.calls
    assert (user, via) == ("alice", True)
    assert handed == raw.replace(b"X-Bridge-Via:\r\n  Desktop \r\n", b"")
    assert b"\r\n\r\nX-Bridge-Via: desktop\r\n" in handed  # the body is not touched


def test_a_failing_hand_off_is_451_and_the_listener_goes_on(hosted: Hosted) -> None:
    hosted.handed.fail = TransientError("relay unreachable")
    with hosted.login() as client:
        client.mail("alice@phone.example")
        client.rcpt("carol@example.net")
        assert client.data(message()) == (451, b"4.3.0 temporary failure, try again later")
        hosted.handed.fail = None
        assert client.sendmail("alice@phone.example", ["carol@example.net"], message()) == {}
    assert len(hosted.handed.calls) == 1


def test_take_via_keeps_everything_else_byte_exact() -> None:
    raw = b"A: 1\r\nx-bridge-via : desktop\r\nB: 2\r\n folded\r\n\r\nbody\r\n"
    assert take_via(raw) == (b"A: 1\r\nB: 2\r\n folded\r\n\r\nbody\r\n", ["desktop"])
    assert take_via(b"A: 1\r\n\r\n") == (b"A: 1\r\n\r\n", [])
    assert take_via(b"X-Bridge-Via: desktop\r\n") == (b"", ["desktop"])


def test_a_refusal_of_the_phone_service_is_554_with_its_reason(hosted: Hosted) -> None:
    hosted.handed.fail = OutgoingRefused("101 recipients: at most 100")
    with hosted.login() as client:
        client.mail("alice@phone.example")
        client.rcpt("carol@example.net")
        assert client.data(message()) == (554, b"5.7.1 101 recipients: at most 100")
        assert client.noop()[0] == 250


# -- end to end: PhoneService.submit, the relay, the phone's outbox ----------------------
@dataclass
class Relayed:
    hosted: Hosted
    relay: MailServer

    def phone_list(self) -> dict[str, list[dict[str, object]]]:
        rc, out, err = run_cli(
            "phone", "--config", str(self.hosted.ini), "--user", "alice", "list", "--json"
        )
        assert rc == 0, err
        return dict(json.loads(out))

    def entry(self, folder: str, message_id: str) -> dict[str, object]:
        found = [m for m in self.phone_list()[folder] if m["message_id"] == message_id]
        assert len(found) == 1, self.phone_list()
        return found[0]

    def stored_raw(self, message_id: str) -> bytes:
        with sqlite3.connect(self.hosted.ini.parent / "phone.sqlite3") as db:
            (raw,) = db.execute(
                "SELECT raw FROM outbox WHERE message_id = ?", (message_id,)
            ).fetchone()
        return bytes(raw)

    def send(self, raw: bytes, to: str = "carol@example.net") -> tuple[int, str]:
        with self.hosted.login() as client:
            assert client.mail("alice@phone.example")[0] == 250
            assert client.rcpt(to)[0] == 250
            code, text = client.data(raw)
            assert client.noop()[0] == 250
        return code, text.decode()


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[Relayed]:
    relay = MailServer().start()
    ini = init_server(
        tmp_path / "server", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
    )
    text = ini.read_text().replace("port = 25\n", f"port = {relay.port}\n")
    ini.write_text(text.replace("host = localhost", "host = 127.0.0.1"))
    set_options(ini, max_message_size=MAX_SIZE)
    rc, _out, err = run_cli(
        "server", "add-user", "--config", str(ini), "alice", "--address",
        "alice@phone.example", "--desktop-address", "alice@corp.example",
    )  # fmt: skip
    assert rc == 0, err
    set_password(ini, "alice", PASSWORD)
    thread = ServerThread(ini).start()
    try:
        yield Relayed(Hosted(ini, thread, Handed()), relay)
    finally:
        thread.stop()
        relay.stop()


def message_id(raw: bytes) -> str:
    (line,) = [x for x in raw.split(b"\r\n") if x.startswith(b"Message-ID: ")]
    return line.removeprefix(b"Message-ID: ").decode()


def test_send_now_reaches_the_relay_and_is_in_the_phones_sent(relayed: Relayed) -> None:
    raw = message("Cc: dave@example.net")
    mid = message_id(raw)
    with relayed.hosted.login() as client:
        to = ["carol@example.net", "eve@example.net"]  # eve: a blind copy
        assert client.mail("alice@phone.example")[0] == 250
        for rcpt in to:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(raw)
    # the relay worker of `server run` may claim it first: then it is "being sent"
    assert (code, text.decode()) in [
        (250, "2.0.0 sent (outbox id 1)"),
        (250, "2.0.0 accepted, being sent (outbox id 1)"),
    ]
    wait_for(lambda: relayed.relay.received, 10, "the relay")
    (received,) = relayed.relay.received
    assert received.mail_from == "alice@phone.example"
    assert received.rcpt_tos == to
    assert received.message_id == mid
    assert received.raw.rstrip(b"\r\n") == raw.rstrip(b"\r\n")  # as it came
    wait_for(lambda: relayed.phone_list()["sent"], 10, "the phone's sent")
    sent = relayed.entry("sent", mid)
    assert sent["state"] == "sent" and sent["to"] == to, sent
    assert relayed.phone_list()["outbox"] == []


def test_via_desktop_is_queued_in_the_outbox_without_the_header(relayed: Relayed) -> None:
    raw = message("X-Bridge-Via: desktop", sender="alice@corp.example")
    mid = message_id(raw)
    assert relayed.send(raw) == (250, "2.0.0 queued for your desktop (outbox id 1)")
    queued = relayed.entry("outbox", mid)
    assert queued["state"] == "queued" and queued["to"] == ["carol@example.net"], queued
    stored = relayed.stored_raw(mid)
    assert b"x-bridge-via" not in stored.lower()
    assert stored.rstrip(b"\r\n") == raw.replace(b"X-Bridge-Via: desktop\r\n", b"").rstrip(b"\r\n")
    time.sleep(1.5)  # the relay worker's poll: via-desktop mail is not its business
    assert relayed.relay.received == [] and relayed.entry("outbox", mid)["state"] == "queued"


def test_a_5xx_from_the_relay_is_554_and_an_undelivered_notice(relayed: Relayed) -> None:
    relayed.relay.answer("rcpt", "550 5.1.1 <carol@example.net>: no such user")
    raw = message()
    mid = message_id(raw)
    code, text = relayed.send(raw)
    assert (code, text) == (
        554,
        "5.1.1 not delivered: 550 5.1.1 <carol@example.net>: no such user",
    )
    failed = relayed.entry("outbox", mid)
    assert failed["state"] == "failed" and "550 5.1.1" in str(failed["reason"]), failed
    notices = [
        m for m in relayed.phone_list()["inbox"] if m["subject"] == "Undelivered: from the phone"
    ]
    assert len(notices) == 1
    # the app retries the same message: the same answer, nothing sent, no second notice
    relayed.relay.clear()
    assert relayed.send(raw)[0] == 554
    assert relayed.relay.received == []
    inbox = relayed.phone_list()["inbox"]
    assert [m["subject"] for m in inbox].count("Undelivered: from the phone") == 1


def test_a_4xx_from_the_relay_is_accepted_and_retried(relayed: Relayed) -> None:
    relayed.relay.answer("rcpt", "451 4.3.0 try again later", times=1)
    raw = message()
    mid = message_id(raw)
    assert relayed.send(raw) == (250, "2.0.0 accepted, will retry (outbox id 1)")
    assert relayed.entry("outbox", mid)["state"] == "queued"
    assert relayed.relay.received == []


def test_refused_messages_get_a_clear_reason_and_are_not_queued(relayed: Relayed) -> None:
    with relayed.hosted.login() as client:
        client.mail("alice@phone.example")
        client.rcpt("carol@example.net")
        code, text = client.data(message(sender="mallory@example.org"))
        assert (code, text) == (550, b"5.7.1 the From: header must name only your own addresses")
        client.rset()
        client.mail("alice@phone.example")
        for n in range(100):
            assert client.rcpt(f"r{n}@example.net")[0] == 250
        assert client.rcpt("r100@example.net") == (452, b"4.5.3 too many recipients")
    listing = relayed.phone_list()
    assert listing["outbox"] == [] and listing["sent"] == []
    assert relayed.relay.received == []
