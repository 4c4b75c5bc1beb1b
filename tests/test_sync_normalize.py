"""Normalize and pull (patent FIGs. 9-10), and the patent's worked example as a table.

EP 1 014 629, paragraphs 75-84, walks a 15-slot computer inbox and a 6-slot phone
through a few days of mail. We rebuild its spirit: messages are numbered 1..n in arrival
order (higher = newer), the phone window is 6, and each row is one step (a user action
on one side, then a whole sync through :mod:`sync_sim`) with the phone inbox
expected afterwards, newest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sync_sim import Desktop, Phone, ledger_view, sync

from imapsync_bridge.model import DesktopMessage, Flags, LedgerEntry, Where
from imapsync_bridge.sync.normalize import normalize, window_of
from imapsync_bridge.sync.ops import EvictFromPhone, PutOnPhone

T0 = datetime(2024, 3, 4, 8, 0, tzinfo=UTC)
WINDOW = 6
N = Flags()
S = Flags(seen=True)
F = Flags(flagged=True)


def key(n: int) -> str:
    return f"<msg{n}@corp.example>"


def num(k: str) -> int:
    return int(k.removeprefix("<msg").removesuffix("@corp.example>"))


def date(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


# --- the worked example -----------------------------------------------------------------
@dataclass
class World:
    desktop: Desktop = field(default_factory=Desktop)
    phone: Phone = field(default_factory=Phone)
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    destroyed: set[int] = field(default_factory=set)  # by a user, on either side


def new_mail(*numbers: int) -> Callable[[World], None]:
    def step(w: World) -> None:
        for n in numbers:
            w.desktop.deliver(key(n), date(n))

    return step


def phone_moves(n: int, to: Where) -> Callable[[World], None]:
    return lambda w: w.phone.user_move(key(n), to)


def desktop_moves(n: int, to: Where) -> Callable[[World], None]:
    return lambda w: w.desktop.move(key(n), to)


def desktop_flags(n: int, flags: Flags) -> Callable[[World], None]:
    return lambda w: w.desktop.set_flags(key(n), flags)


def phone_flags(n: int, flags: Flags) -> Callable[[World], None]:
    def step(w: World) -> None:
        w.phone.locate(key(n))[1].flags = flags

    return step


def phone_destroys(n: int) -> Callable[[World], None]:
    def step(w: World) -> None:
        w.phone.user_destroy(key(n))
        w.destroyed.add(n)

    return step


def desktop_destroys(n: int) -> Callable[[World], None]:
    def step(w: World) -> None:
        w.desktop.destroy(key(n))
        w.destroyed.add(n)

    return step


@dataclass(frozen=True)
class Step:
    do: Callable[[World], None]
    phone_inbox: list[int]  # newest first
    phone_trash: set[int] = frozenset()
    desktop_trash: set[int] = frozenset()
    phone_seen: set[int] = frozenset()  # of the phone inbox
    phone_flagged: set[int] = frozenset()
    desktop_seen: set[int] = frozenset()  # of the desktop inbox


STEPS: dict[str, Step] = {
    "initial-sync-pulls-newest-6": Step(new_mail(*range(1, 16)), [15, 14, 13, 12, 11, 10]),
    "new-mail-evicts-oldest-not-deletes": Step(new_mail(16), [16, 15, 14, 13, 12, 11]),
    "phone-deletes-desktop-trashes-and-slot-refills": Step(
        phone_moves(13, Where.TRASH), [16, 15, 14, 12, 11, 10], {13}, {13}
    ),
    "desktop-reads-phone-sees-read": Step(
        desktop_flags(15, S),
        [16, 15, 14, 12, 11, 10],
        {13},
        {13},
        phone_seen={15},
        desktop_seen={15},
    ),
    "phone-restores-into-window": Step(
        phone_moves(13, Where.INBOX),
        [16, 15, 14, 13, 12, 11],
        phone_seen={15},
        desktop_seen={15},
    ),
    "desktop-deletes-phone-trashes": Step(
        desktop_moves(16, Where.TRASH),
        [15, 14, 13, 12, 11, 10],
        {16},
        {16},
        phone_seen={15},
        desktop_seen={15},
    ),
    "phone-deletes-again": Step(
        phone_moves(11, Where.TRASH),
        [15, 14, 13, 12, 10, 9],
        {16, 11},
        {16, 11},
        phone_seen={15},
        desktop_seen={15},
    ),
    "phone-restores-newest": Step(
        phone_moves(16, Where.INBOX),
        [16, 15, 14, 13, 12, 10],
        {11},
        {11},
        phone_seen={15},
        desktop_seen={15},
    ),
    "two-new-mails": Step(
        new_mail(17, 18),
        [18, 17, 16, 15, 14, 13],
        {11},
        {11},
        phone_seen={15},
        desktop_seen={15},
    ),
    "phone-restores-old-one-outside-window": Step(
        # back in the desktop inbox, but not among the newest 6: not in the phone inbox
        phone_moves(11, Where.INBOX),
        [18, 17, 16, 15, 14, 13],
        phone_seen={15},
        desktop_seen={15},
    ),
    "phone-reads-desktop-sees-read": Step(
        phone_flags(18, S),
        [18, 17, 16, 15, 14, 13],
        phone_seen={15, 18},
        desktop_seen={15, 18},
    ),
    "desktop-flags": Step(
        desktop_flags(14, F),
        [18, 17, 16, 15, 14, 13],
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "phone-destroys-desktop-expunges": Step(
        phone_destroys(17),
        [18, 16, 15, 14, 13, 12],
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "desktop-destroys-phone-drops-and-refills": Step(
        desktop_destroys(12),
        [18, 16, 15, 14, 13, 11],
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "desktop-deletes-never-pulled-message": Step(
        desktop_moves(5, Where.TRASH),
        [18, 16, 15, 14, 13, 11],
        desktop_trash={5},
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "desktop-restores-outside-window": Step(
        desktop_moves(5, Where.INBOX),
        [18, 16, 15, 14, 13, 11],
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "desktop-deletes-newest": Step(
        desktop_moves(18, Where.TRASH),
        [16, 15, 14, 13, 11, 10],
        {18},
        {18},
        phone_seen={15},
        phone_flagged={14},
        desktop_seen={15},
    ),
    "desktop-restores-into-window-flags-kept": Step(
        desktop_moves(18, Where.INBOX),
        [18, 16, 15, 14, 13, 11],
        phone_seen={15, 18},
        phone_flagged={14},
        desktop_seen={15, 18},
    ),
    "burst-of-new-mail-evicts-whole-window": Step(
        new_mail(19, 20, 21, 22, 23, 24, 25),
        [25, 24, 23, 22, 21, 20],
        desktop_seen={15, 18},
    ),
}


def _nums(keys) -> set[int]:
    return {num(k) for k in keys}


@pytest.mark.parametrize("upto", range(len(STEPS)), ids=list(STEPS))
def test_patent_worked_example(upto: int) -> None:
    w = World()
    steps = list(STEPS.values())
    for step in steps[: upto + 1]:
        step.do(w)
        w.ledger = sync(w.desktop, w.phone, w.ledger, WINDOW)
    row = steps[upto]

    assert [num(k) for k in w.phone.inbox_newest_first()] == row.phone_inbox
    assert _nums(w.phone.trash) == set(row.phone_trash)
    assert _nums(w.desktop.trash) == set(row.desktop_trash)
    assert {num(k) for k, m in w.phone.inbox.items() if m.flags.seen} == set(row.phone_seen)
    assert {num(k) for k, m in w.phone.inbox.items() if m.flags.flagged} == set(row.phone_flagged)
    assert {num(k) for k, m in w.desktop.inbox.items() if m.flags.seen} == set(row.desktop_seen)
    # eviction never touches the desktop: everything not destroyed is still there
    everything = set(range(1, max(_nums(w.desktop.inbox) | _nums(w.desktop.trash)) + 1))
    assert _nums(w.desktop.inbox) | _nums(w.desktop.trash) == everything - w.destroyed
    # the phone window is mapped; what fell out of it is remembered as evicted
    for k, entry in w.ledger.items():
        if k in w.phone.inbox:
            assert entry.state == "mapped"
        elif k in w.desktop.inbox:
            assert entry.state == "evicted"
    # and a second sync right away has nothing to do
    before = (dict(w.phone.inbox), dict(w.phone.trash))
    assert ledger_view(sync(w.desktop, w.phone, w.ledger, WINDOW)) == ledger_view(w.ledger)
    assert (w.phone.inbox, w.phone.trash) == before


def test_initial_sync_puts_newest_first() -> None:
    desktop = Desktop()
    for n in range(1, 16):
        desktop.deliver(key(n), date(n))
    plan = normalize({}, desktop.newest_first(), WINDOW)
    assert all(isinstance(a, PutOnPhone) for a in plan.phone)
    assert [num(a.key) for a in plan.phone] == [15, 14, 13, 12, 11, 10]
    assert [a.internaldate for a in plan.phone] == [date(n) for n in (15, 14, 13, 12, 11, 10)]
    assert {num(k) for k, e in plan.ledger.items()} == {10, 11, 12, 13, 14, 15}


# --- normalize / window_of units -----------------------------------------------------
def dm(n: int, uid: int | None = None, flags: Flags = N, *, k: str | None = None) -> DesktopMessage:
    return DesktopMessage(uid if uid is not None else n, k or key(n), date(n), 100, flags)


def mapped(n: int, uid: int | None = None, flags: Flags = N) -> LedgerEntry:
    return LedgerEntry(
        key(n), Where.INBOX, Where.INBOX, flags, uid if uid is not None else n, date(n)
    )


WINDOW_ROWS = [
    pytest.param([dm(3), dm(2), dm(1)], 2, [3, 2], id="newest-n"),
    pytest.param([dm(3), dm(2)], 5, [3, 2], id="fewer-than-window"),
    pytest.param([], 4, [], id="empty-inbox"),
    pytest.param([dm(3), dm(2), dm(1)], 1, [3], id="window-one"),
    pytest.param(
        [dm(5, uid=50), dm(5, uid=49), dm(4), dm(3)], 3, [5, 4, 3], id="copies-count-once"
    ),
    pytest.param([dm(5), dm(4), dm(5, uid=1), dm(3)], 3, [5, 4, 3], id="later-copy-skipped"),
]


@pytest.mark.parametrize("newest,size,expected", WINDOW_ROWS)
def test_window_of(newest, size, expected) -> None:
    assert [num(m.key) for m in window_of(newest, size)] == expected


def test_window_of_keeps_the_first_copy() -> None:
    win = window_of([dm(5, uid=50), dm(5, uid=49)], 3)
    assert [m.uid for m in win] == [50]


def test_window_of_zero_is_empty() -> None:
    """Regression: window_of(..., 0) returned the whole inbox (size checked after append)."""
    assert window_of([dm(3), dm(2), dm(1)], 0) == []


def test_evictions_come_before_puts_and_puts_are_newest_first() -> None:
    ledger = {key(n): mapped(n) for n in (4, 3, 2)}
    newest = [dm(n) for n in (9, 8, 7, 4, 3, 2)]
    plan = normalize(ledger, newest, 4)
    kinds = [type(a) for a in plan.phone]
    assert kinds == [EvictFromPhone, EvictFromPhone, PutOnPhone, PutOnPhone, PutOnPhone]
    assert {num(a.key) for a in plan.phone[:2]} == {3, 2}
    assert [num(a.key) for a in plan.phone[2:]] == [9, 8, 7]
    assert plan.ledger[key(3)].phone is Where.GONE and plan.ledger[key(3)].desktop is Where.INBOX
    assert plan.ledger[key(3)].state == "evicted"
    assert plan.ledger[key(9)] == LedgerEntry(key(9), Where.INBOX, Where.INBOX, N, 9, date(9))


def test_mapped_window_message_gets_uid_updated_and_is_not_reput() -> None:
    entry = LedgerEntry(key(5), Where.INBOX, Where.INBOX, S, None, None)  # uid forgotten
    plan = normalize({key(5): entry}, [dm(5, uid=77, flags=N)], 3)
    assert plan.phone == []
    assert plan.ledger[key(5)] == LedgerEntry(key(5), Where.INBOX, Where.INBOX, S, 77, date(5))


def test_evicted_message_back_in_window_is_put_again_with_current_flags() -> None:
    entry = LedgerEntry(key(5), Where.INBOX, Where.GONE, N, 5, date(5))
    plan = normalize({key(5): entry}, [dm(5, flags=S)], 3)
    assert plan.phone == [PutOnPhone(key(5), 5, S, date(5), 100)]
    assert plan.ledger[key(5)].state == "mapped" and plan.ledger[key(5)].flags == S


def test_normalize_leaves_trash_and_evicted_entries_alone() -> None:
    trashed = LedgerEntry(key(1), Where.TRASH, Where.TRASH, N, 1, date(1))
    evicted = LedgerEntry(key(2), Where.INBOX, Where.GONE, N, 2, date(2))
    plan = normalize({key(1): trashed, key(2): evicted}, [dm(3)], 1)
    assert plan.phone == [PutOnPhone(key(3), 3, N, date(3), 100)]
    assert plan.ledger[key(1)] == trashed and plan.ledger[key(2)] == evicted


def test_normalize_is_a_fixed_point() -> None:
    newest = [dm(n) for n in range(10, 0, -1)]
    first = normalize({}, newest, 4)
    again = normalize(first.ledger, newest, 4)
    assert again.phone == [] and again.ledger == first.ledger


def test_normalize_with_duplicate_copies_puts_one() -> None:
    newest = [dm(5, uid=50), dm(5, uid=49), dm(4)]
    plan = normalize({}, newest, 2)
    assert [(num(a.key), a.uid) for a in plan.phone] == [(5, 50), (4, 4)]
