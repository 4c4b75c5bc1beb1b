"""An in-memory model of one whole sync session: the reference for the sync invariants.

A :class:`Desktop` (inbox and Trash, each a dict key -> :class:`Msg`, one UID counter), a
:class:`Phone` (inbox, trash, destroy tombstones) and the agent's ledger.
:func:`sync` does what ``agent/session.py`` does, minus the I/O: facts -> ``merge`` ->
apply the desktop actions -> apply the phone actions -> ``normalize`` over the desktop
inbox newest first -> apply its phone actions -> acknowledge (clear) the phone's
tombstones -> return the new ledger.

The apply functions are deliberately literal (an APPEND always adds a copy, a PUT always
adds to the phone inbox), so a wrong plan shows up as a broken invariant instead of being
papered over here. ``crash_after`` stops a session at a step without committing the ledger,
for the crash-and-rerun tests; ``during`` lets users act *inside* a session, between its
steps, as the real session allows: desktop flag writes are conditional on the MODSEQ the
facts were read at (a message changed since is held for the next session), and the phone
keeps a flag its user changed after the snapshot the plan came from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from imapsync_bridge.model import (
    DesktopFact,
    DesktopMessage,
    FlagChange,
    Flags,
    LedgerEntry,
    PhoneFact,
    Where,
)
from imapsync_bridge.sync.breaker import check_mass_delete
from imapsync_bridge.sync.merge import MergePlan, keys_in_scope, merge
from imapsync_bridge.sync.normalize import NormalizePlan, normalize
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DesktopAction,
    DestroyOnDesktop,
    DestroyOnPhone,
    EvictFromPhone,
    MoveOnDesktop,
    MoveOnPhone,
    PhoneAction,
    PutOnPhone,
    SetDesktopFlags,
    SetPhoneFlags,
)

Ledger = dict[str, LedgerEntry]
NO_FLAGS = Flags()
CRASH_POINTS = ("desktop_applied", "merge_applied", "normalize_applied", "acknowledged")
#: Where :func:`sync` lets users act inside a session (``during``).
SESSION_STEPS = ("facts_read", "desktop_applied", "merge_applied", "normalize_applied")


@dataclass
class Msg:
    key: str
    internaldate: datetime
    flags: Flags = Flags()
    uid: int = 0  # desktop only
    modseq: int = 0  # desktop only: bumped by every flag change (CONDSTORE)


@dataclass
class Folders:
    """An inbox and a trash of messages by key: what both sides have in common."""

    inbox: dict[str, Msg] = field(default_factory=dict)
    trash: dict[str, Msg] = field(default_factory=dict)

    def folder(self, where: Where) -> dict[str, Msg]:
        return self.inbox if where is Where.INBOX else self.trash

    def locate(self, key: str) -> tuple[Where, Msg | None]:
        if key in self.inbox:
            return Where.INBOX, self.inbox[key]
        if key in self.trash:
            return Where.TRASH, self.trash[key]
        return Where.GONE, None

    def drop(self, key: str) -> None:
        self.inbox.pop(key, None)
        self.trash.pop(key, None)


@dataclass
class Desktop(Folders):
    next_uid: int = 1
    highest_modseq: int = 0

    def _new_uid(self) -> int:
        self.next_uid += 1
        return self.next_uid - 1

    def deliver(self, key: str, internaldate: datetime, flags: Flags = NO_FLAGS) -> None:
        self.add(Where.INBOX, key, internaldate, flags)

    def add(self, where: Where, key: str, internaldate: datetime, flags: Flags) -> None:
        """APPEND (new mail, or a copy from the phone): always a new copy with a new UID."""
        assert key not in self.folder(where), f"sim: {key} appended twice to {where}"
        self.folder(where)[key] = Msg(key, internaldate, flags, self._new_uid())

    def move(self, key: str, to: Where) -> None:
        """IMAP MOVE: new UID in the target folder, INTERNALDATE and flags kept."""
        where, msg = self.locate(key)
        if msg is None or where is to:
            return
        del self.folder(where)[key]
        self.folder(to)[key] = Msg(key, msg.internaldate, msg.flags, self._new_uid())

    def destroy(self, key: str) -> None:
        self.drop(key)

    def set_flags(self, key: str, flags: Flags) -> None:
        _, msg = self.locate(key)
        if msg is not None and msg.flags != flags:
            msg.flags = flags
            self.highest_modseq += 1
            msg.modseq = self.highest_modseq

    def user_toggle(self, key: str, which: str) -> None:
        """A desktop mail client flips \\Seen or \\Flagged (its own STORE)."""
        _, msg = self.locate(key)
        assert msg is not None
        self.set_flags(key, replace(msg.flags, **{which: not getattr(msg.flags, which)}))

    def newest_first(self) -> list[DesktopMessage]:
        """The inbox newest first by INTERNALDATE, ties: higher UID first."""
        ordered = sorted(self.inbox.values(), key=lambda m: (m.internaldate, m.uid), reverse=True)
        return [DesktopMessage(m.uid, m.key, m.internaldate, 1000, m.flags) for m in ordered]

    def fact(self, key: str) -> DesktopFact:
        where, msg = self.locate(key)
        if msg is None:
            return DesktopFact(Where.GONE)
        return DesktopFact(where, msg.flags, msg.uid, msg.internaldate, msg.modseq)


@dataclass
class Phone(Folders):
    destroyed: set[str] = field(default_factory=set)  # tombstones, until acknowledged
    restored: set[str] = field(default_factory=set)  # user restores, until acknowledged
    action_seq: int = 0  # the phone's action counter (the snapshot's action_seq)
    flag_changed_at: dict[tuple[str, str], int] = field(default_factory=dict)

    def inbox_newest_first(self) -> list[str]:
        return [m.key for m in sorted(self.inbox.values(), key=lambda m: m.internaldate)][::-1]

    # the user's verbs
    def user_move(self, key: str, to: Where) -> None:
        where, msg = self.locate(key)
        assert msg is not None and where is not to
        del self.folder(where)[key]
        self.folder(to)[key] = msg
        if to is Where.INBOX:
            self.restored.add(key)
        self.action_seq += 1
        self.flag_changed_at[(key, "folder")] = self.action_seq

    def user_toggle(self, key: str, which: str) -> None:
        """The phone user flips seen or flagged: a phone action with a new seq."""
        _, msg = self.locate(key)
        assert msg is not None
        msg.flags = replace(msg.flags, **{which: not getattr(msg.flags, which)})
        self.action_seq += 1
        self.flag_changed_at[(key, which)] = self.action_seq

    def changed_since(self, key: str, since: int) -> bool:
        return any(seq > since for (k, _), seq in self.flag_changed_at.items() if k == key)

    def set_flags_unless_changed(self, key: str, change: FlagChange, since: int) -> None:
        """The server's compare-and-set: a flag changed after ``since`` is kept."""
        _, msg = self.locate(key)
        if msg is None:
            return
        for which in ("seen", "flagged"):
            value = getattr(change, which)
            if value is not None and self.flag_changed_at.get((key, which), 0) <= since:
                msg.flags = replace(msg.flags, **{which: value})

    def user_destroy(self, key: str) -> None:
        assert self.locate(key)[1] is not None
        self.drop(key)
        self.destroyed.add(key)

    def facts(self) -> dict[str, PhoneFact]:
        facts = {}
        for where in (Where.INBOX, Where.TRASH):
            for phone_id, msg in enumerate(self.folder(where).values()):
                facts[msg.key] = PhoneFact(
                    where, msg.flags, phone_id, msg.internaldate, restored=msg.key in self.restored
                )
        return facts


