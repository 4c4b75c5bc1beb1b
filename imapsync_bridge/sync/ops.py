"""The actions a sync plans for each side (the patent's action lists), as plain data.

Every action names its message by key and says the state to reach, not a delta, so
applying one twice (a retransmission, a rerun after a crash) changes nothing the second
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from imapsync_bridge.model import FlagChange, Flags, Where


# Actions on the desktop (IMAP) ------------------------------------------------------
@dataclass(frozen=True)
class SetDesktopFlags:
    key: str
    change: FlagChange


@dataclass(frozen=True)
class MoveOnDesktop:
    """Move to Trash (a delete) or back to the inbox (a restore)."""

    key: str
    to: Where  # INBOX or TRASH


@dataclass(frozen=True)
class DestroyOnDesktop:
    """Expunge for good, wherever the message is (inbox or Trash)."""

    key: str


@dataclass(frozen=True)
class AppendToDesktop:
    """Copy the phone's message into the desktop (it has no copy left anywhere)."""

    key: str
    flags: Flags
    to: Where = Where.INBOX


DesktopAction = SetDesktopFlags | MoveOnDesktop | DestroyOnDesktop | AppendToDesktop


# Actions on the phone mailbox (sent to the hosted server) ----------------------------
@dataclass(frozen=True)
class SetPhoneFlags:
    key: str
    change: FlagChange


@dataclass(frozen=True)
class MoveOnPhone:
    key: str
    to: Where  # INBOX or TRASH


@dataclass(frozen=True)
class DestroyOnPhone:
    key: str


@dataclass(frozen=True)
class EvictFromPhone:
    """Normalization: the message fell out of the window. The desktop copy stays."""

    key: str


@dataclass(frozen=True)
class PutOnPhone:
    """Pull: copy a desktop message into a free phone slot."""

    key: str
    uid: int
    flags: Flags
    internaldate: datetime
    size: int = 0


PhoneAction = SetPhoneFlags | MoveOnPhone | DestroyOnPhone | EvictFromPhone | PutOnPhone
