"""The whole product on loopback for integration tests.

A real Dovecot user (the corporate inbox), the hosted server from ``server init`` running
its TLS sync listener in a thread, and an agent configured and paired through the CLI.
Tests look at both sides the way a user would: the desktop through plain imapclient, the
phone through ``phone list --json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from dovecot import Dovecot

from imapsync_bridge import cli
from imapsync_bridge.config import load_server_config
from imapsync_bridge.headers import display_text
from imapsync_bridge.protocol import schema
from imapsync_bridge.server.app import Running, init_server, serve
from imapsync_bridge.server.listener import SyncListener, SyncSessionHandler
from imapsync_bridge.sync.trigger import carries_phrase

# Called with (user, frame as plain JSON values) before the server handles each frame.
FrameObserver = Callable[[str | None, dict[str, Any]], None]


def observed_handler(observer: FrameObserver) -> type[SyncSessionHandler]:
    """A session handler that shows each frame to ``observer`` first (fault tests kill
    or hold the agent there); it runs in the listener's worker thread."""

    class Observed(SyncSessionHandler):
        def handle(self, frame: schema.ToServer) -> schema.Frame | None:
            observer(self.user, schema.to_builtins(frame))
            return super().handle(frame)

    return Observed


REPO = Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@dataclass(frozen=True)
class Mail:
    """One desktop message as a user sees it in a mail client."""

    uid: int
    message_id: str | None
    subject: str
    date: dt.datetime
    seen: bool
    flagged: bool