# -- the session ----------------------------------------------------------------------


def plan_merge(desktop: Desktop, phone: Phone, ledger: Ledger) -> tuple[MergePlan, set[str]]:
    """Facts exactly as the agent gathers them, then merge. Returns (plan, scope)."""
    plan, facts = plan_with_facts(desktop, phone, ledger)
    return plan, set(facts)


def plan_with_facts(
    desktop: Desktop, phone: Phone, ledger: Ledger
) -> tuple[MergePlan, dict[str, DesktopFact]]:
    phone_now = phone.facts()
    scope = keys_in_scope(ledger, phone_now, phone.destroyed)
    facts = {key: desktop.fact(key) for key in scope}
    return merge(ledger, facts, phone_now, sorted(phone.destroyed)), facts


def apply_desktop(
    desktop: Desktop,
    phone: Phone,
    actions: list[DesktopAction],
    facts: dict[str, DesktopFact] | None = None,
) -> set[str]:
    """Apply the desktop actions; returns the keys whose conditional flag write was
    refused because a user changed the message after ``facts`` were read."""
    changed: set[str] = set()
    for action in actions:
        match action:
            case SetDesktopFlags(key, change):
                _, msg = desktop.locate(key)
                fact = facts.get(key) if facts else None
                unmoved = fact is not None and msg is not None and msg.uid == fact.uid
                if unmoved and fact is not None and msg is not None and msg.modseq != fact.modseq:
                    changed.add(key)  # UNCHANGEDSINCE failed: [MODIFIED uid]
                elif msg is not None:
                    desktop.set_flags(key, change.applied_to(msg.flags))
            case MoveOnDesktop(key, to):
                desktop.move(key, to)
            case DestroyOnDesktop(key):
                desktop.destroy(key)
            case AppendToDesktop(key, flags, to):
                _, copy_on_phone = phone.locate(key)
                assert copy_on_phone is not None, f"sim: append of {key} the phone lacks"
                desktop.add(to, key, copy_on_phone.internaldate, flags)
            case _:
                raise AssertionError(f"unknown desktop action {action!r}")
    return changed


