"""SIGKILL the agent in the middle of a session, then sync again: invariants must hold.

The server's frame observer kills the `agent sync` process at a chosen frame (the agent
is then blocked waiting for that frame's answer, which the server still processes), or an
IMAP proxy between the agent and Dovecot kills it at a chosen IMAP command, either before
the command reaches Dovecot or right after (done on the server, the answer never read).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import REPO, Bridge, kill
from dovecot import Dovecot
from proxy import Proxy, StallingProxy


class Killer:
    """Kills the agent process when the server sees the n-th frame of a type."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.frame_type = ""
        self.nth = 0
        self.seen = 0
        self.fired = threading.Event()

    def arm(self, pid: int, frame_type: str, nth: int) -> None:
        self.pid, self.frame_type, self.nth, self.seen = pid, frame_type, nth, 0
        self.fired.clear()

    def __call__(self, user: str | None, frame: dict[str, Any]) -> None:
        if self.pid is None or frame.get("type") != self.frame_type:
            return
        self.seen += 1
        if self.seen == self.nth:
            kill(self.pid)
            self.pid = None
            self.fired.set()


@pytest.fixture
def killer_bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[tuple[Bridge, Killer]]:
    killer = Killer()
    bridge = Bridge(dovecot, tmp_path, window=6).start(observer=killer)
    bridge.pair()
    try:
        yield bridge, killer
    finally:
        bridge.stop()


def everything(bridge: Bridge) -> dict[str, list[str]]:
    listing = bridge.phone_list()
    return {
        "desktop inbox": bridge.desktop_ids("INBOX"),
        "desktop trash": bridge.desktop_ids("Trash"),
        "phone inbox": [m["message_id"] for m in listing["inbox"]],
        "phone trash": [m["message_id"] for m in listing["trash"]],
    }


def crash_at_frame(bridge: Bridge, killer: Killer, frame_type: str, nth: int) -> None:
    process = bridge.sync_process()
    killer.arm(process.pid, frame_type, nth)
    process.wait(60)
    assert killer.fired.is_set(), f"the session never sent {frame_type} #{nth}"


