"""Inbound SMTP (issue 8, test 4): mail to the phone address reaches both mailboxes once.

The real hosted server (``server run`` in a thread, its aiosmtpd listener on a free
port, found through ``Running.ports``) spoken to with the stdlib's ``smtplib``, over
STARTTLS with the server's own certificate; the phone side seen through the ``phone``
CLI; end to end with a real Dovecot and a paired agent (tests/bridge.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bridge import Bridge, ServerThread, run_cli
from dovecot import Dovecot

from imapsync_bridge import cli
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.protocol import pki
from imapsync_bridge.server.app import init_server
from imapsync_bridge.server.smtp_in import message_identity
from imapsync_bridge.server.store import Delivery, PhoneStore

MAX_SIZE = 64 * 1024


def set_options(ini: Path, **options: object) -> None:
    """Replace ``[server]`` keys of a server.ini that ``server init`` wrote."""
    lines = ini.read_text().splitlines()
    for key, value in options.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in lines]
        if not any(line.startswith(f"{key} =") for line in lines):
            lines.insert(lines.index("[server]") + 1, f"{key} = {value}")
    ini.write_text("\n".join(lines) + "\n")


@dataclass
class Hosted:
    """A running hosted server with users alice and bob, and how to reach it."""

    ini: Path
    thread: ServerThread

    @property
    def smtp_port(self) -> int:
        return self.thread.ports["smtp"]

    def smtp(self, tls: bool = True) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10)
        if tls:
            context = ssl.create_default_context(cafile=str(self.ini.parent / pki.CA_CRT))
            client.starttls(context=context)
        return client

    def inbox(self, user: str = "alice") -> list[dict[str, Any]]:
        return phone_list(self.ini, user)["inbox"]

    def raw(self, id: int, user: str = "alice") -> bytes:
        return phone_raw(self.ini, user, id)


def phone_list(ini: Path, user: str) -> dict[str, Any]:
    rc, out, err = run_cli("phone", "--config", str(ini), "--user", user, "list", "--json")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def phone_raw(ini: Path, user: str, id: int) -> bytes:
    """``phone show ID``: the stored bytes, as the CLI writes them to stdout."""
    out, err = io.TextIOWrapper(io.BytesIO()), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["phone", "--config", str(ini), "--user", user, "show", str(id)])
    assert rc == 0, err.getvalue()
    out.flush()
    raw: bytes = out.buffer.getvalue()  # type: ignore[attr-defined]
    return raw


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[Hosted]:
    ini = init_server(
        tmp_path / "server", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
    )
    set_options(ini, max_message_size=MAX_SIZE, max_unsynced=3)
    for user in ("alice", "bob"):
        rc, _out, err = run_cli(
            "server", "add-user", "--config", str(ini), user, "--address",
            f"{user}@phone.example", "--desktop-address", f"{user}@corp.example", "--window", "6",
        )  # fmt: skip
        assert rc == 0, err
    thread = ServerThread(ini).start()
    try:
        yield Hosted(ini, thread)
    finally:
        thread.stop()


def message(n: int, *headers: str, body: str = "hello\r\n") -> bytes:
    lines = [
        "From: Carol <carol@example.net>",
        "To: alice@phone.example",
        f"Subject: inbound {n}",
        f"Message-ID: <inbound{n}.{time.monotonic_ns()}@example.net>",
        "Date: Mon, 02 Dec 2024 10:00:00 +0000",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


# -- the listener, against the real hosted server ------------------------------------------
def test_accepted_mail_is_in_the_phone_inbox_at_once_byte_exact(hosted: Hosted) -> None:
    raw = message(1)
    with hosted.smtp() as client:
        code, ehlo = client.ehlo()
        assert code == 250 and b"SIZE 65536" in ehlo and b"8BITMIME" in ehlo
        assert client.sendmail("carol@example.net", ["alice@phone.example"], raw) == {}
    (got,) = hosted.inbox()
    assert (got["subject"], got["from"]) == ("inbound 1", "Carol <carol@example.net>")
    assert got["seen"] is False
    arrived = dt.datetime.fromisoformat(got["date"])
    assert abs((dt.datetime.now(dt.UTC) - arrived).total_seconds()) < 5  # arrival time, not Date
    assert hosted.raw(got["id"]) == raw
    assert hosted.inbox("bob") == []


def test_starttls_is_offered_not_required(hosted: Hosted) -> None:
    with hosted.smtp(tls=False) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.sendmail("carol@example.net", ["alice@phone.example"], message(2)) == {}
    assert len(hosted.inbox()) == 1


def test_unknown_recipient_is_550_and_the_others_still_get_it(hosted: Hosted) -> None:
    with hosted.smtp() as client:
        client.ehlo()
        client.mail("carol@example.net")
        assert client.rcpt("nobody@phone.example") == (
            550,
            b"5.1.1 <nobody@phone.example>: no such user",
        )
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("carol@example.net", ["nobody@phone.example"], message(3))
        refused = client.sendmail(
            "carol@example.net", ["nobody@phone.example", "alice@phone.example"], message(4)
        )
        assert {address: code for address, (code, _) in refused.items()} == {
            "nobody@phone.example": 550
        }
    assert [m["subject"] for m in hosted.inbox()] == ["inbound 4"]


def test_several_recipients_of_several_users_get_one_copy_each(hosted: Hosted) -> None:
    raw = message(5)
    recipients = ["alice@phone.example", "bob@phone.example", "ALICE@Phone.Example"]
    with hosted.smtp() as client:
        assert client.sendmail("carol@example.net", recipients, raw) == {}
    for user in ("alice", "bob"):
        (got,) = hosted.inbox(user)
        assert hosted.raw(got["id"], user) == raw


def test_too_large_is_552_declared_or_not(hosted: Hosted) -> None:
    big = message(6, body="x" * 70 + "\r\n")  # fits
    huge = message(7, body=("y" * 76 + "\r\n") * (MAX_SIZE // 78 + 10))
    with hosted.smtp() as client:
        client.ehlo()
        # smtplib declares SIZE= when the server advertises it: refused at MAIL FROM
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:
            client.sendmail("carol@example.net", ["alice@phone.example"], huge)
        refusal = (declared.value.smtp_code, declared.value.smtp_error)
        assert refusal == (552, b"5.3.4 message too big")
        client.rset()
        # undeclared: refused after DATA
        assert client.mail("carol@example.net")[0] == 250
        assert client.rcpt("alice@phone.example")[0] == 250
        assert client.data(huge) == (552, b"5.3.4 message too big")
        assert client.sendmail("carol@example.net", ["alice@phone.example"], big) == {}
    assert [m["subject"] for m in hosted.inbox()] == ["inbound 6"]


def test_452_at_rcpt_once_max_unsynced_messages_wait_for_the_desktop(hosted: Hosted) -> None:
    with hosted.smtp() as client:
        for n in range(3):
            assert client.sendmail("carol@example.net", ["alice@phone.example"], message(n)) == {}
        client.mail("carol@example.net")
        assert client.rcpt("alice@phone.example") == (452, b"4.2.2 mailbox full, try later")
        assert client.rcpt("bob@phone.example")[0] == 250  # bob's mailbox has room
        client.rset()
    assert len(hosted.inbox()) == 3  # nothing dropped, nothing evicted: all unsynced


HOSTILE_STORED = {
    "broken MIME": message(
        10,
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="never-closed"',
        body="--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
        "\r\n!!!! not base64 !!!!\r\n--wrong-boundary\r\n",
    ),
    "8-bit headers": (
        "From: J\u00fcrgen M\u00fcller <j@example.net>\r\nTo: alice@phone.example\r\n"
        "Subject: Gr\u00fc\u00dfe aus K\u00f6ln =?bogus-charset?Q?x?=\r\n"
        "Message-ID: <eight.bit@example.net>\r\n\r\nK\u00e4se\r\n"
    ).encode("utf-8")
    + b"Subject-ish latin-1: \xe9t\xe9\r\n",
    "no Message-ID, no Date": b"From: carol@example.net\r\nSubject: bare\r\n\r\nno id\r\n",
    "headers only": b"From: carol@example.net\r\nSubject: no body at all\r\n",
    "a line that is no header": b"From: c@example.net\r\nnot a header line\r\n"
    b"Message-ID: <after.junk@example.net>\r\n\r\nbody\r\n",
    "a 998-character header line": b"From: c@example.net\r\nX-Long: "
    + b"a" * (998 - len("X-Long: "))
    + b"\r\n\r\nbody\r\n",
}
HOSTILE_REFUSED = {
    "a 1 MB header line": (
        b"From: c@example.net\r\nX-Huge: " + b"h" * (1024 * 1024) + b"\r\n\r\nbody\r\n",
        500,
        b"5.5.2 line too long: at most 998 characters per line (RFC 5322 2.1.1)",
    ),
    "NUL bytes": (
        b"From: c@example.net\r\nSubject: n\x00l\r\n\r\nbo\x00dy\r\n",
        554,
        b"5.6.0 NUL bytes are not allowed in a message (RFC 5322 2.3)",
    ),
    "a bare LF": (
        b"From: c@example.net\r\nSubject: lf\nX-Smuggled: yes\r\n\r\nbody\r\n",
        554,
        b"5.6.0 bare CR or LF in the message: lines must end with CRLF (RFC 5321 2.3.8)",
    ),
}


def test_hostile_messages_are_stored_byte_exact(hosted: Hosted) -> None:
    stored: set[int] = set()
    # three each for alice and bob: the fixture's max_unsynced is 3
    for user, (name, raw) in zip(["alice", "bob"] * 3, HOSTILE_STORED.items(), strict=True):
        with hosted.smtp() as client:
            assert client.sendmail("carol@example.net", [f"{user}@phone.example"], raw) == {}, name
        (new,) = {m["id"] for m in hosted.inbox(user)} - stored
        stored.add(new)
        assert hosted.raw(new, user) == raw, name


def test_hostile_content_refusals_leave_the_listener_answering(hosted: Hosted) -> None:
    for name, (raw, code, reply) in HOSTILE_REFUSED.items():
        with hosted.smtp() as client:
            client.ehlo()
            assert client.mail("carol@example.net")[0] == 250
            assert client.rcpt("alice@phone.example")[0] == 250
            assert client.data(raw) == (code, reply), name
            # the same connection goes on
            assert client.noop()[0] == 250
    assert hosted.inbox() == []  # nothing half-stored
    with hosted.smtp() as client:
        assert client.sendmail("carol@example.net", ["alice@phone.example"], message(20)) == {}
    assert len(hosted.inbox()) == 1


def test_the_same_message_twice_is_stored_once(hosted: Hosted) -> None:
    with_id = message(30)
    without_id = b"From: carol@example.net\r\nSubject: twice\r\n\r\nsame bytes\r\n"
    with hosted.smtp() as client:
        for raw in (with_id, with_id, without_id, without_id):
            assert client.sendmail("carol@example.net", ["alice@phone.example"], raw) == {}
    assert sorted(m["subject"] for m in hosted.inbox()) == ["inbound 30", "twice"]


# -- the store's part (real SQLite) -----------------------------------------------------------
def test_delivery_evicts_only_synced_unchanged_messages_and_ack_makes_it_synced(
    tmp_path: Path,
) -> None:
    store = PhoneStore(tmp_path / "phone.sqlite3")
    store.add_user("alice", "alice@phone.example", "alice@corp.example", 3)
    puts = [
        {"kind": "put", "key": f"<d{n}@corp>", "message_id": f"<d{n}@corp>", "raw": b"x\r\n",
         "internaldate": f"2024-01-0{n}T00:00:00+00:00", "seen": False, "flagged": False}
        for n in (1, 2, 3)
    ]  # fmt: skip
    store.apply_ops("alice", list(enumerate(puts, start=1)))  # three synced messages
    oldest = next(m for m in store.list_folder("alice", "inbox") if m.key == "<d1@corp>")
    store.set_seen("alice", oldest.id, True)  # a phone change the desktop has not got

    first = store.deliver("alice", "<in1@x>", "<in1@x>", b"Subject: 1\r\n\r\n")
    assert (first.duplicate, first.evicted) == (False, 1)
    keys = [m.key for m in store.list_folder("alice", "inbox")]
    assert keys == ["<in1@x>", "<d3@corp>", "<d1@corp>"]  # d2 went, not the changed d1
    again = store.deliver("alice", "<in1@x>", "<in1@x>", b"other bytes")
    assert again == Delivery(first.id, duplicate=True, evicted=0)
    store.deliver("alice", "<in2@x>", "<in2@x>", b"Subject: 2\r\n\r\n")
    store.deliver("alice", "<in3@x>", "<in3@x>", b"Subject: 3\r\n\r\n")
    keys = [m.key for m in store.list_folder("alice", "inbox")]
    assert set(keys) == {"<in1@x>", "<in2@x>", "<in3@x>", "<d1@corp>"}  # over the window
    assert store.unsynced_count("alice") == 3
    snapshot = store.snapshot("alice")
    assert set(snapshot.restored) == {"<in1@x>", "<in2@x>", "<in3@x>"}  # the desktop lacks them

    store.ack_actions("alice", snapshot.action_seq)  # a session appended them
    assert store.unsynced_count("alice") == 0
    fourth = store.deliver("alice", "<in4@x>", "<in4@x>", b"Subject: 4\r\n\r\n")
    assert fourth.evicted == 2  # back to the window: the oldest synced ones went
    assert len(store.list_folder("alice", "inbox")) == 3
    destroyed = store.list_folder("alice", "inbox")[0]
    store.destroy("alice", destroyed.id)  # a tombstone until the desktop acknowledges
    assert store.deliver("alice", destroyed.key, destroyed.message_id, b"again").duplicate
    store.close()


# -- the key, as the agent computes it from the desktop's copy (real Dovecot) --------------
def test_message_identity_is_the_key_the_agent_sees_on_the_desktop(
    dovecot: Dovecot, imap_user: str
) -> None:
    raws = [message(40), *HOSTILE_STORED.values()]
    when = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    uids = [dovecot.append(imap_user, raw, when) for raw in raws]
    with ImapMailbox.connect(
        dovecot.host, dovecot.port, security="none", username=imap_user, password=dovecot.password
    ) as mailbox:
        mailbox.select("INBOX")
        keys = {m.uid: m.key for m in mailbox.summaries([u for u in uids if u is not None])}
    assert [keys[uid] for uid in uids if uid is not None] == [message_identity(r)[0] for r in raws]


# -- end to end: SMTP -> phone at once -> desktop after a sync, once ------------------------
@pytest.fixture
def linked(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    """The product with a paired agent; window 6, at most 7 unsynced inbound messages."""
    b = Bridge(dovecot, tmp_path, window=6).start()
    assert b.server is not None
    b.server.stop()
    set_options(b.server_ini, max_unsynced=7, max_message_size=MAX_SIZE)
    b.server = ServerThread(b.server_ini).start()
    b.write_agent_config(b.agent_ini)
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def next_second() -> None:
    """Wait for the wall clock's next second: arrival times are whole seconds (as IMAP
    INTERNALDATEs are), and two mails of one second may list in either order."""
    time.sleep(1.02 - time.time() % 1)


def send(b: Bridge, raw: bytes) -> dict[str, tuple[int, bytes]]:
    assert b.server is not None
    with smtplib.SMTP("127.0.0.1", b.server.ports["smtp"], timeout=10) as client:
        return client.sendmail("carol@example.net", ["alice@phone.example"], raw)


def desktop_raw(b: Bridge, uid: int) -> bytes:
    with b.imap() as client:
        raw: bytes = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    return raw


def test_inbound_mail_reaches_the_desktop_once_after_a_sync(linked: Bridge) -> None:
    desktop = [linked.deliver(n) for n in range(1, 4)]
    linked.sync_ok()
    with_id = message(50)
    without_id = b"From: carol@example.net\r\nSubject: no id, no date\r\n\r\nhi\r\n"
    next_second()
    assert send(linked, with_id) == {}
    next_second()
    assert send(linked, without_id) == {}
    inbox = linked.phone_list()["inbox"]
    assert [m["subject"] for m in inbox[:2]] == ["no id, no date", "inbound 50"]  # at once
    assert [m["message_id"] for m in inbox[2:]] == desktop[::-1]
    linked.phone("read", str(inbox[1]["id"]))  # read on the phone before the desktop has it

    linked.sync_ok()
    mails = linked.mails()
    assert (mails[0].seen, mails[1].seen) == (False, True)
    assert [m.subject for m in mails[:2]] == ["no id, no date", "inbound 50"]
    assert len(mails) == 5
    assert desktop_raw(linked, mails[0].uid) == without_id  # byte-exact on the desktop too
    assert desktop_raw(linked, mails[1].uid) == with_id
    assert mails[0].date == dt.datetime.fromisoformat(inbox[0]["date"])  # its arrival time
    linked.assert_in_sync()
    linked.sync_ok()
    linked.sync_ok()
    assert len(linked.mails()) == 5  # no second APPEND, with or without Message-ID
    linked.assert_in_sync()


def test_window_bound_holds_and_nothing_is_lost_with_more_inbound_than_the_window(
    linked: Bridge,
) -> None:
    desktop = [linked.deliver(n) for n in range(1, 9)]
    linked.sync_ok()
    assert linked.phone_inbox_ids() == desktop[::-1][:6]
    inbound: list[str] = []
    for n in range(7):
        next_second()
        raw = message(60 + n)
        assert send(linked, raw) == {}
        inbound.append(message_identity(raw)[0])
        phone = linked.phone_inbox_ids()
        assert phone[0] == inbound[-1]  # in the phone inbox at once
        # the oldest synced messages made room; unsynced ones are never evicted
        assert phone == (inbound[::-1] + desktop[::-1])[: max(6, len(inbound))]
    with pytest.raises(smtplib.SMTPRecipientsRefused) as full:
        send(linked, message(67))
    assert full.value.recipients["alice@phone.example"] == (452, b"4.2.2 mailbox full, try later")

    linked.sync_ok()
    assert set(inbound) <= set(linked.desktop_ids())
    assert len(linked.desktop_ids()) == 8 + 7  # nothing lost, nothing doubled
    assert linked.phone_inbox_ids() == inbound[::-1][:6]
    linked.assert_in_sync()

    next_second()
    late = message(67)
    assert send(linked, late) == {}  # the desktop took the others: room again
    assert linked.phone_inbox_ids() == [message_identity(late)[0], *inbound[::-1][:5]]
    linked.sync_ok()
    linked.sync_ok()
    assert len(linked.desktop_ids()) == 8 + 7 + 1
    assert set(desktop) | set(inbound) <= set(linked.desktop_ids())
    linked.assert_in_sync()


def test_server_stops_with_a_connection_open_mid_transaction(hosted: Hosted) -> None:
    client = hosted.smtp()
    client.ehlo()
    client.mail("carol@example.net")
    client.rcpt("alice@phone.example")
    started = time.monotonic()
    hosted.thread.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.data(message(90))
    client.close()
    assert phone_list(hosted.ini, "alice")["inbox"] == []  # never acknowledged, not stored
