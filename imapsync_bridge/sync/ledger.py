"""Keeping the ledger bounded, and bringing it up to date after a session that died.


Every message that falls out of the window leaves an *evicted* entry, and every message
deleted long ago a *trashed* one whose phone copy the phone's trash has dropped. Entries
the phone no longer holds are out of the sync's scope (see :func:`merge.keys_in_scope`):
nothing the desktop does to them can change the phone. Kept forever they would grow the
ledger by one row per message received; the newest of them are kept as the record
`agent status` and a reader of the state can consult, the rest are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from imapsync_bridge.model import LedgerEntry, Where
from imapsync_bridge.sync.ops import (
    DestroyOnPhone,
    EvictFromPhone,
    MoveOnPhone,
    PhoneAction,
    PutOnPhone,
    SetPhoneFlags,
)

_OLDEST = datetime.min.replace(tzinfo=UTC)


def prune(ledger: Mapping[str, LedgerEntry], keep: int) -> dict[str, LedgerEntry]:
    """The ledger with at most ``keep`` out-of-scope entries (the newest by date)."""
    held = {key: entry for key, entry in ledger.items() if entry.phone is not Where.GONE}
    out_of_scope = sorted(
        (entry for entry in ledger.values() if entry.phone is Where.GONE),
        key=lambda entry: (entry.internaldate or _OLDEST, entry.key),
        reverse=True,
    )
    held.update((entry.key, entry) for entry in out_of_scope[: max(keep, 0)])
    return held


def roll_forward(
    ledger: Mapping[str, LedgerEntry], applied: Iterable[PhoneAction]
) -> dict[str, LedgerEntry]:
    """The ledger after phone actions a session sent, and the server applied, before it
    died without committing (its journal says which).

    Each such action carried the desktop's state to the phone, so afterwards both sides
    agree on it; without this the next session would read the phone's new state as a
    change made by its user — a message pulled just before the crash and then deleted on
    the desktop would come back to the desktop inbox.
    """
    out = dict(ledger)
    for action in applied:
        entry = out.get(action.key)
        if isinstance(action, PutOnPhone):
            out[action.key] = LedgerEntry(
                action.key, Where.INBOX, Where.INBOX, action.flags, action.uid or None,
                action.internaldate,
            )  # fmt: skip
        elif entry is None:
            continue  # nothing agreed on it before: the next merge starts from the facts
        elif isinstance(action, SetPhoneFlags):
            out[action.key] = replace(entry, flags=action.change.applied_to(entry.flags))
        elif isinstance(action, MoveOnPhone):
            out[action.key] = replace(entry, desktop=action.to, phone=action.to)
        elif isinstance(action, EvictFromPhone):
            out[action.key] = replace(entry, phone=Where.GONE)
        elif isinstance(action, DestroyOnPhone):
            del out[action.key]
    return out
