"""Keeping the ledger bounded.

Every message that falls out of the window leaves an *evicted* entry, and every message
deleted long ago a *trashed* one whose phone copy the phone's trash has dropped. Entries
the phone no longer holds are out of the sync's scope (see :func:`merge.keys_in_scope`):
nothing the desktop does to them can change the phone. Kept forever they would grow the
ledger by one row per message received; the newest of them are kept as the record
`agent status` and a reader of the state can consult, the rest are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from imapsync_bridge.model import LedgerEntry, Where

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
