"""The trigger mail with `agent run` up (patent FIG. 11): the hosted server mails it
through its relay (aiosmtpd delivering into the real Dovecot), IMAP IDLE sees it, the
agent checks it, expunges it and syncs; forged, stale, replayed and look-alike mails
start nothing and stay where they are.

The server here cannot reach the agent over the push link (as when a firewall cuts it):
its view of connected agents is empty, so a sync request goes out as the trigger mail.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import pytest
from bridge import Bridge, ServerThread
from dovecot import Dovecot
from smtp_servers import MailServer as SmtpServer
from test_agent_run import stop_agent, wait_for

from imapsync_bridge.headers import display_text
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.trigger_mail import trigger_message

MAX_AGE = 900


@dataclass
class Running:
    bridge: Bridge
    smtp: SmtpServer
    phrase: str
    key: bytes
    agent: object

    @property
    def desktop_address(self) -> str:
        return f"{self.bridge.user}@corp.example"

    def subjects(self, mailbox: str = "INBOX") -> list[str]:
        return [display_text(m.subject) for m in self.bridge.mails(mailbox)]

    def send(self, message: EmailMessage, sender: str = "stranger@elsewhere.example") -> None:
        with smtplib.SMTP(self.smtp.host, self.smtp.port) as client:
            client.send_message(message, sender, [self.desktop_address])

    def triggered_syncs(self) -> int:
        return self.bridge.agent_log().count("sync (") - self.bridge.agent_log().count(
            "sync (start"
        )


@pytest.fixture
def running(dovecot: Dovecot, tmp_path: Path) -> Iterator[Running]:
    with SmtpServer(dovecot) as smtp:
        bridge = Bridge(dovecot, tmp_path, window=4).start()
        bridge.stop()  # again, with [relay] pointing at the corporate SMTP server
        ini = bridge.server_ini.read_text()
        relay = f"[relay]\nhost = {smtp.host}\nport = {smtp.port}\nsecurity = none\n"
        bridge.server_ini.write_text(re.sub(r"\[relay\].*", relay, ini, flags=re.S))
        bridge.server = ServerThread(bridge.server_ini).start()
        assert bridge.server.sync is not None
        bridge.server.sync.connected_users = frozenset  # type: ignore[method-assign]
        bridge.write_agent_config(
            bridge.agent_ini, idle="true", sync_on_change="false", sync_interval="3600"
        )
        with bridge.agent_ini.open("a") as ini_file:
            ini_file.write(f"[trigger]\nmax_age = {MAX_AGE}\nmin_interval = 1\n")
        bridge.pair()
        with PhoneStore(bridge.server_dir / "phone.sqlite3") as store:
            secret = store.trigger_secret(bridge.phone_user)
        assert secret is not None
        agent = bridge.run_agent()
        try:
            wait_for(lambda: bridge.agent_status()["last_sync"], 10, "the first sync")
            wait_for(
                lambda: (
                    (bridge.agent_status()["connections"] or {}).get("imap_idle", {}).get("state")
                    == "idle"
                ),
                10,
                "IMAP IDLE",
            )
            time.sleep(0.5)  # the sessions for the links' arrival are done: the agent idles
            yield Running(bridge, smtp, secret[0], secret[1], agent)
        finally:
            if agent.poll() is None:
                stop_agent(bridge, agent)
            bridge.stop()


def test_a_requested_trigger_goes_through_the_relay_and_the_running_agent_syncs(
    running: Running,
) -> None:
    bridge = running.bridge
    waiting = bridge.deliver(1)  # IDLE sees it, but sync_on_change is off: no sync
    time.sleep(1.5)
    assert waiting not in bridge.phone_inbox_ids()
    bridge.phone("request-sync")
    wait_for(lambda: waiting in bridge.phone_inbox_ids(), 10, "the triggered sync")
    assert len(running.smtp.received) == 1, "one trigger mail, through the relay"
    wait_for(lambda: running.phrase not in " ".join(running.subjects()), 5, "the expunge")
    assert running.phrase not in " ".join(running.subjects(bridge.trash)), "not to Trash"
    assert all(running.phrase not in m["subject"] for m in bridge.phone_list()["inbox"])
    bridge.assert_in_sync()
    assert "trigger mail: 1 valid" in bridge.agent_log()


def test_a_trigger_typed_by_hand_works_too(running: Running) -> None:
    bridge = running.bridge
    waiting = bridge.deliver(1)
    typed = EmailMessage()
    typed["From"] = f"Alice <{running.desktop_address}>"
    typed["To"] = running.desktop_address
    typed["Subject"] = running.phrase.lower().replace("-", " ")
    typed["Date"] = format_datetime(datetime.now(UTC))
    typed["Message-ID"] = make_msgid()
    typed.set_content("sync please")
    running.send(typed, sender=running.desktop_address)
    wait_for(lambda: waiting in bridge.phone_inbox_ids(), 10, "the triggered sync")
    wait_for(lambda: len(bridge.mails()) == 1, 5, "the trigger expunged")
    bridge.assert_in_sync()


def test_forged_stale_replayed_and_look_alike_mails_start_nothing(running: Running) -> None:
    bridge = running.bridge
    user = bridge.phone_user
    now = datetime.now(UTC)
    waiting = bridge.deliver(1)

    forged = EmailMessage()  # the phrase, no token, not from the user's own address
    forged["From"] = "stranger@elsewhere.example"
    forged["Subject"] = running.phrase
    forged["Date"] = format_datetime(now)
    forged["Message-ID"] = make_msgid()
    forged.set_content("let me in")
    to, sender = running.desktop_address, "alice@phone.example"
    bad_token = trigger_message(
        user=user, sender=sender, to=to, phrase=running.phrase, key=b"x" * 32, now=now
    )
    stale = trigger_message(
        user=user, sender=sender, to=to, phrase=running.phrase, key=running.key,
        now=now - timedelta(seconds=2 * MAX_AGE),
    )  # fmt: skip
    look_alike = EmailMessage()
    look_alike["From"] = running.desktop_address
    look_alike["Subject"] = "sync now please"
    look_alike["Date"] = format_datetime(now)
    look_alike["Message-ID"] = make_msgid()
    look_alike.set_content("no phrase here")
    for message in (forged, bad_token, stale, look_alike):
        running.send(message)
    wait_for(lambda: len(bridge.mails()) == 5, 10, "all four delivered")
    time.sleep(2)  # IDLE saw them, the agent judged them
    assert waiting not in bridge.phone_inbox_ids(), "a bad trigger started a sync"
    assert len(bridge.mails()) == 5, "a bad trigger was removed"
    log = bridge.agent_log()
    assert "trigger mail: " not in log
    assert running.phrase not in log and running.key.hex() not in log

    # A valid trigger, consumed; then its byte-exact copy: a replay.
    bridge.phone("request-sync")
    wait_for(lambda: waiting in bridge.phone_inbox_ids(), 10, "the valid trigger's sync")
    consumed = running.smtp.received[-1].raw
    wait_for(lambda: len(bridge.mails()) == 5, 5, "the valid trigger expunged")
    second = bridge.deliver(2)
    time.sleep(1.5)  # past min_interval
    bridge.dovecot.append(bridge.user, consumed, now)
    time.sleep(2)
    assert second not in bridge.phone_inbox_ids(), "the replayed trigger started a sync"
    assert len(bridge.mails()) == 7, "the replayed copy was removed"
    assert bridge.agent_log().count("trigger mail: 1 valid") == 1
    assert running.agent.poll() is None, "agent run died"  # type: ignore[attr-defined]
