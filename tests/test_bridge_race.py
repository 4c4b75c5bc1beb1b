"""A user changes a message's flags while a sync is writing its other flag (issue 12).

The lost-update race of two-way sync: the sync must write only the flags its plan
changes (and, with CONDSTORE, only on messages nobody changed since it read them), and the
phone store must keep a phone change made after the snapshot the plan came from. The
user's change is made to land at every IMAP command of the session in turn (a proxy holds
the agent's command until the change is done), and for the phone also at the moment the
server receives the agent's actions; then a second sync must show both flags on both
sides.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge import Bridge
from dovecot import Dovecot
from proxy import Proxy

COMMAND = re.compile(rb"^[A-Z]{4}\d+ ")  # an imaplib command line: tag, then the command


class HoldingProxy(Proxy):
    """An IMAP proxy that, at the agent's n-th command, runs a user's change before it
    forwards the command: the agent waits for its answer while the user acts."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.commands = 0
        self.nth = 0
        self.change: Callable[[], None] | None = None
        self.held: list[bytes] = []
        self.error: BaseException | None = None

    def arm(self, nth: int, change: Callable[[], None]) -> None:
        self.commands, self.nth, self.change, self.error = 0, nth, change, None
        self.fired.clear()

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while line := reader.readline():
                if COMMAND.match(line):
                    self.commands += 1
                    if self.commands == self.nth and self.change is not None:
                        self._run_change(line)
                upstream.sendall(line)
        except OSError:
            pass
        finally:
            upstream.close()

    def _run_change(self, line: bytes) -> None:
        change, self.change = self.change, None
        self.held.append(b" ".join(line.split()[1:3]))  # e.g. b"UID STORE"
        try:
            assert change is not None
            change()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        self.fired.set()


class FrameHold:
    """Runs a user's change when the server receives the agent's first frame of a type
    (before the server acts on it)."""

    def __init__(self) -> None:
        self.frame_type = ""
        self.change: Callable[[], None] | None = None
        self.fired = threading.Event()

    def arm(self, frame_type: str, change: Callable[[], None]) -> None:
        self.frame_type, self.change = frame_type, change
        self.fired.clear()

    def __call__(self, user: str | None, frame: dict[str, Any]) -> None:
        if self.change is not None and frame.get("type") == self.frame_type:
            change, self.change = self.change, None
            change()
            self.fired.set()


@pytest.fixture
def raced(
    profiled_dovecot: Dovecot, tmp_path: Path
) -> Iterator[tuple[Bridge, HoldingProxy, FrameHold]]:
    """On each server profile: with CONDSTORE the conditional STORE, without it the
    single-flag write and the next session's diff."""
    dovecot = profiled_dovecot
    hold = FrameHold()
    bridge = Bridge(dovecot, tmp_path, window=6).start(observer=hold)
    proxy = HoldingProxy(dovecot.port)
    bridge.write_agent_config(bridge.agent_ini, imap_port=proxy.port)
    bridge.pair()
    try:
        yield bridge, proxy, hold
    finally:
        proxy.close()
        bridge.stop()


def desktop_flags(bridge: Bridge, message_id: str) -> tuple[bool, bool]:
    mail = next(m for m in bridge.mails() if m.message_id == message_id)
    return mail.seen, mail.flagged


def phone_flags(bridge: Bridge, message_id: str) -> tuple[bool, bool]:
    message = next(m for m in bridge.phone_list()["inbox"] if m["message_id"] == message_id)
    return message["seen"], message["flagged"]


def desktop_store(bridge: Bridge, message_id: str, op: str, flag: bytes) -> None:
    """What a desktop mail client does: its own IMAP connection, one STORE."""
    uid = bridge.desktop_uid(message_id)
    with bridge.imap() as client:
        (client.add_flags if op == "+" else client.remove_flags)([uid], [flag])


def start_clean(bridge: Bridge, message_id: str) -> None:
    """Both flags cleared on the desktop and synced: the starting point of each try."""
    desktop_store(bridge, message_id, "-", b"\\Seen")
    desktop_store(bridge, message_id, "-", b"\\Flagged")
    bridge.sync_ok()
    assert desktop_flags(bridge, message_id) == phone_flags(bridge, message_id) == (False, False)