class ServerThread:
    """`server run` in a thread, stoppable, with a frame observer for fault tests."""

    def __init__(self, ini: Path, observer: FrameObserver | None = None) -> None:
        self.config = load_server_config(ini)
        self.observer = observer
        self.port = 0
        self.ports: dict[str, int] = {}  # every listener's bound port, by name
        self.running: Running | None = None  # what serve started (listeners, logins)
        self.sync: SyncListener | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.config, stop=self._stop, ready=self._listening)

        try:
            # asyncio.run cancels and awaits whatever is left before closing the loop:
            # no coroutine is left for the garbage collector to finalize later.
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def _listening(self, running: Running) -> None:
        self.sync = running.sync
        if self.observer is not None:
            self.sync.handler_class = observed_handler(self.observer)
        self.port = running.ports["sync"]
        self.ports = dict(running.ports)
        self.running = running
        self._ready.set()

    def call(self, coroutine: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's event loop (e.g. ``sync.push(...)``)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"sync listener did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the sync listener did not stop"


class Bridge:
    def __init__(self, dovecot: Dovecot, root: Path, window: int = 6) -> None:
        self.dovecot = dovecot
        self.root = root
        self.window = window
        self.user = dovecot.new_user()
        self.trash = dovecot.profile.trash  # the desktop Trash, as this server names it
        self.phone_user = "alice"
        self.server_dir = root / "server"
        self.server_ini = self.server_dir / "server.ini"
        self.agent_ini = root / "agent" / "agent.ini"
        self.server: ServerThread | None = None
        self.code = ""
        self.smtp_port: int | None = None  # the corporate SMTP server: adds [smtp]
        self.from_address = f"{self.user}@corp.example"  # the agent's [smtp] from_address
        #: [imap] and [smtp] sign in with these OAuth2 keys instead of a password
        #: (AuthorizationServer.ini_lines() of tests/oauth_server.py)
        self.oauth2: list[str] = []

    # -- set-up ----------------------------------------------------------------------
    def start(self, observer: FrameObserver | None = None, relay_port: int | None = None) -> Bridge:
        """``relay_port``: the hosted server's ``[relay]`` (send now) on loopback."""
        init_server(
            self.server_dir, "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
        )
        if relay_port is not None:
            text = self.server_ini.read_text().replace("port = 25\n", f"port = {relay_port}\n")
            self.server_ini.write_text(text.replace("host = localhost", "host = 127.0.0.1"))
        code, out, err = run_cli(
            "server", "add-user", "--config", str(self.server_ini), self.phone_user,
            "--address", "alice@phone.example", "--desktop-address", f"{self.user}@corp.example",
            "--window", str(self.window),
        )  # fmt: skip
        assert code == 0, err
        self.code = out.strip().splitlines()[-1]
        self.server = ServerThread(self.server_ini, observer).start()
        self.write_agent_config(self.agent_ini)
        return self

    def write_agent_config(
        self, ini: Path, imap_port: int | None = None, **agent_options: str
    ) -> None:
        ini.parent.mkdir(parents=True, exist_ok=True)
        password = ini.parent / "imap.pass"
        password.write_text(self.dovecot.password + "\n")
        password.chmod(0o600)
        assert self.server is not None
        options = {"state_dir": "state", "server": f"127.0.0.1:{self.server.port}"}
        options.update(agent_options)
        lines = ["[agent]"] + [f"{k} = {v}" for k, v in options.items()]
        lines += [
            "[imap]",
            "host = 127.0.0.1",
            f"port = {imap_port or self.dovecot.port}",
            "security = none",
            f"username = {self.user}",
            *(self.oauth2 or ["password_file = imap.pass"]),
        ]
        if self.smtp_port is not None:
            lines += [
                "[smtp]", "host = 127.0.0.1", f"port = {self.smtp_port}", "security = none",
                f"username = {self.user if self.oauth2 else ''}", *self.oauth2,
                f"from_address = {self.from_address}",
            ]  # fmt: skip
        ini.write_text("\n".join(lines) + "\n")

    def pair(self, ini: Path | None = None, code: str | None = None) -> None:
        rc, _out, err = run_cli(
            "agent", "pair", "--config", str(ini or self.agent_ini), "--code", code or self.code
        )
        assert rc == 0, err

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    # -- acting ----------------------------------------------------------------------
    def sync(self, *extra: str, ini: Path | None = None) -> tuple[int, str, str]:
        return run_cli("agent", "sync", "--config", str(ini or self.agent_ini), *extra)

    def sync_ok(self) -> str:
        rc, out, err = self.sync()
        assert rc == 0, f"agent sync failed ({rc}): {err}"
        return out

    def sync_process(self, ini: Path | None = None) -> subprocess.Popen[bytes]:
        """`agent sync` as a real process (for SIGKILL tests)."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", "agent", "sync", "--config",
             str(ini or self.agent_ini)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def run_agent(self, ini: Path | None = None) -> subprocess.Popen[bytes]:
        """`agent run` as a real process; its log goes to ``agent-run.log`` beside the ini."""
        ini = ini or self.agent_ini
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log = (ini.parent / "agent-run.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", "agent", "run", "--config", str(ini)],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip

    def agent_log(self, ini: Path | None = None) -> str:
        return ((ini or self.agent_ini).parent / "agent-run.log").read_text(errors="replace")

    def phone(self, *argv: str) -> str:
        rc, out, err = run_cli(
            "phone", "--config", str(self.server_ini), "--user", self.phone_user, *argv
        )
        assert rc == 0, err
        return out

    def phone_list(self) -> dict[str, Any]:
        return json.loads(self.phone("list", "--json"))

    def phone_inbox_ids(self) -> list[str]:
        return [m["message_id"] for m in self.phone_list()["inbox"]]

    def phone_id(self, message_id: str, folder: str = "inbox") -> int:
        for message in self.phone_list()[folder]:
            if message["message_id"] == message_id:
                return int(message["id"])
        raise AssertionError(f"{message_id} not in the phone {folder}")

    def agent_status(self) -> dict[str, Any]:
        rc, out, err = run_cli("agent", "status", "--config", str(self.agent_ini), "--json")
        assert rc == 0, err
        return json.loads(out)

    # -- the desktop, seen through plain imapclient ----------------------------------
    def deliver(self, n: int, minutes: int | None = None, **kwargs: Any) -> str:
        """Append message n with INTERNALDATE = base + minutes (default n); its Message-ID."""
        date = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC) + dt.timedelta(
            minutes=n if minutes is None else minutes
        )
        raw = self.dovecot.make_message(n, date=date, **kwargs)
        self.dovecot.append(self.user, raw, date)
        header = BytesHeaderParser(policy=compat32).parsebytes(raw)
        return str(header.get("Message-ID", ""))

    def mails(self, mailbox: str = "INBOX") -> list[Mail]:
        """The mailbox newest first (INTERNALDATE, then UID), as a mail client lists it."""
        with self.dovecot.client(self.user) as client:
            client.normalise_times = False
            client.select_folder(mailbox, readonly=True)
            uids = client.search("ALL")
            data = client.fetch(
                uids, ["INTERNALDATE", "FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"]
            ) if uids else {}  # fmt: skip
        mails = []
        for uid, item in data.items():
            header = BytesHeaderParser(policy=compat32).parsebytes(
                item[b"BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"]
            )
            mails.append(
                Mail(
                    uid=uid,
                    message_id=header.get("Message-ID"),
                    subject=str(header.get("Subject", "")),
                    date=item[b"INTERNALDATE"].astimezone(dt.UTC),
                    seen=b"\\Seen" in item[b"FLAGS"],
                    flagged=b"\\Flagged" in item[b"FLAGS"],
                )
            )
        mails.sort(key=lambda m: (m.date, m.uid), reverse=True)
        return mails

    def desktop_ids(self, mailbox: str = "INBOX") -> list[str | None]:
        return [m.message_id for m in self.mails(mailbox)]

    def desktop_uid(self, message_id: str, mailbox: str = "INBOX") -> int:
        for mail in self.mails(mailbox):
            if mail.message_id == message_id:
                return mail.uid
        raise AssertionError(f"{message_id} not in the desktop {mailbox}")

    @contextlib.contextmanager
    def imap(self, mailbox: str = "INBOX") -> Iterator[Any]:
        with self.dovecot.client(self.user) as client:
            client.select_folder(mailbox)
            yield client

    def desktop_move(self, message_id: str, to: str, source: str = "INBOX") -> None:
        """What a desktop mail client does to move a message: MOVE, or on a server
        without it COPY, \\Deleted and UID EXPUNGE of just that message."""
        uid = self.desktop_uid(message_id, source)
        with self.imap(source) as client:
            if client.has_capability("MOVE"):
                client.move([uid], to)
            else:
                client.copy([uid], to)
                client.add_flags([uid], [b"\\Deleted"])
                client.uid_expunge([uid])

    # -- the invariants ----------------------------------------------------------------
    def assert_in_sync(self) -> None:
        """DESIGN.md invariants 1, 2, 4 and 7 after a completed sync: mail whose subject
        carries the sync phrase (trigger mail) is not part of the synced inbox."""
        phrase = self.agent_status()["sync_phrase"]
        inbox = [
            m
            for m in self.mails("INBOX")
            if not (phrase and carries_phrase(display_text(m.subject), phrase))
        ]
        trash = self.mails(self.trash)
        phone = self.phone_list()
        expected = []
        for mail in inbox:
            if mail.message_id not in expected:
                expected.append(mail.message_id)
        expected = expected[: self.window]
        assert [m["message_id"] for m in phone["inbox"]] == expected, "window mismatch"
        by_id = {m.message_id: m for m in inbox}
        for message in phone["inbox"]:
            mail = by_id[message["message_id"]]
            assert (message["seen"], message["flagged"]) == (mail.seen, mail.flagged), (
                f"flags differ for {mail.message_id}"
            )
        for folder in (inbox, trash):
            ids = [m.message_id for m in folder]
            assert len(ids) == len(set(ids)), "duplicate on the desktop"
        assert not {m.message_id for m in inbox} & {m.message_id for m in trash}
        phone_ids = [m["message_id"] for m in phone["inbox"] + phone["trash"]]
        if phrase:
            shown = [m["subject"] for m in phone["inbox"] + phone["trash"]]
            assert not [s for s in shown if carries_phrase(s, phrase)], "a trigger on the phone"
        assert len(phone_ids) == len(set(phone_ids)), "duplicate on the phone"


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
