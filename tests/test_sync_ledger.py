"""The ledger stays bounded without forgetting anything the sync still needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from imapsync_bridge.model import Flags, LedgerEntry, Where
from imapsync_bridge.sync.ledger import prune

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def entry(n: int, desktop: Where, phone: Where) -> LedgerEntry:
    return LedgerEntry(f"<m{n}@x>", desktop, phone, Flags(), n, T0 + timedelta(minutes=n))


@pytest.mark.parametrize("keep", [0, 1, 3, 100])
def test_entries_the_phone_holds_are_always_kept(keep: int) -> None:
    held = [entry(1, Where.INBOX, Where.INBOX), entry(2, Where.TRASH, Where.TRASH)]
    ledger = {e.key: e for e in held}
    ledger |= {e.key: e for e in (entry(n, Where.INBOX, Where.GONE) for n in range(10, 20))}
    pruned = prune(ledger, keep)
    assert "<m1@x>" in pruned and "<m2@x>" in pruned
    gone = sorted((e for e in pruned.values() if e.phone is Where.GONE), key=lambda e: e.uid or 0)
    assert [e.uid for e in gone] == list(range(10, 20))[len(range(10, 20)) - min(keep, 10) :]


def test_pruning_changes_nothing_under_the_limit() -> None:
    ledger = {e.key: e for e in (entry(n, Where.INBOX, Where.GONE) for n in range(5))}
    assert prune(ledger, 5) == ledger
