"""`make demo`: the product end to end on loopback, driven through its command line.

A throwaway Dovecot plays the corporate IMAP server (20 mails in the inbox); the hosted
server runs as `imapsync-bridge server run`; the agent pairs and syncs with the same
commands a user types. Then the phone deletes and reads, the desktop flags and receives
new mail, and one more `agent sync` carries everything across. Both inboxes are printed
after each step.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dovecot import Dovecot  # noqa: E402

WINDOW = 6
BASE = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)


def run(*argv: str) -> str:
    """One `imapsync-bridge` command, echoed like a shell session."""
    print(f"$ imapsync-bridge {' '.join(argv)}")
    done = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    for line in done.stdout.splitlines():
        print(f"  {line}")
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"command failed with exit code {done.returncode}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def desktop_newest(dovecot: Dovecot, user: str, count: int) -> list[str]:
    with dovecot.client(user) as client:
        client.select_folder("INBOX", readonly=True)
        data = client.fetch(client.search("ALL"), ["INTERNALDATE", "ENVELOPE"])
    rows = sorted(data.values(), key=lambda d: d[b"INTERNALDATE"], reverse=True)
    return [d[b"ENVELOPE"].subject.decode() for d in rows[:count]]


def phone_subjects(server_ini: Path) -> list[str]:
    return [m["subject"] for m in phone_listing(server_ini)["inbox"]]


def show_desktop(dovecot: Dovecot, user: str) -> None:
    with dovecot.client(user) as client:
        for mailbox in ("INBOX", "Trash"):
            client.select_folder(mailbox, readonly=True)
            uids = client.search("ALL")
            data = client.fetch(uids, ["FLAGS", "INTERNALDATE", "ENVELOPE"])
            rows = sorted(data.values(), key=lambda d: d[b"INTERNALDATE"], reverse=True)
            print(f"  desktop {mailbox} ({len(rows)}):")
            for item in rows[:8]:
                subject = item[b"ENVELOPE"].subject.decode()
                flags = item[b"FLAGS"]
                unread = "  " if b"\\Seen" in flags else "N "
                mark = unread + ("F" if b"\\Flagged" in flags else " ")
                print(f"    {mark} {subject}")
            if len(rows) > 8:
                print(f"    ... and {len(rows) - 8} older")


def show_phone(server_ini: Path) -> None:
    print("  phone:")
    out = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", "phone", "--config", str(server_ini),
         "--user", "alice", "list"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        print(f"    {line}")


def phone_listing(server_ini: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", "phone", "--config", str(server_ini),
         "--user", "alice", "list", "--json"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def phone_id(server_ini: Path, subject: str) -> str:
    for message in phone_listing(server_ini)["inbox"]:
        if message["subject"] == subject:
            return str(message["id"])
    raise SystemExit(f"no phone message {subject!r}")


def main() -> None:
    with Dovecot() as dovecot, tempfile.TemporaryDirectory(prefix="imapsync-demo-") as tmp:
        root = Path(tmp)
        user = dovecot.new_user()
        print(f"corporate IMAP: Dovecot on 127.0.0.1:{dovecot.port}, user {user}")
        for n in range(1, 21):
            date = BASE + dt.timedelta(minutes=10 * n)
            dovecot.append(user, dovecot.make_message(n, date=date), date)

        port = free_port()
        print("\n== the hosted server")
        run("server", "init", "--data-dir", str(root / "server"), "--hostname", "127.0.0.1",
            "--sync-port", str(port))  # fmt: skip
        server_ini = root / "server" / "server.ini"
        code = run("server", "add-user", "--config", str(server_ini), "alice",
                   "--address", "alice@phone.example", "--desktop-address",
                   f"{user}@corp.example", "--window", str(WINDOW)).splitlines()[-1]  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config",
             str(server_ini)],
            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_port(port)
            agent_dir = root / "agent"
            agent_dir.mkdir()
            (agent_dir / "imap.pass").write_text(dovecot.password + "\n")
            (agent_dir / "imap.pass").chmod(0o600)
            agent_ini = agent_dir / "agent.ini"
            agent_ini.write_text(
                f"[agent]\nstate_dir = state\nserver = 127.0.0.1:{port}\n\n"
                f"[imap]\nhost = 127.0.0.1\nport = {dovecot.port}\nsecurity = none\n"
                f"username = {user}\npassword_file = imap.pass\n"
            )
            print("\n== the agent pairs and syncs")
            run("agent", "pair", "--config", str(agent_ini), "--code", code)
            run("agent", "sync", "--config", str(agent_ini))
            show_desktop(dovecot, user)
            show_phone(server_ini)

            print("\n== the phone deletes 'Message 20' and reads 'Message 19';")
            print("== the desktop flags 'Message 18' and receives 'Message 21'")
            run("phone", "--config", str(server_ini), "--user", "alice", "delete",
                phone_id(server_ini, "Message 20"))  # fmt: skip
            run("phone", "--config", str(server_ini), "--user", "alice", "read",
                phone_id(server_ini, "Message 19"))  # fmt: skip
            with dovecot.client(user) as client:
                client.select_folder("INBOX")
                hits = client.search(["SUBJECT", "Message 18"])
                client.add_flags(hits, [b"\\Flagged"])
            date = BASE + dt.timedelta(minutes=10 * 21)
            dovecot.append(user, dovecot.make_message(21, date=date), date)
            run("agent", "sync", "--config", str(agent_ini))
            show_desktop(dovecot, user)
            show_phone(server_ini)
            print()
            run("agent", "status", "--config", str(agent_ini))
            phone, desktop = phone_subjects(server_ini), desktop_newest(dovecot, user, WINDOW)
            if phone != desktop:
                raise SystemExit(f"demo FAILED: phone {phone} != desktop newest {desktop}")
        finally:
            server.terminate()
            server.wait(10)
    print(f"\ndemo complete: the phone holds the desktop's newest {WINDOW} messages.")


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    main()