class KillingProxy(Proxy):
    """An IMAP proxy that SIGKILLs the agent at its n-th IMAP command matching."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.pid: int | None = None
        self.pattern = re.compile(b"")
        self.nth = 0
        self.forward_first = False
        self.seen = 0

    def arm(self, pid: int, pattern: bytes, nth: int, forward_first: bool) -> None:
        self.pattern = re.compile(pattern, re.IGNORECASE)
        self.pid, self.nth, self.forward_first, self.seen = pid, nth, forward_first, 0
        self.fired.clear()

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while line := reader.readline():
                hit = self.pid is not None and self.pattern.search(line)
                if hit:
                    self.seen += 1
                    hit = self.seen == self.nth
                if hit and not self.forward_first:
                    self._kill()
                    break
                server.sendall(line)
                if hit:
                    self._kill()
        except OSError:
            pass
        finally:
            server.close()

    def _kill(self) -> None:
        if self.pid is not None:
            kill(self.pid)
            self.pid = None
            self.fired.set()

    def close(self) -> None:
        self.listener.close()


def make_changes(bridge: Bridge, ids: list[str]) -> None:
    """A bit of everything on both sides since the last sync."""
    bridge.phone("delete", str(bridge.phone_id(ids[19])))
    bridge.phone("read", str(bridge.phone_id(ids[18])))
    with bridge.imap() as client:
        client.move([bridge.desktop_uid(ids[17])], "Trash")
        client.add_flags([bridge.desktop_uid(ids[16])], [b"\\Flagged"])
    bridge.deliver(21)
    bridge.deliver(22)


def check_after_recovery(bridge: Bridge, ids: list[str]) -> None:
    bridge.sync_ok()
    bridge.assert_in_sync()
    state = everything(bridge)
    assert ids[19] in state["desktop trash"] and ids[19] in state["phone trash"]
    assert ids[17] in state["desktop trash"] and ids[17] in state["phone trash"]
    mails = {m.message_id: m for m in bridge.mails()}
    assert mails[ids[18]].seen
    assert mails[ids[16]].flagged
    # Nothing lost: all 22 messages still exist on the desktop, once.
    desktop = state["desktop inbox"] + state["desktop trash"]
    assert len(desktop) == len(set(desktop)) == 22
    # A further sync changes nothing.
    bridge.sync_ok()
    assert everything(bridge) == state


FRAME_POINTS = [
    ("snapshot", 1),  # before anything was planned
    ("ops", 1),  # after the desktop actions, the update's phone actions in flight
    ("ops", 2),  # the evictions and pulls of normalization in flight
    ("ack_actions", 1),  # phone actions applied, not yet acknowledged
    ("complete", 1),  # ledger committed, server not yet told
]


@pytest.mark.parametrize(("frame_type", "nth"), FRAME_POINTS, ids=lambda v: str(v))
def test_sigkill_during_an_update_sync(
    killer_bridge: tuple[Bridge, Killer], frame_type: str, nth: int
) -> None:
    bridge, killer = killer_bridge
    ids = [bridge.deliver(n) for n in range(1, 21)]
    bridge.sync_ok()
    make_changes(bridge, ids)
    crash_at_frame(bridge, killer, frame_type, nth)
    check_after_recovery(bridge, ids)


@pytest.mark.parametrize(("frame_type", "nth"), [("snapshot", 1), ("ops", 1), ("complete", 1)])
def test_sigkill_during_the_first_sync(
    killer_bridge: tuple[Bridge, Killer], frame_type: str, nth: int
) -> None:
    bridge, killer = killer_bridge
    ids = [bridge.deliver(n) for n in range(1, 21)]
    crash_at_frame(bridge, killer, frame_type, nth)
    bridge.sync_ok()
    assert bridge.phone_inbox_ids() == list(reversed(ids))[:6]
    bridge.assert_in_sync()


def test_a_desktop_delete_made_after_a_crash_is_not_undone(
    killer_bridge: tuple[Bridge, Killer],
) -> None:
    """The session that pulls new mail (and evicts the oldest) dies after the server
    applied its one batch of ops, before its commit; the desktop user then deletes the
    new mail. The next session must carry that delete to the phone, not read the
    phone's copy as the phone user's and restore it to the desktop inbox."""
    bridge, killer = killer_bridge
    for n in range(1, 7):
        bridge.deliver(n)
    bridge.sync_ok()
    new = bridge.deliver(20)
    crash_at_frame(bridge, killer, "ops", 1)  # the server applies the batch; no commit
    assert new in bridge.phone_inbox_ids()  # its put was applied before the kill
    bridge.desktop_move(new, bridge.trash)
    bridge.sync_ok()
    assert new in bridge.desktop_ids(bridge.trash) and new not in bridge.desktop_ids()
    assert new in [m["message_id"] for m in bridge.phone_list()["trash"]]
    bridge.assert_in_sync()


IMAP_POINTS = [
    (rb"^\S+ UID MOVE", 1, False),  # the delete to Trash never reached Dovecot
    (rb"^\S+ UID MOVE", 1, True),  # moved on Dovecot, the answer never read
    (rb"^\S+ UID STORE", 1, True),  # a flag set on Dovecot, the session lost
    (rb"^\S+ UID FETCH .*BODY\.PEEK\[\]", 1, False),  # while pulling a message
]


@pytest.mark.parametrize(("pattern", "nth", "forward_first"), IMAP_POINTS, ids=str)
def test_sigkill_among_the_imap_actions(
    killer_bridge: tuple[Bridge, Killer],
    pattern: bytes,
    nth: int,
    forward_first: bool,
) -> None:
    bridge, _killer = killer_bridge
    ids = [bridge.deliver(n) for n in range(1, 21)]
    bridge.sync_ok()
    make_changes(bridge, ids)
    proxy = KillingProxy(bridge.dovecot.port)
    proxied = bridge.agent_ini.parent / "proxied.ini"
    bridge.write_agent_config(proxied, imap_port=proxy.port)
    try:
        process = bridge.sync_process(proxied)
        proxy.arm(process.pid, pattern, nth, forward_first)
        process.wait(60)
        assert proxy.fired.is_set(), f"the session never sent {pattern!r}"
    finally:
        proxy.close()
    check_after_recovery(bridge, ids)


class ServerProcess:
    """`imapsync-bridge server run` as a real process on a fixed port (restartable)."""

    def __init__(self, bridge: Bridge) -> None:
        probe = socket.create_server(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        text = bridge.server_ini.read_text()
        bridge.server_ini.write_text(
            re.sub(r"sync_listen = .*", f"sync_listen = 127.0.0.1:{self.port}", text)
        )
        self.ini = bridge.server_ini
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config",
             str(self.ini)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server run did not start listening")

    def kill(self) -> None:
        if self.process is not None:
            kill(self.process.pid)
            self.process.wait(10)


class ByteCountingProxy(Proxy):
    """Forwards to the sync listener; SIGKILLs the server after the agent sent N bytes."""

    def __init__(self, target_port: int, server: ServerProcess, after_bytes: int) -> None:
        super().__init__(target_port)
        self.server = server
        self.after_bytes = after_bytes
        self.sent = 0

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(4096):
                upstream.sendall(data)
                self.sent += len(data)
                if self.sent >= self.after_bytes and not self.fired.is_set():
                    self.fired.set()
                    self.server.kill()
        except OSError:
            pass
        finally:
            upstream.close()


@pytest.mark.parametrize("after_bytes", [1500, 2200, 2900])
def test_sigkill_of_the_server_mid_session(
    dovecot: Dovecot, tmp_path: Path, after_bytes: int
) -> None:
    bridge = Bridge(dovecot, tmp_path, window=6).start()
    bridge.stop()  # the in-process listener; a real process takes over on a fixed port
    server = ServerProcess(bridge)
    server.start()
    try:
        bridge.write_agent_config(bridge.agent_ini)
        _point_agent_at(bridge.agent_ini, server.port)
        bridge.pair()
        ids = [bridge.deliver(n) for n in range(1, 21)]
        bridge.sync_ok()
        make_changes(bridge, ids)
        proxy = ByteCountingProxy(server.port, server, after_bytes)
        proxied = bridge.agent_ini.parent / "proxied.ini"
        bridge.write_agent_config(proxied)
        _point_agent_at(proxied, proxy.port)
        rc, _out, err = bridge.sync(ini=proxied)
        proxy.close()
        assert proxy.fired.is_set(), f"the session sent only {proxy.sent} bytes"
        assert rc == 1, "a session whose server died cannot have completed"
        server.start()
        check_after_recovery(bridge, ids)
    finally:
        server.kill()


def _point_agent_at(ini: Path, port: int) -> None:
    ini.write_text(re.sub(r"server = .*", f"server = 127.0.0.1:{port}", ini.read_text()))


def test_a_silent_server_times_out_and_the_session_is_retried(
    killer_bridge: tuple[Bridge, Killer],
) -> None:
    bridge, _killer = killer_bridge
    ids = [bridge.deliver(n) for n in range(1, 21)]
    bridge.sync_ok()
    make_changes(bridge, ids)
    assert bridge.server is not None
    proxy = StallingProxy(bridge.server.port, after_bytes=2000)
    proxied = bridge.agent_ini.parent / "proxied.ini"
    bridge.write_agent_config(proxied, server_timeout="2")
    _point_agent_at(proxied, proxy.port)
    try:
        rc, _out, err = bridge.sync(ini=proxied)
    finally:
        proxy.close()
    assert proxy.fired.is_set() and proxy.connections >= 2
    assert rc == 0, err  # the retry on a new connection completed the session
    check_after_recovery(bridge, ids)