def commands_of_a_session(bridge: Bridge, proxy: HoldingProxy, prepare: Callable[[], None]) -> int:
    prepare()
    proxy.arm(0, lambda: None)
    bridge.sync_ok()
    return proxy.commands


def test_desktop_read_while_the_sync_flags_the_message_is_kept(
    raced: tuple[Bridge, HoldingProxy, FrameHold],
) -> None:
    """The phone flags M; while the sync carries \\Flagged to the desktop, the user reads
    M in the desktop mail client (at each IMAP command of the session in turn)."""
    bridge, proxy, _hold = raced
    ids = [bridge.deliver(n) for n in range(1, 4)]
    bridge.sync_ok()
    target = ids[-1]

    def phone_flags_it() -> None:
        start_clean(bridge, target)
        bridge.phone("flag", str(bridge.phone_id(target)))

    total = commands_of_a_session(bridge, proxy, phone_flags_it)
    bridge.sync_ok()
    assert total >= 5, f"a session of only {total} IMAP commands?"
    held: list[bytes] = []
    for point in range(1, total + 1):
        phone_flags_it()
        proxy.arm(point, lambda: desktop_store(bridge, target, "+", b"\\Seen"))
        bridge.sync_ok()
        assert proxy.fired.is_set() and proxy.error is None, (point, proxy.error)
        held.append(proxy.held[-1])
        bridge.sync_ok()
        expected = (True, True)
        assert desktop_flags(bridge, target) == expected, f"desktop, read at {held[-1]!r}"
        assert phone_flags(bridge, target) == expected, f"phone, read at {held[-1]!r}"
        bridge.assert_in_sync()
    assert b"UID STORE" in held  # the read landed right before the agent's own flag write


def test_phone_read_while_the_sync_flags_the_message_is_kept(
    raced: tuple[Bridge, HoldingProxy, FrameHold],
) -> None:
    """The desktop flags M; while the sync carries \\Flagged to the phone, the phone user
    reads M (`phone read ID`) at each IMAP command in turn and when the server receives
    the agent's actions."""
    bridge, proxy, hold = raced
    ids = [bridge.deliver(n) for n in range(1, 4)]
    bridge.sync_ok()
    target = ids[-1]
    phone_id = str(bridge.phone_id(target))

    def desktop_flags_it() -> None:
        start_clean(bridge, target)
        desktop_store(bridge, target, "+", b"\\Flagged")

    def phone_reads_it() -> None:
        bridge.phone("read", phone_id)

    def check() -> None:
        bridge.sync_ok()
        assert desktop_flags(bridge, target) == (True, True)
        assert phone_flags(bridge, target) == (True, True)
        bridge.assert_in_sync()

    total = commands_of_a_session(bridge, proxy, desktop_flags_it)
    bridge.sync_ok()
    for point in range(1, total + 1):
        desktop_flags_it()
        proxy.arm(point, phone_reads_it)
        bridge.sync_ok()
        assert proxy.fired.is_set() and proxy.error is None, (point, proxy.error)
        check()
    desktop_flags_it()
    hold.arm("ops", phone_reads_it)
    bridge.sync_ok()
    assert hold.fired.is_set(), "the session sent no actions to the phone"
    check()


def test_phone_unread_and_read_again_after_the_snapshot_wins_over_the_sync(
    raced: tuple[Bridge, HoldingProxy, FrameHold],
) -> None:
    """The same flag on both sides: the desktop marks M unread; after the snapshot the
    phone user marks it unread and read again. The phone's change is the newer one: the
    sync does not undo it, and the next sync carries it to the desktop."""
    bridge, _proxy, hold = raced
    ids = [bridge.deliver(n) for n in range(1, 4)]
    bridge.sync_ok()
    target = ids[-1]
    phone_id = str(bridge.phone_id(target))
    desktop_store(bridge, target, "+", b"\\Seen")
    bridge.sync_ok()
    assert phone_flags(bridge, target) == (True, False)
    desktop_store(bridge, target, "-", b"\\Seen")

    def phone_toggles() -> None:
        bridge.phone("unread", phone_id)
        bridge.phone("read", phone_id)

    hold.arm("ops", phone_toggles)
    bridge.sync_ok()
    assert hold.fired.is_set()
    assert phone_flags(bridge, target) == (True, False)  # the phone's newer read stayed
    bridge.sync_ok()
    assert desktop_flags(bridge, target) == phone_flags(bridge, target) == (True, False)
