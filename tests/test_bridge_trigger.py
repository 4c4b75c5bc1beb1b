"""Trigger mails end to end (patent FIG. 11, DESIGN.md invariant 7): real Dovecot, a real
SMTP server delivering into it, the hosted server and the agent."""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import pytest
from bridge import Bridge, run_cli
from dovecot import Dovecot
from smtp_servers import MailServer as SmtpServer

from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.runner import connect_imap, open_state
from imapsync_bridge.agent.state import AgentState
from imapsync_bridge.agent.trigger import ScanResult, TriggerWatch
from imapsync_bridge.config import MailServer, load_agent_config
from imapsync_bridge.headers import display_text
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.trigger_mail import send_trigger_mail, trigger_message


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path, window=4).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def server_secret(bridge: Bridge) -> tuple[str, bytes] | None:
    with PhoneStore(bridge.server_dir / "phone.sqlite3") as store:
        return store.trigger_secret(bridge.phone_user)


def test_pairing_gives_both_sides_the_phrase_and_re_pairing_a_new_one(bridge: Bridge) -> None:
    secret = server_secret(bridge)
    assert secret is not None
    phrase, key = secret
    assert bridge.agent_status()["sync_phrase"] == phrase
    rc, out, err = run_cli("agent", "status", "--config", str(bridge.agent_ini))
    assert rc == 0 and phrase in out, err
    rc, out, err = run_cli("server", "pair-code", "--config", str(bridge.server_ini), "alice")
    assert rc == 0, err
    bridge.pair(code=out.strip().splitlines()[-1])
    again = server_secret(bridge)
    assert again is not None and again[0] != phrase and again[1] != key
    assert bridge.agent_status()["sync_phrase"] == again[0]


# -- the agent's trigger watch, on mail the corporate SMTP server delivered ------------

OTHER = "stranger@elsewhere.example"


@pytest.fixture
def smtp(dovecot: Dovecot) -> Iterator[SmtpServer]:
    with SmtpServer(dovecot) as server:
        yield server