def apply_phone(phone: Phone, actions: list[PhoneAction], since: int | None = None) -> None:
    for action in actions:
        match action:
            case SetPhoneFlags(key, change):
                phone.set_flags_unless_changed(
                    key, change, phone.action_seq if since is None else since
                )
            case MoveOnPhone(key, to):
                where, msg = phone.locate(key)
                if msg is not None and where is not to:
                    del phone.folder(where)[key]
                    phone.folder(to)[key] = msg
            case DestroyOnPhone(key):
                phone.drop(key)
            case EvictFromPhone(key):
                if not phone.changed_since(key, phone.action_seq if since is None else since):
                    phone.inbox.pop(key, None)
            case PutOnPhone(key, _uid, flags, internaldate):
                assert key not in phone.inbox, f"sim: put of {key} already in the phone inbox"
                phone.inbox[key] = Msg(key, internaldate, flags)
            case _:
                raise AssertionError(f"unknown phone action {action!r}")


def plan_normalize(desktop: Desktop, ledger: Ledger, window: int) -> NormalizePlan:
    return normalize(ledger, desktop.newest_first(), window)


def sync(
    desktop: Desktop,
    phone: Phone,
    ledger: Ledger,
    window: int,
    *,
    crash_after: str | None = None,
    mass_delete_share: float | None = None,
    during: Callable[[str], None] | None = None,
) -> Ledger:
    """One session; mutates ``desktop`` and ``phone``, returns the committed ledger.

    With ``crash_after`` (one of CRASH_POINTS) the session stops after that step and
    returns the *old* ledger, as a crash before the ledger commit would leave it.
    ``during(step)`` is called after each of SESSION_STEPS: users acting mid-session.
    """
    assert crash_after in (None, *CRASH_POINTS)

    def step(name: str) -> None:
        if during is not None:
            during(name)

    planned_at = phone.action_seq
    plan, facts = plan_with_facts(desktop, phone, ledger)
    if mass_delete_share is not None:
        check_mass_delete(plan.desktop_deletions, window, mass_delete_share)
    step("facts_read")
    held = apply_desktop(desktop, phone, plan.desktop, facts)
    if crash_after == "desktop_applied":
        return ledger
    step("desktop_applied")
    # A held message keeps its old ledger entry and sits out the rest of the session.
    kept = {k: ledger[k] for k in held if k in ledger}
    apply_phone(phone, [a for a in plan.phone if a.key not in held], planned_at)
    if crash_after == "merge_applied":
        return ledger
    step("merge_applied")
    rest = {k: e for k, e in plan.ledger.items() if k not in held}
    newest = [m for m in desktop.newest_first() if m.key not in held]
    norm = normalize(rest, newest, window)
    apply_phone(phone, norm.phone, planned_at)
    if crash_after == "normalize_applied":
        return ledger
    step("normalize_applied")
    phone.destroyed.clear()  # the agent acknowledged the phone's actions
    phone.restored.clear()
    if crash_after == "acknowledged":
        return ledger
    return {**norm.ledger, **kept}


def ledger_view(ledger: Ledger) -> dict[str, tuple[Where, Where, Flags]]:
    """The ledger without its UID cache (a UID unknown after a move is filled in later)."""
    return {k: (e.desktop, e.phone, e.flags) for k, e in ledger.items()}


def snapshot(desktop: Desktop, phone: Phone, ledger: Ledger) -> tuple:
    """Comparable state of everything (a deep copy)."""
    return copy.deepcopy((desktop, phone, ledger))
