"""An in-memory model of the desktop and the phone that drives the real session flow.

A :class:`Desktop` (inbox and Trash, each a dict key -> :class:`Msg`, one UID counter,
MODSEQs), a :class:`Phone` (inbox, trash, destroy tombstones, its action counter) and the
agent's committed state (:class:`SimLedger`). :func:`sync` runs
:func:`imapsync_bridge.sync.session.session` — the very flow `agent sync` runs, fast paths
and held keys included — answering its steps from these mailboxes instead of IMAP and the
server.

The answers are deliberately literal (an APPEND always adds a copy, a PUT always adds to
the phone inbox), so a wrong plan shows up as a broken invariant instead of being papered
over here. ``crash_after`` stops a session at a point without committing the ledger, for
the crash-and-rerun tests; ``during`` lets users act *inside* a session, between its
steps, as the real session allows: desktop flag writes are conditional on the MODSEQ the
facts were read at (a message changed since is held for the next session), and the phone
keeps a flag its user changed after the snapshot the plan came from. Every phone-side
change is a phone action (so the fast path sees it): mail arriving at the phone address
must stay one when inbound mail lands.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from imapsync_bridge.model import (
    DesktopFact,
    DesktopMessage,
    DesktopStatus,
    FlagChange,
    Flags,
    LedgerEntry,
    MailboxStatus,
    PhoneFact,
    Where,
)
from imapsync_bridge.sync.ledger import roll_forward
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
from imapsync_bridge.sync.session import (
    AcknowledgePhone,
    ApplyDesktop,
    BeginChanges,
    CheckWindowFlags,
    Commit,
    DesktopOutcome,
    FetchRaws,
    FindDesktopFacts,
    LastSession,
    ListNewest,
    ListNewestAfterAdditions,
    NothingToDo,
    PhoneSnapshot,
    ReadDesktopStatus,
    ReadLedger,
    ReadPhoneSnapshot,
    SendToPhone,
    SessionOptions,
    Step,
    session,
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
    condstore: bool = True

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

    def status(self) -> DesktopStatus:
        """What STATUS would say: one UID counter for both folders, MODSEQs only with
        ``condstore`` (else the session compares the window's flags)."""
        modseq = self.highest_modseq if self.condstore else None
        return DesktopStatus(
            MailboxStatus(1, self.next_uid, len(self.inbox), modseq),
            MailboxStatus(2, self.next_uid, len(self.trash), modseq),
        )

    def window_flags_agree(self, ledger: Ledger) -> bool:
        for key, entry in ledger.items():
            if entry.desktop is not Where.INBOX or entry.phone is Where.GONE:
                continue
            msg = self.inbox.get(key)
            if entry.uid is None or msg is None or msg.uid != entry.uid:
                return False
            if msg.flags != entry.flags:
                return False
        return True

    def with_uids(self, ledger: Ledger) -> dict[str, LedgerEntry]:
        """The ledger with each message's UID where it is now (COPYUID / APPENDUID)."""
        out = dict(ledger)
        for key, entry in ledger.items():
            where, msg = self.locate(key)
            if msg is not None and where is entry.desktop:
                out[key] = replace(entry, uid=msg.uid)
        return out

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
    acked: int = 0  # the agent acknowledged the actions up to here
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

    def record_action(self) -> None:
        """Every phone-side change is a phone action (a new seq): it ends the fast path."""
        self.action_seq += 1

    def acknowledge(self, up_to: int) -> None:
        self.acked = max(self.acked, up_to)
        self.destroyed.clear()
        self.restored.clear()

    def changed_since(self, key: str, since: int) -> bool:
        """A change of the message after ``since`` still pending (the server drops the
        actions the agent acknowledged)."""
        newer = max(since, self.acked)
        return any(seq > newer for (k, _), seq in self.flag_changed_at.items() if k == key)

    def set_flags_unless_changed(self, key: str, change: FlagChange, since: int) -> None:
        """The server's compare-and-set: a flag changed after ``since`` is kept."""
        _, msg = self.locate(key)
        if msg is None:
            return
        for which in ("seen", "flagged"):
            value = getattr(change, which)
            if value is not None and self.flag_changed_at.get((key, which), 0) <= max(
                since, self.acked
            ):
                msg.flags = replace(msg.flags, **{which: value})

    def user_destroy(self, key: str) -> None:
        assert self.locate(key)[1] is not None
        self.drop(key)
        self.destroyed.add(key)
        self.record_action()

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


class SimLedger(dict[str, LedgerEntry]):
    """The agent's committed state in the simulator: the ledger, plus what the last
    completed session recorded for the next one's fast paths (``last``)."""

    last: LastSession | None = None
    interrupted: bool = False  # a session began changing things and did not commit
    #: phone actions a session that did not commit sent (the agent's journal); the
    #: next session rolls the ledger forward over them
    journal: tuple[PhoneAction, ...] = ()


# The points a simulated session can be stopped at or let users act at, in order; each is
# reached just before the first step that comes after it.
_PHASES = ("facts_read", "desktop_applied", "merge_applied", "normalize_applied", "acknowledged")
_PHASE_OF_STEP = {
    ApplyDesktop: 1,  # facts_read is behind us
    SendToPhone: 2,  # desktop_applied (the normalize sends come later, past phase 3)
    ListNewest: 3,  # merge_applied
    ListNewestAfterAdditions: 3,
    FetchRaws: 3,
    AcknowledgePhone: 4,  # normalize_applied
    Commit: 5,  # acknowledged
}


class _Stop(Exception):
    """The simulated agent crashed."""


def sync(
    desktop: Desktop,
    phone: Phone,
    ledger: Ledger,
    window: int,
    *,
    crash_after: str | None = None,
    mass_delete_share: float | None = None,
    during: Callable[[str], None] | None = None,
    phone_vouched: bool = False,
) -> Ledger:
    """One session of the real flow (:func:`imapsync_bridge.sync.session.session`),
    answered by the in-memory mailboxes; returns the committed ledger (a
    :class:`SimLedger`: a plain dict has no last session, so no fast path).

    With ``crash_after`` (one of CRASH_POINTS) the session stops at that point and
    returns the *old* ledger, as a crash before the ledger commit would leave it.
    ``during(step)`` is called at each of SESSION_STEPS: users acting mid-session.
    ``phone_vouched``: start without the phone's snapshot, as ``agent run`` does when its
    push link says the phone has not changed; the flow asks for it if it needs it.
    """
    assert crash_after in (None, *CRASH_POINTS)
    last = getattr(ledger, "last", None) or LastSession(None, None, 0, False)
    last = replace(last, interrupted=getattr(ledger, "interrupted", False))
    journal: tuple[PhoneAction, ...] = getattr(ledger, "journal", ())
    base = roll_forward(ledger, journal) if journal else dict(ledger)
    sent: list[PhoneAction] = []

    def phone_now() -> PhoneSnapshot:
        return PhoneSnapshot(
            window=window,
            facts=phone.facts(),
            destroyed=sorted(phone.destroyed),
            restored=sorted(phone.restored),
            action_seq=phone.action_seq if phone.action_seq > phone.acked else 0,
        )

    options = SessionOptions(
        mass_delete_share=mass_delete_share or 0.5, allow_mass_delete=mass_delete_share is None
    )
    reached = 0
    committed: list[Ledger] = []

    def reach(phase: int) -> None:
        nonlocal reached
        while reached < phase:
            name = _PHASES[reached]
            reached += 1
            if name == crash_after:
                raise _Stop
            if during is not None and name in SESSION_STEPS:
                during(name)

    def answer(step: Step) -> Any:
        reach(_PHASE_OF_STEP.get(type(step), 0))
        match step:
            case ReadDesktopStatus():
                return desktop.status()
            case ReadPhoneSnapshot():
                return phone_now()
            case ReadLedger():
                return dict(base)
            case CheckWindowFlags(saved):
                return desktop.window_flags_agree(saved)
            case FindDesktopFacts(keys):
                return {key: desktop.fact(key) for key in keys}
            case BeginChanges():
                if isinstance(ledger, SimLedger):
                    ledger.interrupted = True  # the agent's state file, written durably
                return None
            case ApplyDesktop(actions, facts, planned):
                changed = apply_desktop(desktop, phone, list(actions), dict(facts))
                return DesktopOutcome(desktop.with_uids(planned), {}, changed)
            case SendToPhone(actions, planned_at):
                apply_phone(phone, list(actions), planned_at)
                sent.extend(actions)
                return None
            case ListNewest(_count, skip):
                return [m for m in desktop.newest_first() if m.key not in skip]
            case ListNewestAfterAdditions(last_window, since_uid):
                added = [m for m in desktop.newest_first() if m.uid >= since_uid]
                return sorted(
                    [*last_window, *added], key=lambda m: (m.internaldate, m.uid), reverse=True
                )
            case FetchRaws(uids):
                return {uid: b"raw" for uid in uids}
            case AcknowledgePhone(up_to):
                phone.acknowledge(up_to)
                return None
            case Commit(new, status, size, held, quarantined):
                done = SimLedger(new)
                done.last = LastSession(status, size, held, bool(quarantined))
                committed.append(done)
                return None
            case NothingToDo():
                committed.append(ledger)
                return None
        raise AssertionError(f"unknown step {step!r}")

    flow = session(last, None if phone_vouched else phone_now(), options)
    reply: Any = None
    try:
        while True:
            reply = answer(flow.send(reply))
    except StopIteration:
        pass
    except _Stop:
        if isinstance(ledger, SimLedger):
            ledger.journal = (*journal, *sent)  # journaled durably before each send
        return ledger
    return committed[-1]


def ledger_view(ledger: Ledger) -> dict[str, tuple[Where, Where, Flags]]:
    """The ledger without its UID cache (a UID unknown after a move is filled in later)."""
    return {k: (e.desktop, e.phone, e.flags) for k, e in ledger.items()}


def snapshot(desktop: Desktop, phone: Phone, ledger: Ledger) -> tuple:
    """Comparable state of everything (a deep copy)."""
    return copy.deepcopy((desktop, phone, ledger))
