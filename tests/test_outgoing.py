"""Outgoing mail end to end (patent FIG. 12, DESIGN.md invariant 6): real Dovecot, the
hosted server, the agent, and two aiosmtpd servers — the corporate SMTP server (the
agent's ``[smtp]``) and the hosted server's ``[relay]`` — no mocks.

Each message must end once at the right SMTP server and once in the desktop Sent folder
(``\\Seen``), never in the Outbox afterwards, and never in either inbox; later syncs send
nothing. Fault tests SIGKILL the agent (or the hosted server) at each recorded step.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import REPO, Bridge, kill, run_cli
from dovecot import Dovecot
from smtp_servers import MailServer, free_port
from test_agent_run import stop_agent, wait_for

EXTERNAL = "carol@example.net"


class Outgoing:
    """A bridge with both SMTP servers, and what a test looks at."""

    def __init__(self, bridge: Bridge, corp: MailServer, relay: MailServer) -> None:
        self.bridge, self.corp, self.relay = bridge, corp, relay
        self.kill_at: tuple[int, str] | None = None  # (pid, state of a `delivery` frame)

    def observe(self, user: str | None, frame: dict[str, Any]) -> None:
        """The server's frame observer: SIGKILL the agent when it reports ``state``
        (before the server handles the report: the agent never gets its ``ok``)."""
        if self.kill_at and frame.get("type") == "delivery":
            pid, state = self.kill_at
            if frame.get("state") == state:
                self.kill_at = None
                kill(pid)

    def compose(self, subject: str, *extra: str, to: str = EXTERNAL) -> dict[str, Any]:
        out = self.bridge.phone(
            "compose", "--to", to, "--subject", subject, "--body", f"Body of {subject}\n",
            "--json", *extra,
        )  # fmt: skip
        return dict(json.loads(out))

    def folder(self, role: str) -> str:
        return str(self.bridge.agent_status()["folders"][role])

    def outbox_entry(self, message_id: str) -> dict[str, Any]:
        listing = self.bridge.phone_list()
        for entry in listing["outbox"] + listing["sent"]:
            if entry["message_id"] == message_id:
                return dict(entry)
        raise AssertionError(f"{message_id} is in neither the phone's outbox nor its Sent")

    def assert_sent_once(self, message_id: str, server: MailServer) -> None:
        other = self.relay if server is self.corp else self.corp
        assert server.ids().count(message_id) == 1, server.ids()
        assert message_id not in other.ids()
        sent = self.bridge.mails(self.folder("sent"))
        assert [m.message_id for m in sent].count(message_id) == 1
        assert all(m.seen for m in sent if m.message_id == message_id)
        assert message_id not in self.bridge.desktop_ids(self.folder("outbox"))
        assert message_id not in self.bridge.desktop_ids("INBOX")
        assert message_id not in self.bridge.phone_inbox_ids()
        listing = self.bridge.phone_list()
        assert [m["message_id"] for m in listing["sent"]].count(message_id) == 1
        assert message_id not in [m["message_id"] for m in listing["outbox"]]

    def expire_backoff(self) -> None:
        """The server's clock moves past every deferred message's backoff (30 s on)."""
        with sqlite3.connect(self.bridge.server_dir / "phone.sqlite3") as db:
            db.execute("UPDATE outbox SET next_attempt = '2000-01-01T00:00:00.000000Z'")


@pytest.fixture
def out(dovecot: Dovecot, tmp_path: Path) -> Iterator[Outgoing]:
    corp, relay = MailServer(dovecot).start(), MailServer(dovecot).start()
    bridge = Bridge(dovecot, tmp_path)
    bridge.smtp_port = corp.port
    outgoing = Outgoing(bridge, corp, relay)
    bridge.start(observer=outgoing.observe, relay_port=relay.port)
    bridge.pair()
    try:
        yield outgoing
    finally:
        bridge.stop()
        corp.stop()
        relay.stop()


def test_send_now_goes_through_the_relay_once_and_lands_in_desktop_sent(out: Outgoing) -> None:
    out.bridge.deliver(1)
    entry = out.compose("Now")
    mid = entry["message_id"]
    assert entry["state"] == "sent" and entry["to"] == [EXTERNAL], entry
    (received,) = out.relay.received
    assert received.mail_from == "alice@phone.example" and received.rcpt_tos == [EXTERNAL]
    assert b"From: alice@phone.example" in received.raw
    out.bridge.sync_ok()
    out.assert_sent_once(mid, out.relay)
    out.bridge.sync_ok()  # a later sync sends and files nothing
    out.assert_sent_once(mid, out.relay)
    out.bridge.assert_in_sync()


def test_via_desktop_is_sent_once_by_the_corporate_server_and_moved_to_sent(
    out: Outgoing,
) -> None:
    out.bridge.deliver(1)
    entry = out.compose("Via desk", "--via-desktop")
    mid = entry["message_id"]
    assert entry["state"] == "queued"
    assert out.outbox_entry(mid)["state"] == "queued"
    assert not out.corp.received and not out.relay.received
    out.bridge.sync_ok()
    (received,) = out.corp.received
    assert received.mail_from == out.bridge.from_address  # envelope = from_address
    assert f"From: {out.bridge.from_address}".encode() in received.raw
    out.assert_sent_once(mid, out.corp)
    assert out.outbox_entry(mid)["state"] == "sent"
    for _ in range(2):
        out.bridge.sync_ok()
        out.assert_sent_once(mid, out.corp)
    out.bridge.assert_in_sync()


def test_a_reply_carries_in_reply_to_and_references(out: Outgoing) -> None:
    parent = out.bridge.deliver(1)
    out.bridge.sync_ok()
    entry = out.compose("Re: one", "--in-reply-to", str(out.bridge.phone_id(parent)))
    (received,) = out.relay.received
    assert f"In-Reply-To: {parent}".encode() in received.raw
    assert f"References: {parent}".encode() in received.raw
    assert entry["state"] == "sent"


@pytest.mark.parametrize("via_desktop", [True, False], ids=["via-desktop", "send-now"])
def test_a_5xx_fails_the_message_and_puts_a_notice_in_the_phone_inbox(
    out: Outgoing, via_desktop: bool
) -> None:
    server = out.corp if via_desktop else out.relay
    server.answer("rcpt", "550 5.1.1 <carol@example.net>: no such user")
    entry = out.compose("Doomed", *(["--via-desktop"] if via_desktop else []))
    out.bridge.sync_ok()
    mid = entry["message_id"]
    failed = out.outbox_entry(mid)
    assert failed["state"] == "failed" and "550 5.1.1" in failed["reason"], failed
    assert not server.received
    notices = [m for m in out.bridge.phone_list()["inbox"] if m["subject"] == "Undelivered: Doomed"]
    assert len(notices) == 1, out.bridge.phone_list()["inbox"]
    detail = json.loads(out.bridge.phone("show", "--json", str(notices[0]["id"])))
    assert "550 5.1.1" in detail["text"]
    assert mid not in out.bridge.desktop_ids(out.folder("outbox"))
    assert mid not in out.bridge.desktop_ids(out.folder("sent"))
    out.bridge.sync_ok()  # the notice reaches the desktop inbox once; nothing is retried
    assert [m.subject for m in out.bridge.mails()].count("Undelivered: Doomed") == 1
    assert not server.received and out.outbox_entry(mid)["state"] == "failed"


@pytest.mark.parametrize("via_desktop", [True, False], ids=["via-desktop", "send-now"])
def test_a_4xx_keeps_the_message_queued_and_it_is_sent_once_later(
    out: Outgoing, via_desktop: bool
) -> None:
    server = out.corp if via_desktop else out.relay
    server.answer("rcpt", "451 4.3.0 try again later", times=1)
    entry = out.compose("Later", *(["--via-desktop"] if via_desktop else []))
    mid = entry["message_id"]
    out.bridge.sync_ok()
    waiting = out.outbox_entry(mid)
    assert waiting["state"] == "queued" and not server.received, waiting
    out.bridge.sync_ok()  # within the backoff: not offered again
    assert not server.received
    out.expire_backoff()
    if via_desktop:
        out.bridge.sync_ok()
    else:  # `server run` retries send-now mail by itself
        wait_for(lambda: server.received, 10, "the relay's retry")
        out.bridge.sync_ok()
    out.assert_sent_once(mid, server)
    out.bridge.sync_ok()
    out.assert_sent_once(mid, server)


def test_the_agent_refuses_a_wrong_sender_and_an_oversized_message(out: Outgoing) -> None:
    bridge = out.bridge
    bridge.from_address = "somebody-else@corp.example"  # the agent's [smtp] from_address
    bridge.write_agent_config(bridge.agent_ini)
    wrong = out.compose("Wrong sender", "--via-desktop")["message_id"]
    bridge.sync_ok()
    refused = out.outbox_entry(wrong)
    assert refused["state"] == "failed", refused
    assert "is not this desktop's address" in refused["reason"]
    bridge.from_address = f"{bridge.user}@corp.example"
    bridge.write_agent_config(bridge.agent_ini, max_message_size="2048")
    big = bridge.phone(
        "compose", "--to", EXTERNAL, "--subject", "Big", "--body", "x" * 70 * 60 + "\n",
        "--via-desktop", "--json",
    )  # fmt: skip
    big_id = json.loads(big)["message_id"]
    bridge.sync_ok()
    too_big = out.outbox_entry(big_id)
    assert too_big["state"] == "failed" and "over the desktop's limit" in too_big["reason"]
    assert not out.corp.received
    assert not bridge.desktop_ids(out.folder("outbox"))
    assert not bridge.desktop_ids(out.folder("sent"))
    subjects = [m["subject"] for m in bridge.phone_list()["inbox"]]
    assert "Undelivered: Wrong sender" in subjects and "Undelivered: Big" in subjects


def test_more_than_the_per_sync_limit_waits_for_the_next_sync(out: Outgoing) -> None:
    ids = [out.compose(f"Many {n}", "--via-desktop")["message_id"] for n in range(22)]
    out.bridge.sync_ok()
    assert len(out.corp.received) == 20
    out.bridge.sync_ok()
    assert sorted(out.corp.ids()) == sorted(ids)
    assert not out.bridge.desktop_ids(out.folder("outbox"))
    assert len(out.bridge.desktop_ids(out.folder("sent"))) == 22


# --- SIGKILL at every recorded step ------------------------------------------------------

AGENT_KILLS = {
    # SMTP MAIL FROM arrives: the message is in the Outbox, no DATA yet (safe to resend)
    "before SMTP": ("smtp", "mail"),
    # the server took the data; its 250 was never read (RFC 1047): must not resend
    "250 never read": ("smtp", "data"),
    # the 250 was read and "submitted" recorded; not yet moved to Sent
    "after the 250": ("frame", "submitted"),
    # moved to Sent and "sent" recorded; the server has not acknowledged the report
    "before the ack": ("frame", "sent"),
}


@pytest.mark.parametrize("where", list(AGENT_KILLS))
def test_via_desktop_exactly_once_when_the_agent_is_killed(out: Outgoing, where: str) -> None:
    how, point = AGENT_KILLS[where]
    mid = out.compose(f"Crash {where}", "--via-desktop")["message_id"]
    process = out.bridge.sync_process()
    if how == "smtp":
        out.corp.hooks[point] = lambda: kill(process.pid)
    else:
        out.kill_at = (process.pid, point)
    process.wait(60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    out.corp.hooks.clear()
    out.bridge.sync_ok()
    out.assert_sent_once(mid, out.corp)
    assert out.outbox_entry(mid)["state"] == "sent"
    out.bridge.sync_ok()
    out.assert_sent_once(mid, out.corp)


# --- the hosted server killed -------------------------------------------------------------


def _server_process(bridge: Bridge) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = (bridge.server_dir / "server-run.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config",
         str(bridge.server_ini)],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip


def _wait_listening(port: int) -> None:
    import socket

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            return False
        return True

    wait_for(up, 15, "the server listens")


@pytest.mark.parametrize("point", ["mail", "data"])
def test_via_desktop_exactly_once_when_the_hosted_server_is_killed(
    out: Outgoing, point: str
) -> None:
    bridge = out.bridge
    bridge.stop()  # the in-process server: from here `server run` is a real process
    port = free_port()
    text = bridge.server_ini.read_text()
    bridge.server_ini.write_text(
        text.replace("sync_listen = 127.0.0.1:0", f"sync_listen = 127.0.0.1:{port}")
    )
    assert bridge.server is not None
    bridge.server.port = port
    bridge.write_agent_config(bridge.agent_ini)
    mid = out.compose("Server crash", "--via-desktop")["message_id"]
    server = _server_process(bridge)
    try:
        _wait_listening(port)
        out.corp.hooks[point] = lambda: kill(server.pid)
        rc, _out, _err = bridge.sync()
        assert rc != 0 and server.wait(10) == -signal.SIGKILL
        out.corp.hooks.clear()
        assert out.corp.ids() == [mid]  # the SMTP part went on without the hosted server
        server = _server_process(bridge)
        _wait_listening(port)
        bridge.sync_ok()
        out.assert_sent_once(mid, out.corp)
        bridge.sync_ok()
        out.assert_sent_once(mid, out.corp)
    finally:
        kill(server.pid)
        server.wait(10)


# --- by push, with `agent run` up --------------------------------------------------------


def test_with_agent_run_a_via_desktop_message_reaches_the_smtp_server_by_push(
    out: Outgoing,
) -> None:
    bridge = out.bridge
    bridge.write_agent_config(bridge.agent_ini, sync_interval="3600")
    agent = bridge.run_agent()
    try:
        wait_for(lambda: bridge.agent_status().get("last_result") == "ok", 15, "first sync")
        started = time.monotonic()
        mid = out.compose("Pushed", "--via-desktop")["message_id"]
        wait_for(lambda: mid in out.corp.ids(), 5, "the push delivery")
        latency = time.monotonic() - started
        wait_for(lambda: out.outbox_entry(mid)["state"] == "sent", 5, "the report")
        now = out.compose("Pushed now")["message_id"]
        sent = out.folder("sent")
        wait_for(lambda: now in bridge.desktop_ids(sent), 5, "the send-now copy filed")
        out.assert_sent_once(mid, out.corp)
        out.assert_sent_once(now, out.relay)
    finally:
        stop_agent(bridge, agent)
    print(f"phone compose → corporate SMTP by push: {latency:.2f} s")
    assert latency < 5


def test_compose_refuses_no_recipient_and_a_foreign_from(out: Outgoing) -> None:
    rc, _o, err = run_cli(
        "phone", "--config", str(out.bridge.server_ini), "--user", "alice", "compose",
        "--to", "", "--subject", "x", "--body", "y",
    )  # fmt: skip
    assert rc == 1 and "no recipients" in err