@dataclass
class Desk:
    """The paired agent's view: its state and an IMAP session of its own, the trigger
    secret as the server keeps it, and the relay the server would send through."""

    bridge: Bridge
    smtp: SmtpServer
    state: AgentState
    imap: ImapMailbox
    phrase: str
    key: bytes

    @property
    def address(self) -> str:
        return f"{self.bridge.user}@corp.example"

    def relay(self) -> MailServer:
        return MailServer("relay", self.smtp.host, self.smtp.port, "none", "", None)

    def send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.smtp.host, self.smtp.port) as client:
            client.send_message(message, OTHER, [self.address])

    def watch(self) -> TriggerWatch:
        return TriggerWatch(self.imap, self.state, "INBOX", max_age=MAX_AGE)

    def subjects(self, mailbox: str = "INBOX") -> list[str]:
        return [display_text(m.subject) for m in self.bridge.mails(mailbox)]

    def raw(self, subject: str) -> bytes:
        (uid,) = [m.uid for m in self.bridge.mails() if m.subject == subject]
        with self.bridge.imap() as client:
            return bytes(client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"])


MAX_AGE = 900


@pytest.fixture
def desk(bridge: Bridge, smtp: SmtpServer) -> Iterator[Desk]:
    config = load_agent_config(bridge.agent_ini)
    secret = server_secret(bridge)
    assert secret is not None
    state = open_state(config)
    imap = connect_imap(config)
    try:
        yield Desk(bridge, smtp, state, imap, *secret)
    finally:
        imap.close()
        state.close()


def mail(subject: str, sender: str, date: datetime | None = None, **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = "desk@corp.example"
    message["Subject"] = subject
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message["Message-ID"] = make_msgid("t", domain="test.example")
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("hello\n")
    return message


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imapsync_bridge.agent.trigger"]


def test_a_sent_trigger_is_expunged_once_and_its_exact_copy_is_a_replay(
    desk: Desk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "imapsync_bridge.agent.trigger")
    desk.bridge.deliver(1)
    message_id = send_trigger_mail(
        desk.relay(), user="alice", sender="alice@phone.example", to=desk.address,
        phrase=desk.phrase, key=desk.key,
    )  # fmt: skip
    assert desk.smtp.received and desk.phrase in desk.subjects()
    copy = desk.raw(desk.phrase)
    assert message_id.encode() in copy and b"X-Bridge-Trigger: v1; nonce=" in copy

    assert desk.watch().scan() == ScanResult(accepted=1, rejected=0)
    assert desk.subjects() == ["Message 1"]
    assert desk.subjects(desk.bridge.trash) == []  # expunged, not moved to Trash
    (used,) = desk.state.used_trigger_keys()
    assert used.startswith("nonce:")

    desk.bridge.dovecot.append(desk.bridge.user, copy, datetime.now(UTC))
    caplog.clear()
    assert desk.watch().scan() == ScanResult(accepted=0, rejected=1)
    assert desk.watch().scan() == ScanResult(0, 0)  # looked at once, logged once
    (line,) = logged(caplog)
    assert "replayed" in line and desk.phrase not in line and desk.key.hex() not in line
    assert desk.phrase in desk.subjects()  # left in place


def test_forged_bad_stale_and_look_alike_triggers_are_left_alone_and_logged_once(
    desk: Desk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "imapsync_bridge.agent.trigger")
    old = datetime.now(UTC) - timedelta(seconds=2 * MAX_AGE)
    stale = trigger_message(user="alice", sender="alice@phone.example", to=desk.address,
                            phrase=desk.phrase, key=desk.key, now=old)  # fmt: skip
    bad = trigger_message(user="alice", sender="alice@phone.example", to=desk.address,
                          phrase=desk.phrase, key=b"x" * 32, now=datetime.now(UTC))  # fmt: skip
    desk.send(mail(f"Re: {desk.phrase}", OTHER))  # forged: no token, a stranger
    desk.send(bad)
    desk.send(stale)
    desk.send(mail(desk.phrase[:-1], "alice@phone.example"))  # look-alike
    desk.send(mail("Quarterly figures", OTHER))
    before = sorted(desk.subjects())

    assert desk.watch().scan() == ScanResult(accepted=0, rejected=3)
    assert desk.watch().scan() == ScanResult(0, 0)
    assert sorted(desk.subjects()) == before
    lines = logged(caplog)
    assert len(lines) == 3
    for verdict, line in zip(("forged", "bad_token", "stale"), lines, strict=True):
        assert verdict in line and desk.phrase not in line and desk.key.hex() not in line
    assert desk.state.used_trigger_keys() == set()


def test_a_trigger_typed_by_hand_from_the_users_own_address_counts(desk: Desk) -> None:
    loosely = " ".join(desk.phrase.replace("-", " ").lower().split())
    desk.send(mail(f"Fwd: {loosely}", f"Alice <{desk.address}>"))
    desk.send(mail("=?utf-8?q?" + desk.phrase + "?=", "Alice <alice@phone.example>"))
    assert desk.watch().scan() == ScanResult(accepted=2, rejected=0)
    assert desk.subjects() == []
    assert {k.split(":")[0] for k in desk.state.used_trigger_keys()} == {"mid"}


# -- invariant 7: a trigger never reaches the phone ------------------------------------


def test_trigger_mail_never_reaches_the_phone_even_when_a_sync_comes_first(
    profiled_dovecot: Dovecot, tmp_path: Path
) -> None:
    """Valid and forged trigger mails arrive (newer than any other mail) before a sync
    runs: the window is the newest *other* mail, on every server profile, on the first
    sync and on the added-mail path; expunging the valid ones later loses nothing."""
    b = Bridge(profiled_dovecot, tmp_path, window=4).start()
    try:
        b.pair()
        ids = [b.deliver(n) for n in range(1, 8)]
        secret = server_secret(b)
        assert secret is not None
        phrase, key = secret
        desktop = f"{b.user}@corp.example"
        with SmtpServer(profiled_dovecot) as smtp:
            relay = MailServer("relay", smtp.host, smtp.port, "none", "", None)

            def trigger() -> None:
                send_trigger_mail(relay, user="alice", sender="alice@phone.example",
                                  to=desktop, phrase=phrase, key=key)  # fmt: skip

            trigger()
            with smtplib.SMTP(smtp.host, smtp.port) as client:
                client.send_message(mail(f"RE: {phrase.lower()}", OTHER), OTHER, [desktop])
            b.sync_ok()
            assert b.phone_inbox_ids() == ids[::-1][:4]
            b.assert_in_sync()

            trigger()
            ids.append(b.deliver(8))
            b.sync_ok()
            assert b.phone_inbox_ids() == ids[::-1][:4]
            b.assert_in_sync()

        config = load_agent_config(b.agent_ini)
        with connect_imap(config) as imap:
            state = open_state(config)
            try:
                assert TriggerWatch(imap, state, "INBOX").scan() == ScanResult(2, 1)
            finally:
                state.close()
        b.sync_ok()
        assert b.phone_inbox_ids() == ids[::-1][:4]
        b.assert_in_sync()
        assert len(b.desktop_ids()) == 8 + 1  # the forged trigger stays, nothing else went
        assert all(phrase not in m["subject"] for m in b.phone_list()["inbox"])
    finally:
        b.stop()
