"""`make demo`: the patent's story (EP 1 014 629, paragraphs 75-84) on loopback, end to end.

What runs: a throwaway Dovecot plays the corporate IMAP server, an aiosmtpd server the
corporate SMTP server (delivering into that Dovecot, and the hosted server's relay), the
hosted server itself (sync, inbound SMTP and submission listeners), and the agent, paired
with a one-time code. Seeded: a 15-message desktop inbox and a 6-slot phone. The story:
initial sync; the desktop reads and deletes; new mail; the phone deletes and restores;
mail to the phone address; `agent run` up and a sync asked for by trigger mail; a message
the phone sends via the desktop leaving through the corporate SMTP server.

After each step both inboxes are printed side by side (slot, subject, read, flagged,
mapped) and the invariants of docs/design.md are checked; the exit status is 0 only if
every check held. Everything runs under one temp directory and is stopped and removed at
the end, also after a failure, Ctrl-C, SIGTERM or SIGHUP. The test helpers in tests/
(Dovecot, the SMTP server, the bridge) are the machinery: the demo and the test suite
check the same invariants the same way.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import shlex
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bridge import Bridge, Mail, run_cli  # noqa: E402
from dovecot import Dovecot  # noqa: E402
from smtp_servers import MailServer  # noqa: E402
from test_agent_run import stop_agent, wait_for  # noqa: E402

from imapsync_bridge.agent.state import STATE_FILE, AgentState  # noqa: E402
from imapsync_bridge.headers import display_text  # noqa: E402

WINDOW = 6
SEEDED = 15
PHONE_ADDRESS = "alice@phone.example"
OUTSIDER = "bob@example.net"
BASE = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: unwind so every server is stopped and removed."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    """The first stop signal unwinds; later ones are ignored so the clean-up finishes."""
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def subject(n: int) -> str:
    return f"Message {n}"


class Story:
    """The running parts and what a user looks at: both inboxes, as one table."""

    def __init__(self, bridge: Bridge, corp: MailServer) -> None:
        self.bridge = bridge
        self.corp = corp
        self.created: set[str] = set()  # every subject that must never be lost
        self.step = 0
        self.running: subprocess.Popen[bytes] | None = None  # `agent run`, while it is up
        self.running_log = ""  # its log, kept for a failure report

    # -- acting, echoed like a shell session ------------------------------------------
    def cli(self, *argv: str) -> str:
        """One `imapsync-bridge` command as a user types it; fails the demo unless exit 0."""
        print(f"$ imapsync-bridge {shlex.join(argv)}")
        code, out, err = run_cli(*argv)
        for line in out.splitlines():
            print(f"  {line}")
        if code != 0:
            raise AssertionError(f"exit {code}: {err.strip()}")
        return out

    def agent(self, verb: str) -> str:
        return self.cli("agent", verb, "--config", str(self.bridge.agent_ini))

    def phone(self, *argv: str) -> str:
        bridge = self.bridge
        return self.cli("phone", "--config", str(bridge.server_ini), "--user", "alice", *argv)

    def phone_id(self, text: str, folder: str = "inbox") -> str:
        for message in self.bridge.phone_list()[folder]:
            if message["subject"] == text:
                return str(message["id"])
        raise AssertionError(f"no {text!r} in the phone {folder}")

    def desktop_receives(self, n: int) -> None:
        date = BASE + dt.timedelta(minutes=10 * n)
        raw = self.bridge.dovecot.make_message(n, date=date)
        self.bridge.dovecot.append(self.bridge.user, raw, date)
        self.created.add(subject(n))

    def send_mail(self, port: int, sender: str, to: str, text: str) -> None:
        """A mail from an SMTP client, as a phone or an outside sender submits it."""
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = sender, to, text
        message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
        message["Message-ID"] = make_msgid(domain="demo.example")
        message.set_content(f"{text}\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.send_message(message)
        print(f"  (SMTP to {to} on 127.0.0.1:{port}: {text!r})")

    # -- looking ----------------------------------------------------------------------
    def message_id(self, n: int) -> str:
        for mail in self.bridge.mails("INBOX"):
            if display_text(mail.subject) == subject(n):
                return str(mail.message_id)
        raise AssertionError(f"no {subject(n)!r} in the desktop inbox")

    def phone_subjects(self) -> list[str]:
        return [m["subject"] for m in self.bridge.phone_list()["inbox"]]

    def desktop_subjects(self, mailbox: str = "INBOX") -> list[str]:
        return [display_text(m.subject) for m in self.bridge.mails(mailbox)]

    def idling(self) -> bool:
        connections = self.bridge.agent_status().get("connections") or {}
        return bool(connections.get("imap_idle", {}).get("state") == "idle")

    def ledger_states(self) -> dict[str, str]:
        state = AgentState(self.bridge.agent_ini.parent / "state" / STATE_FILE)
        try:
            return {key: entry.state for key, entry in state.ledger().items()}
        finally:
            state.close()

    def table(self) -> list[str]:
        """Desktop INBOX and phone inbox side by side, newest first, one row a message;
        desktop mail older than the last phone row is summed up in one line."""
        listing = self.bridge.phone_list()
        phone = {m["message_id"]: (slot, m) for slot, m in enumerate(listing["inbox"], 1)}
        rows: list[tuple[str, str, Mail | None]] = []  # (key, date, desktop mail)
        for mail in self.bridge.mails("INBOX"):
            rows.append((str(mail.message_id), mail.date.isoformat(), mail))
        on_desktop = {key for key, _, _ in rows}
        rows += [(k, m["date"], None) for k, (_, m) in phone.items() if k not in on_desktop]
        rows.sort(key=lambda row: row[1], reverse=True)
        last_on_phone = max((i for i, row in enumerate(rows) if row[0] in phone), default=-1)
        shown, older = rows[: last_on_phone + 3], len(rows[last_on_phone + 3 :])
        ledger = self.ledger_states()
        blank = f"{'':<24} {'':<4} {'':<4}"
        lines = [
            f"  {'slot':>4}  {'desktop INBOX':<24} {'read':<4} {'flag':<4}  "
            f"{'phone inbox':<24} {'read':<4} {'flag':<4}  mapped"
        ]
        for key, _date, mail in shown:
            slot, message = phone.get(key, (None, None))
            left = blank
            if mail is not None:
                text = display_text(mail.subject)[:24]
                left = f"{text:<24} {yes(mail.seen):<4} {yes(mail.flagged):<4}"
            right = blank
            if message is not None:
                text = message["subject"][:24]
                right = f"{text:<24} {yes(message['seen']):<4} {yes(message['flagged']):<4}"
            mapped = "yes" if ledger.get(key) == "mapped" else "no"
            lines.append(f"  {slot or '-':>4}  {left}  {right}  {mapped}")
        if older:
            lines.append(f"     …  {older} older desktop messages, not on the phone")
        trash = ", ".join(self.desktop_subjects(self.bridge.trash)) or "-"
        phone_trash = ", ".join(m["subject"] for m in listing["trash"]) or "-"
        lines.append(f"  desktop Trash: {trash}   phone trash: {phone_trash}")
        return lines

    def show(self, title: str) -> None:
        print("\n".join(self.table()))
        print(f"  ({title})")

    # -- checking ---------------------------------------------------------------------
    def check(
        self, title: str, phone_inbox: list[str], extra: Callable[[], None] | None = None
    ) -> None:
        """Print the table, then check every invariant; an AssertionError ends the demo."""
        self.show(title)
        self.bridge.assert_in_sync()  # window, flags, no duplicates, triggers invisible
        listing = self.bridge.phone_list()
        got = [m["subject"] for m in listing["inbox"]]
        assert got == phone_inbox, f"phone inbox {got}, expected {phone_inbox}"
        ledger = self.ledger_states()
        unmapped = [
            m["subject"] for m in listing["inbox"] if ledger.get(m["message_id"]) != "mapped"
        ]
        assert not unmapped, f"on the phone but not mapped: {unmapped}"
        everywhere = {display_text(m.subject) for m in self.bridge.mails("INBOX")}
        everywhere |= {display_text(m.subject) for m in self.bridge.mails(self.bridge.trash)}
        lost = sorted(self.created - everywhere)
        assert not lost, f"lost from the desktop inbox and Trash: {lost}"
        if extra is not None:
            extra()
        print("  ✓ invariants hold: window, flags, mapping, nothing lost, no duplicates")

    def in_phone_trash(self, text: str) -> None:
        trash = [m["subject"] for m in self.bridge.phone_list()["trash"]]
        assert text in trash, f"{text!r} not in the phone trash {trash}"

    def in_desktop_trash(self, text: str, not_there: str) -> None:
        trash = self.desktop_subjects(self.bridge.trash)
        assert text in trash, f"{text!r} not in the desktop Trash {trash}"
        assert not_there not in trash, f"{not_there!r} still in the desktop Trash"

    def trigger_was_used(self, phrase: str) -> None:
        assert phrase not in self.desktop_subjects(self.bridge.trash), "trigger mail in Trash"
        assert "trigger mail: 1 valid" in self.bridge.agent_log(), "no valid trigger logged"

    def sent_state(self, message_id: str) -> str | None:
        listing = self.bridge.phone_list()
        for entry in listing["outbox"] + listing["sent"]:
            if entry["message_id"] == message_id:
                return str(entry["state"])
        return None

    def sent_once(self, message_id: str) -> None:
        assert self.corp.ids().count(message_id) == 1, "not sent exactly once"
        folders = self.bridge.agent_status()["folders"]
        sent = self.bridge.desktop_ids(folders["sent"])
        assert sent.count(message_id) == 1, "not once in the desktop Sent folder"
        assert message_id not in self.bridge.desktop_ids(folders["outbox"]), "left in Outbox"
        phone_sent = [m["message_id"] for m in self.bridge.phone_list()["sent"]]
        assert phone_sent.count(message_id) == 1, "not once in the phone's Sent"
        (received,) = [r for r in self.corp.received if r.message_id == message_id]
        print(
            f"  corporate SMTP got it from {received.mail_from} for {', '.join(received.rcpt_tos)};"
            f" desktop {folders['sent']}: {', '.join(self.desktop_subjects(folders['sent']))}"
        )

    @contextmanager
    def chapter(self, title: str) -> Iterator[None]:
        self.step += 1
        print(f"\n== {self.step}. {title}")
        yield


def yes(value: bool) -> str:
    return "yes" if value else "-"


def newest(*subjects: str | int) -> list[str]:
    return [subject(s) if isinstance(s, int) else s for s in subjects]


def story(s: Story) -> None:
    bridge = s.bridge
    server = bridge.server
    assert server is not None
    with s.chapter("initial sync: a 15-message desktop inbox, a 6-slot phone"):
        for n in range(1, SEEDED + 1):
            s.desktop_receives(n)
        print(f"  corporate IMAP: Dovecot on 127.0.0.1:{bridge.dovecot.port}, user {bridge.user}")
        print(f"  corporate SMTP: aiosmtpd on 127.0.0.1:{s.corp.port} (also the server's relay)")
        print(
            f"  hosted server: sync on 127.0.0.1:{server.ports['sync']}, "
            f"inbound SMTP on 127.0.0.1:{server.ports['smtp']}"
        )
        s.cli("agent", "pair", "--config", str(bridge.agent_ini), "--code", bridge.code)
        s.agent("sync")
        s.check("the phone holds the newest 6, each mapped", newest(15, 14, 13, 12, 11, 10))

    with s.chapter("the desktop reads 'Message 15' and deletes 'Message 13'"):
        with bridge.imap() as client:
            client.add_flags(client.search(["SUBJECT", subject(15)]), [b"\\Seen"])
        bridge.desktop_move(s.message_id(13), bridge.trash)
        s.agent("sync")
        s.check(
            "read on the phone too; 13 in the phone trash; 9 fills the free slot",
            newest(15, 14, 12, 11, 10, 9),
            lambda: s.in_phone_trash(subject(13)),
        )

    with s.chapter("new mail: 'Message 16' arrives on the desktop"):
        s.desktop_receives(16)
        s.agent("sync")
        s.check("16 on the phone; 9 evicted from it (not deleted)", newest(16, 15, 14, 12, 11, 10))

    with s.chapter("the phone deletes 'Message 11' and restores 'Message 13'"):
        s.phone("delete", s.phone_id(subject(11)))
        s.phone("restore", s.phone_id(subject(13), "trash"))
        s.agent("sync")
        s.check(
            "11 in the desktop Trash; 13 back in both inboxes",
            newest(16, 15, 14, 13, 12, 10),
            lambda: s.in_desktop_trash(subject(11), not_there=subject(13)),
        )

    with s.chapter(f"mail to the phone address {PHONE_ADDRESS} (inbound SMTP)"):
        s.send_mail(server.ports["smtp"], OUTSIDER, PHONE_ADDRESS, "Lunch at noon?")
        s.created.add("Lunch at noon?")
        s.show("in the phone inbox at once; the desktop gets it at the next sync")
        assert s.phone_subjects()[0] == "Lunch at noon?", "inbound mail not on the phone"
        s.agent("sync")
        s.check(
            "appended to the desktop inbox, mapped", newest("Lunch at noon?", 16, 15, 14, 13, 12)
        )

    with s.chapter("`agent run` is up; the phone mails the sync phrase"):
        bridge.write_agent_config(
            bridge.agent_ini, idle="true", sync_on_change="false", sync_interval="3600"
        )
        print("  agent.ini: idle = true, sync_on_change = false (only a trigger starts a sync)")
        print(f"$ imapsync-bridge agent run --config {bridge.agent_ini} &")
        s.running = bridge.run_agent()
        wait_for(s.idling, 15, "agent run watching the inbox with IDLE")
        time.sleep(0.5)  # the sessions for the links' arrival are done
        s.send_mail(s.corp.port, "carol@example.net", f"{bridge.user}@corp.example", subject(17))
        s.created.add(subject(17))
        time.sleep(1.5)
        s.show("17 is on the desktop; nothing asked for a sync yet")
        assert subject(17) not in s.phone_subjects(), "synced without a trigger"
        phrase = str(bridge.agent_status()["sync_phrase"])
        print(f"  the sync phrase (agent status): {phrase}")
        s.send_mail(s.corp.port, PHONE_ADDRESS, f"{bridge.user}@corp.example", phrase)
        wait_for(lambda: subject(17) in s.phone_subjects(), 15, "the triggered sync")
        wait_for(lambda: phrase not in s.desktop_subjects(), 5, "the trigger mail expunged")
        s.check(
            "the trigger mail started one sync and is gone (not in Trash, not on the phone)",
            newest(17, "Lunch at noon?", 16, 15, 14, 13),
            lambda: s.trigger_was_used(phrase),
        )

    with s.chapter("the phone sends a message via the desktop (corporate SMTP)"):
        out = s.phone(
            "compose", "--to", OUTSIDER, "--subject", "Re: Lunch at noon?",
            "--body", "Yes, see you there.", "--via-desktop", "--json",
        )  # fmt: skip
        message_id = str(json.loads(out)["message_id"])
        wait_for(lambda: message_id in s.corp.ids(), 15, "delivery through the corporate SMTP")
        wait_for(lambda: s.sent_state(message_id) == "sent", 15, "the phone's outbox entry sent")
        s.check(
            "sent once through the corporate SMTP; in the desktop Sent and the phone's Sent",
            newest(17, "Lunch at noon?", 16, 15, 14, 13),
            lambda: s.sent_once(message_id),
        )
        print(f"$ kill -TERM {s.running.pid}   # agent run stops cleanly")
        stop_agent(bridge, s.running)
        s.running = None
        s.agent("status")


def main() -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # each step as it happens, also into a pipe
        sys.stdout.reconfigure(line_buffering=True)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupted)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    story_: Story | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="imapsync-demo-") as tmp,
            Dovecot() as dovecot,
            MailServer(dovecot) as corp,
        ):
            print(f"demo workspace: {tmp} (Dovecot in {dovecot.root})")
            bridge = Bridge(dovecot, Path(tmp), window=WINDOW)
            bridge.smtp_port = corp.port
            try:
                bridge.start(relay_port=corp.port)
                story_ = Story(bridge, corp)
                story(story_)
            finally:
                if story_ is not None and story_.running is not None:
                    story_.running.terminate()
                    story_.running.wait(10)
                    story_.running_log = bridge.agent_log()
                bridge.stop()
    except AssertionError as exc:
        if story_ is not None and story_.running_log:
            print(f"--- agent run's log ---\n{story_.running_log}", file=sys.stderr)
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"\ndemo interrupted ({exc}); everything it started is stopped", file=sys.stderr)
        return 130
    took = time.monotonic() - started
    print(f"\ndemo complete in {took:.1f} s: every invariant held after every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
