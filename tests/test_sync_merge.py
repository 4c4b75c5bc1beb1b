"""Table-driven tests of the update-sync merge (patent FIGs. 5-8) and the mass-delete breaker.

Each row of ``ROWS`` is one message in one situation: the ledger entry (what both sides
agreed at the last sync, or None for fresh state), where the desktop has it now, where
the phone has it now (DESTROYED = a tombstone), and the expected result: the exact
desktop actions, the exact phone actions, the ledger entry afterwards (None = dropped)
and whether it counts as a desktop deletion for the breaker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from imapsync_bridge.errors import SyncAborted
from imapsync_bridge.model import DesktopFact, FlagChange, Flags, LedgerEntry, PhoneFact, Where
from imapsync_bridge.sync.breaker import (
    MIN_DELETIONS_ALLOWED,
    check_mass_delete,
    deletion_limit,
)
from imapsync_bridge.sync.merge import keys_in_scope, merge, merge_flags
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DestroyOnDesktop,
    DestroyOnPhone,
    MoveOnDesktop,
    MoveOnPhone,
    SetDesktopFlags,
    SetPhoneFlags,
)

K = "<k@example.org>"
T0 = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)  # the desktop's INTERNALDATE
T_PHONE = datetime(2024, 5, 1, 9, 31, tzinfo=UTC)  # the phone's copy's arrival time

I, T, G, X = Where.INBOX, Where.TRASH, Where.GONE, Where.DESTROYED  # noqa: E741
N = Flags()
S = Flags(seen=True)
F = Flags(flagged=True)
SF = Flags(seen=True, flagged=True)
# What a flag action changes: only the flags that differ on that side.
SEEN_ON, SEEN_OFF = FlagChange(seen=True), FlagChange(seen=False)
FLAG_ON, FLAG_OFF = FlagChange(flagged=True), FlagChange(flagged=False)

UID = 11  # UID in the ledger / where the desktop had it at the last sync
UID2 = 42  # UID after the desktop user moved it (IMAP MOVE gives a new UID)


def L(desktop: Where, phone: Where, flags: Flags = N, uid: int | None = UID) -> LedgerEntry:
    return LedgerEntry(K, desktop, phone, flags, uid, T0)


def D(where: Where, flags: Flags = N, uid: int = UID) -> DesktopFact:
    if where is G:
        return DesktopFact(G)
    return DesktopFact(where, flags, uid, T0)


def P(where: Where, flags: Flags = N, *, restored: bool = False) -> PhoneFact:
    return PhoneFact(where, flags, 7, T_PHONE, restored=restored)


@dataclass(frozen=True)
class Row:
    base: LedgerEntry | None
    desk: DesktopFact
    phone: PhoneFact  # where=DESTROYED: given as a tombstone, not in the snapshot
    desktop_actions: list
    phone_actions: list
    ledger: LedgerEntry | None
    deletions: int = 0


ROWS = {
    # --- one side changed, or neither -------------------------------------------------
    "unchanged-mapped": Row(L(I, I), D(I), P(I), [], [], L(I, I)),
    "unchanged-both-trashed": Row(L(T, T), D(T), P(T), [], [], L(T, T)),
    "desktop-deleted": Row(
        L(I, I), D(T, uid=UID2), P(I), [], [MoveOnPhone(K, T)], L(T, T, uid=UID2), 1
    ),
    "phone-deleted": Row(L(I, I), D(I), P(T), [MoveOnDesktop(K, T)], [], L(T, T, uid=None)),
    "desktop-restored": Row(
        L(T, T), D(I, uid=UID2), P(T), [], [MoveOnPhone(K, I)], L(I, I, uid=UID2)
    ),
    "phone-restored": Row(L(T, T), D(T), P(I), [MoveOnDesktop(K, I)], [], L(I, I, uid=None)),
    "desktop-destroyed-mapped": Row(L(I, I), D(G), P(I), [], [DestroyOnPhone(K)], None, 1),
    "desktop-destroyed-from-trash": Row(L(T, T), D(G), P(T), [], [DestroyOnPhone(K)], None),
    "phone-destroyed-mapped": Row(L(I, I), D(I), P(X), [DestroyOnDesktop(K)], [], None),
    "phone-destroyed-from-trash": Row(L(T, T), D(T), P(X), [DestroyOnDesktop(K)], [], None),
    "both-destroyed": Row(L(I, I), D(G), P(X), [], [], None),
    "both-deleted": Row(L(I, I), D(T, uid=UID2), P(T), [], [], L(T, T, uid=UID2)),
    "both-restored": Row(L(T, T), D(I, uid=UID2), P(I), [], [], L(I, I, uid=UID2)),
    "desktop-seen": Row(L(I, I), D(I, S), P(I), [], [SetPhoneFlags(K, SEEN_ON)], L(I, I, S)),
    "phone-seen": Row(L(I, I), D(I), P(I, S), [SetDesktopFlags(K, SEEN_ON)], [], L(I, I, S)),
    "desktop-unseen": Row(
        L(I, I, S), D(I, N), P(I, S), [], [SetPhoneFlags(K, SEEN_OFF)], L(I, I, N)
    ),
    "phone-unseen": Row(
        L(I, I, S), D(I, S), P(I, N), [SetDesktopFlags(K, SEEN_OFF)], [], L(I, I, N)
    ),
    "desktop-flagged": Row(L(I, I), D(I, F), P(I), [], [SetPhoneFlags(K, FLAG_ON)], L(I, I, F)),
    "phone-flagged": Row(L(I, I), D(I), P(I, F), [SetDesktopFlags(K, FLAG_ON)], [], L(I, I, F)),
    "phone-unflagged": Row(
        L(I, I, F), D(I, F), P(I, N), [SetDesktopFlags(K, FLAG_OFF)], [], L(I, I, N)
    ),
    "flag-in-trash-desktop": Row(
        L(T, T), D(T, S), P(T), [], [SetPhoneFlags(K, SEEN_ON)], L(T, T, S)
    ),
    "flag-in-trash-phone": Row(
        L(T, T), D(T), P(T, F), [SetDesktopFlags(K, FLAG_ON)], [], L(T, T, F)
    ),
    # --- both changed flags: each flag merged on its own ------------------------------
    "desktop-seen-phone-flagged": Row(
        L(I, I),
        D(I, S),
        P(I, F),
        [SetDesktopFlags(K, FLAG_ON)],
        [SetPhoneFlags(K, SEEN_ON)],
        L(I, I, SF),
    ),
    "desktop-unseen-phone-flagged": Row(
        L(I, I, S),
        D(I, N),
        P(I, SF),
        [SetDesktopFlags(K, FLAG_ON)],
        [SetPhoneFlags(K, SEEN_OFF)],
        L(I, I, F),
    ),
    "both-seen": Row(L(I, I), D(I, S), P(I, S), [], [], L(I, I, S)),
    # --- phone no longer holds it, no tombstone: eviction / trash GC, never a delete ---
    "phone-evicted": Row(L(I, I), D(I), P(G), [], [], L(I, G)),
    "phone-evicted-desktop-seen": Row(L(I, I), D(I, S), P(G), [], [], L(I, G, S)),
    "phone-trash-gc": Row(L(T, T), D(T), P(G), [], [], L(T, G)),
    "phone-evicted-desktop-deleted": Row(L(I, I), D(T, uid=UID2), P(G), [], [], L(T, G, uid=UID2)),
    "phone-evicted-desktop-destroyed": Row(L(I, I), D(G), P(G), [], [], None),
    # --- conflicts (DESIGN.md): restore beats delete / destroy, delete beats flags -----
    "restore-beats-destroy-phone-restored": Row(
        L(T, T),
        D(G),
        P(I, S),
        [AppendToDesktop(K, S, I)],
        [],
        LedgerEntry(K, I, I, S, None, T_PHONE),
    ),
    "restore-beats-destroy-desktop-restored": Row(
        L(T, T), D(I, S, uid=UID2), P(X), [], [], LedgerEntry(K, I, G, S, UID2, T0)
    ),
    "restore-beats-delete-both-moved": Row(
        # a base whose sides disagree (left by a partial earlier run); both moved
        LedgerEntry(K, T, I, N, UID, T0),
        D(I, uid=UID2),
        P(T),
        [],
        [MoveOnPhone(K, I)],
        L(I, I, uid=UID2),
    ),
    "restore-beats-delete-rehold-after-eviction": Row(
        # no common past on the phone side (ledger: evicted): inbox wins over trash
        L(I, G),
        D(I),
        P(T),
        [],
        [MoveOnPhone(K, I)],
        L(I, I),
    ),
    "desktop-delete-beats-phone-seen": Row(
        L(I, I),
        D(T, uid=UID2),
        P(I, S),
        [SetDesktopFlags(K, SEEN_ON)],
        [MoveOnPhone(K, T)],
        L(T, T, S, uid=UID2),
        1,
    ),
    "phone-delete-beats-desktop-flagged": Row(
        # the desktop's \Flagged goes with the message into the phone trash
        L(I, I),
        D(I, F),
        P(T),
        [MoveOnDesktop(K, T)],
        [SetPhoneFlags(K, FLAG_ON)],
        L(T, T, F, uid=None),
    ),
    "desktop-destroy-beats-phone-seen": Row(
        L(I, I), D(G), P(I, S), [], [DestroyOnPhone(K)], None, 1
    ),
    "desktop-destroy-beats-phone-delete": Row(
        L(I, I), D(G), P(T), [], [DestroyOnPhone(K)], None, 1
    ),
    "phone-destroy-beats-desktop-seen": Row(
        L(I, I), D(I, S), P(X), [DestroyOnDesktop(K)], [], None
    ),
    "phone-destroy-beats-desktop-delete": Row(
        L(I, I), D(T, uid=UID2), P(X), [DestroyOnDesktop(K)], [], None
    ),
    # --- the phone restored since the last sync, though its net location may not show it
    "phone-delete-restore-beats-desktop-delete": Row(
        L(I, I), D(T, uid=UID2), P(I, restored=True), [MoveOnDesktop(K, I)], [], L(I, I, uid=None)
    ),
    "phone-restore-redelete-desktop-unchanged": Row(
        L(T, T), D(T), P(T, restored=True), [], [], L(T, T)
    ),
    "phone-restore-redelete-vs-desktop-restore": Row(
        L(T, T), D(I, uid=UID2), P(T, restored=True), [], [MoveOnPhone(K, I)], L(I, I, uid=UID2)
    ),
    "phone-restored-flag-no-change": Row(L(I, I), D(I), P(I, restored=True), [], [], L(I, I)),
    # --- fresh state: no ledger entry (first pairing, reset, lost agent state) ---------
    "fresh-both-hold-seen-set-beats-unset": Row(
        None, D(I), P(I, S), [SetDesktopFlags(K, SEEN_ON)], [], L(I, I, S)
    ),
    "fresh-both-hold-desktop-seen-phone-flagged": Row(
        None,
        D(I, S),
        P(I, F),
        [SetDesktopFlags(K, FLAG_ON)],
        [SetPhoneFlags(K, SEEN_ON)],
        L(I, I, SF),
    ),
    "fresh-desktop-lacks-phone-inbox": Row(
        None, D(G), P(I, S), [AppendToDesktop(K, S, I)], [], LedgerEntry(K, I, I, S, None, T_PHONE)
    ),
    "fresh-desktop-lacks-phone-trash": Row(
        None, D(G), P(T, F), [AppendToDesktop(K, F, T)], [], LedgerEntry(K, T, T, F, None, T_PHONE)
    ),
    "fresh-restore-beats-delete-desktop-trash": Row(
        None, D(T), P(I), [MoveOnDesktop(K, I)], [], L(I, I, uid=None)
    ),
    "fresh-restore-beats-delete-phone-trash": Row(
        None, D(I), P(T), [], [MoveOnPhone(K, I)], L(I, I)
    ),
    "fresh-both-trash": Row(None, D(T), P(T), [], [], L(T, T)),
    "fresh-phone-tombstone": Row(None, D(I), P(X), [DestroyOnDesktop(K)], [], None),
    "fresh-phone-tombstone-desktop-lacks": Row(None, D(G), P(X), [], [], None),
    "fresh-phone-lost-everything": Row(
        # the phone mailbox was reset: every held message reads GONE, which is no delete
        L(I, I, SF),
        D(I, SF),
        P(G),
        [],
        [],
        L(I, G, SF),
    ),
}


def _run(row: Row):
    ledger = {} if row.base is None else {K: row.base}
    if row.phone.where is X:
        return merge(ledger, {K: row.desk}, {}, [K])
    phone = {} if row.phone.where is G else {K: row.phone}
    return merge(ledger, {K: row.desk}, phone)


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_merge_one_message(row: Row) -> None:
    plan = _run(row)
    assert plan.desktop == row.desktop_actions
    assert plan.phone == row.phone_actions
    assert plan.ledger.get(K) == row.ledger
    assert set(plan.ledger) <= {K}
    assert plan.desktop_deletions == row.deletions


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_merge_result_is_stable(row: Row) -> None:
    """Once both sides are as planned, merging again from the new ledger plans nothing."""
    plan = _run(row)
    entry = plan.ledger.get(K)
    if entry is None or entry.phone is G:
        return  # out of scope next time
    desk = D(entry.desktop, entry.flags, uid=entry.uid or 99)
    again = merge(plan.ledger, {K: desk}, {K: P(entry.phone, entry.flags)})
    assert again.desktop == [] and again.phone == []
    assert again.ledger[K].desktop is entry.desktop and again.ledger[K].flags == entry.flags


def test_phone_delete_then_restore_beats_desktop_destroy() -> None:
    """Restore beats destroy, with "restore" as 199c1c1 defines it for restore-vs-delete.

    Mapped K; the phone user deletes K and restores it (net: inbox, restored=True); the
    desktop user destroys K. Against a desktop *delete* the restore wins (row
    phone-delete-restore-beats-desktop-delete); against a destroy merge plans
    DestroyOnPhone and K is gone everywhere, although the phone user asked to keep it.
    """
    plan = merge({K: L(I, I)}, {K: D(G)}, {K: P(I, restored=True)})
    assert plan.phone == []
    assert plan.desktop == [AppendToDesktop(K, N, I)]
    assert plan.ledger[K] == LedgerEntry(K, I, I, N, None, T_PHONE)
    assert plan.desktop_deletions == 0


# --- merge_flags ----------------------------------------------------------------------
FLAG_ROWS = [
    # base, desktop, phone, expected
    pytest.param(None, N, S, S, id="no-base-seen-set-beats-unset"),
    pytest.param(None, F, N, F, id="no-base-flagged-set-beats-unset"),
    pytest.param(None, S, F, SF, id="no-base-union"),
    pytest.param(N, N, N, N, id="unchanged"),
    pytest.param(S, N, S, N, id="desktop-unset-wins-over-unchanged"),
    pytest.param(S, S, N, N, id="phone-unset-wins-over-unchanged"),
    pytest.param(N, S, F, SF, id="independent-flags"),
    pytest.param(SF, N, SF, N, id="desktop-cleared-both"),
]


@pytest.mark.parametrize("base,desk,phone,expected", FLAG_ROWS)
def test_merge_flags(base, desk, phone, expected) -> None:
    assert merge_flags(base, desk, phone) == expected


# --- scope, missing facts, many messages -------------------------------------------------
def _entry(key: str, desktop: Where, phone: Where) -> LedgerEntry:
    return LedgerEntry(key, desktop, phone, N, 1, T0)


SCOPE_ROWS = [
    pytest.param({}, {}, set(), id="empty"),
    pytest.param({"a": _entry("a", I, I)}, {}, {"a"}, id="mapped-but-phone-lost-it"),
    pytest.param({"a": _entry("a", T, T)}, {}, {"a"}, id="in-phone-trash"),
    pytest.param({"a": _entry("a", I, G)}, {}, set(), id="evicted-out-of-scope"),
    pytest.param({"a": _entry("a", T, G)}, {}, set(), id="phone-trash-gc-out-of-scope"),
    pytest.param({}, {"b": P(I)}, {"b"}, id="phone-only"),
    pytest.param({"a": _entry("a", I, G)}, {"a": P(I)}, {"a"}, id="evicted-but-phone-holds"),
    pytest.param(
        {"a": _entry("a", I, I), "b": _entry("b", I, G), "c": _entry("c", T, T)},
        {"d": P(T)},
        {"a", "c", "d"},
        id="mixed",
    ),
]


@pytest.mark.parametrize("ledger,phone,expected", SCOPE_ROWS)
def test_keys_in_scope(ledger, phone, expected) -> None:
    assert keys_in_scope(ledger, phone) == expected


def test_missing_desktop_fact_is_an_error() -> None:
    with pytest.raises(ValueError, match="no desktop fact for 1 message"):
        merge({K: L(I, I)}, {}, {K: P(I)})


def test_missing_desktop_fact_for_phone_only_message() -> None:
    with pytest.raises(ValueError, match="no desktop fact for 2 message"):
        merge({}, {}, {"a": P(I), "b": P(T)})


def test_missing_desktop_fact_for_a_tombstone() -> None:
    with pytest.raises(ValueError, match="no desktop fact"):
        merge({}, {}, {}, destroyed_on_phone=[K])


def test_out_of_scope_entries_need_no_fact_and_carry_over() -> None:
    evicted = LedgerEntry("e", I, G, S, 3, T0)
    gc = LedgerEntry("g", T, G, N, 4, T0)
    plan = merge({"e": evicted, "g": gc}, {}, {})
    assert plan.desktop == [] and plan.phone == []
    assert plan.ledger == {"e": evicted, "g": gc}


def test_tombstone_ignored_when_snapshot_still_holds_the_message() -> None:
    plan = merge({K: L(I, I)}, {K: D(I)}, {K: P(I)}, destroyed_on_phone=[K])
    assert plan.desktop == [] and plan.phone == []
    assert plan.ledger[K] == L(I, I)


def test_desktop_deletions_counts_only_mapped_messages_the_desktop_removed() -> None:
    ledger = {
        "del1": _entry("del1", I, I),
        "del2": _entry("del2", I, I),
        "gone": _entry("gone", I, I),
        "trash-destroyed": _entry("trash-destroyed", T, T),
        "phone-del": _entry("phone-del", I, I),
        "both-del": _entry("both-del", I, I),
        "evicted-destroyed": _entry("evicted-destroyed", I, G),
        "phone-destroyed": _entry("phone-destroyed", I, I),
        "kept": _entry("kept", I, I),
    }
    desktop = {
        "del1": D(T),
        "del2": D(T),
        "gone": D(G),
        "trash-destroyed": D(G),
        "phone-del": D(I),
        "both-del": D(T),
        "phone-destroyed": D(I),
        "kept": D(I),
    }
    phone = {
        "del1": P(I),
        "del2": P(I),
        "gone": P(I),
        "trash-destroyed": P(T),
        "phone-del": P(T),
        "both-del": P(T),
        "kept": P(I),
    }
    plan = merge(ledger, desktop, phone, ["phone-destroyed"])
    assert plan.desktop_deletions == 3
    assert sorted(plan.phone, key=lambda a: a.key) == [
        MoveOnPhone("del1", T),
        MoveOnPhone("del2", T),
        DestroyOnPhone("gone"),
        DestroyOnPhone("trash-destroyed"),
    ]
    assert plan.desktop == [MoveOnDesktop("phone-del", T), DestroyOnDesktop("phone-destroyed")]
    assert plan.ledger["evicted-destroyed"] == ledger["evicted-destroyed"]


def test_actions_come_in_key_order() -> None:
    keys = ["<c@x>", "<a@x>", "<b@x>"]
    ledger = {k: LedgerEntry(k, I, I, N, 1, T0) for k in keys}
    plan = merge(ledger, {k: D(T) for k in keys}, {k: P(I) for k in keys})
    assert [a.key for a in plan.phone] == sorted(keys)


# --- the mass-delete breaker ----------------------------------------------------------
LIMIT_ROWS = [
    # window, share, limit
    pytest.param(6, 0.5, 3, id="w6-half"),
    pytest.param(20, 0.5, 10, id="w20-half"),
    pytest.param(21, 0.5, 10, id="w21-half-floors"),
    pytest.param(100, 0.25, 25, id="w100-quarter"),
    pytest.param(10, 0.25, MIN_DELETIONS_ALLOWED, id="w10-quarter-floor-is-min"),
    pytest.param(1, 0.5, MIN_DELETIONS_ALLOWED, id="tiny-window-min"),
    pytest.param(50, 0.0, MIN_DELETIONS_ALLOWED, id="share-zero-min"),
    pytest.param(8, 1.0, 8, id="share-one-whole-window"),
]


@pytest.mark.parametrize("window,share,limit", LIMIT_ROWS)
def test_deletion_limit(window: int, share: float, limit: int) -> None:
    assert deletion_limit(window, share) == limit


BREAKER_ROWS = [
    # deletions, window, share, trips
    pytest.param(0, 6, 0.5, False, id="none"),
    pytest.param(3, 6, 0.5, False, id="at-limit"),
    pytest.param(4, 6, 0.5, True, id="over-limit"),
    pytest.param(3, 1, 0.5, False, id="small-window-min-allowed"),
    pytest.param(4, 1, 0.5, True, id="small-window-over-min"),
    pytest.param(10, 20, 0.5, False, id="w20-at-limit"),
    pytest.param(11, 20, 0.5, True, id="w20-over"),
]


@pytest.mark.parametrize("deletions,window,share,trips", BREAKER_ROWS)
def test_check_mass_delete(deletions: int, window: int, share: float, trips: bool) -> None:
    if trips:
        with pytest.raises(SyncAborted, match=f"delete {deletions} of the {window}"):
            check_mass_delete(deletions, window, share)
    else:
        check_mass_delete(deletions, window, share)


def test_breaker_fed_by_merge() -> None:
    """Emptying the desktop inbox under a mapped window of 6 trips the breaker."""
    keys = [f"<{i}@x>" for i in range(6)]
    ledger = {k: LedgerEntry(k, I, I, N, 1, T0) for k in keys}
    plan = merge(ledger, {k: D(G) for k in keys}, {k: P(I) for k in keys})
    assert plan.desktop_deletions == 6
    with pytest.raises(SyncAborted):
        check_mass_delete(plan.desktop_deletions, 6, 0.5)
