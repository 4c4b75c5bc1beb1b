"""Normalize and pull (patent FIGs. 9-10): make the phone inbox the desktop's newest N.

Normalization *evicts* what fell out of the window: the phone drops its copy and the
ledger remembers the message as evicted, so the next sync cannot mistake it for a delete;
the desktop is never touched. Pull fills the free slots with the newest unmapped desktop
messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace

from imapsync_bridge.model import DesktopMessage, LedgerEntry, Where
from imapsync_bridge.sync.ops import EvictFromPhone, PhoneAction, PutOnPhone


@dataclass
class NormalizePlan:
    phone: list[PhoneAction] = field(default_factory=list)
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)


def window_of(
    newest_first: Sequence[DesktopMessage], size: int, skip: Set[str] = frozenset()
) -> list[DesktopMessage]:
    """The newest ``size`` distinct messages not in ``skip`` (copies of a key count once)."""
    window: list[DesktopMessage] = []
    seen: set[str] = set()
    if size <= 0:
        return window
    for message in newest_first:
        if message.key in seen or message.key in skip:
            continue
        seen.add(message.key)
        window.append(message)
        if len(window) == size:
            break
    return window


def normalize(
    ledger: Mapping[str, LedgerEntry], newest_first: Sequence[DesktopMessage], size: int
) -> NormalizePlan:
    """Plan evictions, then pulls (newest first), so the phone inbox equals the window.

    ``newest_first`` is the desktop inbox newest first (at least its first ``size``
    distinct messages; quarantined ones already left out).
    """
    window = window_of(newest_first, size)
    in_window = {message.key for message in window}
    plan = NormalizePlan(ledger=dict(ledger))

    for key, entry in ledger.items():
        if entry.phone is Where.INBOX and key not in in_window:
            plan.phone.append(EvictFromPhone(key))
            plan.ledger[key] = replace(entry, phone=Where.GONE)

    for message in window:
        mapped = plan.ledger.get(message.key)
        if mapped is not None and mapped.phone is Where.INBOX:
            plan.ledger[message.key] = replace(
                mapped, desktop=Where.INBOX, uid=message.uid, internaldate=message.internaldate
            )
            continue
        plan.phone.append(
            PutOnPhone(message.key, message.uid, message.flags, message.internaldate, message.size)
        )
        plan.ledger[message.key] = LedgerEntry(
            message.key,
            Where.INBOX,
            Where.INBOX,
            message.flags,
            message.uid,
            message.internaldate,
        )
    return plan
