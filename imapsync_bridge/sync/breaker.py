"""The mass-delete breaker: refuse a sync that would delete most of the phone window.

A sync tool that trusts a bad listing (an IMAP server answering with an empty inbox,
state that drifted, a mailbox swapped under it) deletes everything. Before anything is
applied, the agent asks :func:`check_mass_delete`; past the limit it stops and reports.
"""

from __future__ import annotations

import math

from imapsync_bridge.errors import SyncAborted

MIN_DELETIONS_ALLOWED = 3  # small windows: a few deletes at once are always fine


def deletion_limit(window: int, share: float) -> int:
    """The most desktop-side deletions one sync may carry to the phone."""
    return max(math.floor(window * share), MIN_DELETIONS_ALLOWED)


def check_mass_delete(deletions: int, window: int, share: float) -> None:
    limit = deletion_limit(window, share)
    if deletions > limit:
        raise SyncAborted(
            f"mass-delete breaker: this sync would delete {deletions} of the {window} "
            f"phone messages (limit {limit}, mass_delete_share={share}); nothing was "
            "changed. Check the desktop inbox; run `agent sync --allow-mass-delete` if "
            "the deletions are real"
        )
