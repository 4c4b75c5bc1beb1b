"""The sync session (patent FIG. 3) as an I/O-free flow: it asks for facts, issues actions.

:func:`session` is a generator in the style of httpx's auth flows: it yields a *step*
(one of the dataclasses below: read this, apply that, send those) and is sent the step's
answer; it never does I/O itself. ``agent/session.py`` drives it with the real IMAP
adapter, SQLite state and server link; ``tests/sync_sim.py`` drives it with in-memory
mailboxes, so the property tests run the very decisions users run — fast paths, held
keys and the pull retries included. The patent's figures, by name:

1. the phone's snapshot is given (the driver's hello/resend came first), or, when the
   driver knows the phone has not changed since the last session (the push link of
   ``agent run`` says so), asked for only once the desktop has moved
   (:class:`ReadPhoneSnapshot`);
2. :func:`nothing_changed` — the fast path: nothing moved on either side, stop;
3. **initial or update sync** (FIGs. 4-8) — :func:`~.merge.merge` over the ledger and
   both sides' facts; an empty ledger makes it the initial sync; the mass-delete breaker;
   the desktop actions (:class:`ApplyDesktop`), then the phone actions
   (:class:`SendToPhone`: every action is journaled and removed only when acknowledged,
   claim 4);
4. **normalize and pull** (FIGs. 9-10) — :func:`normalize_and_pull` over the desktop's
   newest messages, a message that cannot be pulled quarantined and the next one pulled;
5. **swap / acknowledge** — :class:`AcknowledgePhone` of the phone's own action list
   (its changes are in the snapshot), then :class:`Commit` of the new ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from imapsync_bridge.errors import MessageError
from imapsync_bridge.model import (
    DesktopFact,
    DesktopMessage,
    DesktopStatus,
    LedgerEntry,
    PhoneFact,
    QuarantinedMessage,
    Where,
)
from imapsync_bridge.sync.breaker import check_mass_delete
from imapsync_bridge.sync.ledger import prune
from imapsync_bridge.sync.merge import keys_in_scope, merge
from imapsync_bridge.sync.normalize import normalize
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
)

log = logging.getLogger(__name__)

MAX_PULL_RETRIES = 20
LEDGER_RECORD = 200  # evicted / long-trashed entries kept as a record (at least)
# Actions after which the window must be computed again.
STRUCTURAL = (MoveOnDesktop, AppendToDesktop, DestroyOnDesktop, MoveOnPhone, DestroyOnPhone)


# -- what the flow is given ------------------------------------------------------------
@dataclass(frozen=True)
class SessionOptions:
    mass_delete_share: float = 0.5
    allow_mass_delete: bool = False
    max_message_size: int = 25 * 1024 * 1024


@dataclass(frozen=True)
class LastSession:
    """What the last completed session left in the agent's state."""

    status: DesktopStatus | None  # both mailboxes' counts before that session read them
    window: int | None
    held: int  # messages whose desktop action failed or was refused (changed meanwhile)
    quarantined: bool
    interrupted: bool = False  # a later session began changing things and never committed

    def same_uidvalidity(self, where: Where, now: DesktopStatus) -> bool:
        return self.status is not None and (
            self.status.of(where).uidvalidity == now.of(where).uidvalidity
        )


@dataclass(frozen=True)
class PhoneSnapshot:
    """The phone mailbox now (bounded: window + trash) and its pending actions."""

    window: int
    facts: dict[str, PhoneFact]
    destroyed: list[str]  # tombstones: keys the phone user destroyed
    restored: list[str]  # keys the phone user restored since the last sync
    action_seq: int  # the phone's newest action: the state this session plans from


# -- the steps it asks its driver to carry out -------------------------------------------
@dataclass(frozen=True)
class ReadDesktopStatus:
    """Answer: the :class:`DesktopStatus` now."""


@dataclass(frozen=True)
class ReadPhoneSnapshot:
    """Answer: the :class:`PhoneSnapshot` now (asked only when the flow was started
    without one and the desktop moved)."""


@dataclass(frozen=True)
class ReadLedger:
    """Answer: the saved ledger (``dict[str, LedgerEntry]``)."""


@dataclass(frozen=True)
class CheckWindowFlags:
    """Answer: whether the inbox messages of *ledger* the phone holds still have the
    ledger's flags (asked only without CONDSTORE, where no count moves for flags)."""

    ledger: Mapping[str, LedgerEntry]


@dataclass(frozen=True)
class FindDesktopFacts:
    """Answer: a :class:`DesktopFact` for every one of *keys* (``since``: each
    mailbox's UIDNEXT of the last session where its UIDVALIDITY held)."""

    keys: set[str]
    ledger: Mapping[str, LedgerEntry]
    since: Mapping[Where, int | None]


@dataclass(frozen=True)
class DesktopOutcome:
    """The answer to :class:`ApplyDesktop`."""

    ledger: dict[str, LedgerEntry]  # with the UIDs moves and appends gave
    failed: dict[str, str]  # key -> why its action failed
    changed_meanwhile: set[str]  # flag writes refused: a user changed them since


@dataclass(frozen=True)
class BeginChanges:
    """Record (durably) that this session is about to change the mailboxes: until it
    commits, the ledger may lag behind both sides, so no fast path may trust it.
    Answer: None."""


@dataclass(frozen=True)
class ApplyDesktop:
    """Answer: a :class:`DesktopOutcome`."""

    actions: Sequence[DesktopAction]
    facts: Mapping[str, DesktopFact]
    ledger: Mapping[str, LedgerEntry]


@dataclass(frozen=True)
class SendToPhone:
    """Journal, then send these actions (``raws``: the bytes of each put, by UID),
    planned from the phone's state at ``planned_at``. Answer: None."""

    actions: Sequence[PhoneAction]
    planned_at: int
    raws: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ListNewest:
    """Answer: the inbox newest first, enough for ``count`` distinct keys not in
    ``skip`` (``known``: UIDs whose key the ledger has)."""

    count: int
    skip: set[str]
    known: Mapping[int, str]


@dataclass(frozen=True)
class ListNewestAfterAdditions:
    """Answer: the window when messages were only added since ``since_uid``: the newest
    ``count`` of ``last_window`` and the UIDs from ``since_uid`` on."""

    last_window: list[DesktopMessage]
    since_uid: int
    count: int


@dataclass(frozen=True)
class FetchRaws:
    """Answer: ``dict[int, bytes | MessageError]`` for each UID (at most ``max_size``)."""

    uids: list[int]
    max_size: int


@dataclass(frozen=True)
class AcknowledgePhone:
    """The phone's actions up to ``up_to`` are done with. Answer: None."""

    up_to: int


@dataclass(frozen=True)
class Commit:
    """The session completed: store the ledger and what the next session compares with.
    Answer: None."""

    ledger: dict[str, LedgerEntry]
    status: DesktopStatus
    window: int
    held: int
    quarantined: list[QuarantinedMessage]


@dataclass(frozen=True)
class NothingToDo:
    """The fast path: record the time of a completed session, nothing else. Answer: None."""


Step = (
    ReadDesktopStatus
    | ReadPhoneSnapshot
    | ReadLedger
    | CheckWindowFlags
    | FindDesktopFacts
    | BeginChanges
    | ApplyDesktop
    | SendToPhone
    | ListNewest
    | ListNewestAfterAdditions
    | FetchRaws
    | AcknowledgePhone
    | Commit
    | NothingToDo
)
Flow = Generator[Step, Any, "SessionReport"]


@dataclass
class SessionReport:
    fast_path: bool = False
    desktop_actions: int = 0
    phone_actions: int = 0
    pulled: int = 0
    evicted: int = 0
    quarantined: list[QuarantinedMessage] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "fast_path": self.fast_path,
            "desktop_actions": self.desktop_actions,
            "phone_actions": self.phone_actions,
            "pulled": self.pulled,
            "evicted": self.evicted,
            "quarantined": len(self.quarantined),
        }


# -- the flow --------------------------------------------------------------------------
def session(last: LastSession, snapshot: PhoneSnapshot | None, options: SessionOptions) -> Flow:
    """One session, from the phone's snapshot to the commit (see the module docstring).

    ``snapshot`` None: the driver vouches that the phone has not changed since the last
    completed session, so the flow reads it only if the desktop moved.
    """
    report = SessionReport()
    status: DesktopStatus = yield ReadDesktopStatus()
    saved: dict[str, LedgerEntry] | None = None
    if snapshot is None:
        if desktop_unchanged(last, status):
            if status.inbox.highestmodseq is None:
                saved = yield ReadLedger()
                unchanged = yield CheckWindowFlags(saved)
            else:
                unchanged = True  # HIGHESTMODSEQ would have moved with any flag
            if unchanged:
                report.fast_path = True
                yield NothingToDo()
                return report
        snapshot = yield ReadPhoneSnapshot()
    elif nothing_changed(last, snapshot, status):
        saved = yield ReadLedger()
        unchanged = phone_as_agreed(snapshot, saved) and (
            status.inbox.highestmodseq is not None or (yield CheckWindowFlags(saved))
        )
        if unchanged:
            report.fast_path = True
            yield NothingToDo()
            return report
    window = snapshot.window

    ledger = ledger_for(last, status, saved if saved is not None else (yield ReadLedger()))
    # The phone may hold what the last session meant to evict (the phone user changed it
    # meanwhile, so the server kept it): then the window must be made again.
    phone_agreed = phone_as_agreed(snapshot, ledger)
    scope = keys_in_scope(ledger, snapshot.facts, snapshot.destroyed)
    facts = yield FindDesktopFacts(scope, ledger, uidnext_since(last, status))
    plan = merge(ledger, facts, snapshot.facts, snapshot.destroyed)
    if not options.allow_mass_delete:
        check_mass_delete(plan.desktop_deletions, window, options.mass_delete_share)

    if plan.desktop or plan.phone:
        yield BeginChanges()
    outcome: DesktopOutcome = yield ApplyDesktop(plan.desktop, facts, plan.ledger)
    ledger, held = hold_back(outcome, ledger, facts, report)
    report.desktop_actions += sum(a.key not in held for a in plan.desktop)
    phone_actions = [a for a in plan.phone if a.key not in held]
    if phone_actions:
        yield SendToPhone(phone_actions, snapshot.action_seq)
    report.phone_actions += len(phone_actions)

    moved = any(isinstance(a, STRUCTURAL) for a in [*plan.desktop, *plan.phone])
    # The last window holds unless something moved, or the last session made it without
    # the messages it held back, or the phone holds other than the ledger says.
    same_window = (
        last.window == window
        and not moved
        and not report.quarantined
        and not last.held
        and phone_agreed
    )
    if not (same_window and same_inbox(last, status)):
        added_since = None
        if same_window and not held and not last.quarantined:
            added_since = only_added_since(last, status, plan.ledger)
        ledger = yield from normalize_and_pull(
            ledger, window, held, added_since, snapshot.action_seq, options, report
        )
    # A held message's tombstone or restore must survive until its action succeeds.
    keep_actions = held & (set(snapshot.destroyed) | set(snapshot.restored))
    if snapshot.action_seq and not keep_actions:
        yield AcknowledgePhone(snapshot.action_seq)
    ledger = prune(ledger, keep=max(4 * window, LEDGER_RECORD))
    # The status remembered is the one read before anything else: a change a user makes
    # while the session runs (even between our own writes) shows at the next session.
    yield Commit(ledger, status, window, len(held), report.quarantined)
    return report


def hold_back(
    outcome: DesktopOutcome,
    saved: Mapping[str, LedgerEntry],
    facts: Mapping[str, DesktopFact],
    report: SessionReport,
) -> tuple[dict[str, LedgerEntry], set[str]]:
    """The ledger after the desktop actions, and the keys held back from the rest.

    A message whose action failed, or whose flags a user changed while the session ran
    (a conditional STORE refused), keeps its saved ledger entry and sits out this
    session's phone actions and normalization, so the next session plans it again from
    the new facts (and the phone keeps what its user did). Only a failure is quarantined.
    """
    ledger = dict(outcome.ledger)
    for key, reason in outcome.failed.items():
        quarantine(report, key, facts[key].uid, reason)
    held = set(outcome.failed) | set(outcome.changed_meanwhile)
    for key in held:
        if key in saved:
            ledger[key] = saved[key]
        else:
            ledger.pop(key, None)
    return ledger, held


def normalize_and_pull(
    ledger: dict[str, LedgerEntry],
    window: int,
    held: set[str],
    added_since: int | None,
    planned_at: int,
    options: SessionOptions,
    report: SessionReport,
) -> Generator[Step, Any, dict[str, LedgerEntry]]:
    """Evict and pull until the window is right (FIGs. 9-10); a message that cannot be
    pulled is quarantined and the next newest takes its slot."""
    skip = set(held)
    for _attempt in range(MAX_PULL_RETRIES):
        newest: list[DesktopMessage]
        if added_since is not None and not skip - held:
            newest = yield ListNewestAfterAdditions(last_window(ledger), added_since, window)
        else:
            known = {e.uid: k for k, e in ledger.items() if e.desktop is Where.INBOX and e.uid}
            newest = yield ListNewest(window, skip, known)
        plan = normalize({k: e for k, e in ledger.items() if k not in held}, newest, window)
        puts = [a for a in plan.phone if isinstance(a, PutOnPhone)]
        limit = options.max_message_size
        too_big = {a.key for a in puts if a.size > limit}
        wanted = [a.uid for a in puts if a.key not in too_big]
        raws: dict[int, bytes | MessageError] = (yield FetchRaws(wanted, limit)) if wanted else {}
        failed = [
            (put, f"{put.size} bytes, larger than max_message_size {limit}")
            if put.key in too_big
            else (put, str(raws[put.uid]))
            for put in puts
            if put.key in too_big or isinstance(raws[put.uid], MessageError)
        ]
        for put, reason in failed:
            quarantine(report, put.key, put.uid, reason)
            skip.add(put.key)
        if failed:
            continue  # plan again without them: the next newest fill their slots
        if plan.phone:
            good = {uid: raw for uid, raw in raws.items() if isinstance(raw, bytes)}
            yield SendToPhone(plan.phone, planned_at, good)
        report.pulled += len(puts)
        report.evicted += sum(isinstance(a, EvictFromPhone) for a in plan.phone)
        report.phone_actions += len(plan.phone)
        return {**plan.ledger, **{k: ledger[k] for k in held if k in ledger}}
    raise MessageError("too many messages could not be pulled; see `agent status`")


def quarantine(report: SessionReport, key: str, uid: int | None, reason: str) -> None:
    log.warning("quarantined %s (uid %s): %s", key, uid, reason)
    report.quarantined.append(QuarantinedMessage(key, uid, reason))


# -- the decisions, as plain functions -------------------------------------------------
def nothing_changed(last: LastSession, snapshot: PhoneSnapshot, status: DesktopStatus) -> bool:
    """Nothing moved since the last completed session (by the counts alone)."""
    return (
        not snapshot.action_seq
        and not snapshot.destroyed
        and last.window == snapshot.window
        and desktop_unchanged(last, status)
    )


def desktop_unchanged(last: LastSession, status: DesktopStatus) -> bool:
    """The desktop's counts are those the last completed session started from, and that
    session left nothing to retry."""
    return (
        not last.held  # an action failed last time: try it again
        and not last.interrupted  # both sides may have moved past the ledger
        and last.status == status
    )


def phone_as_agreed(snapshot: PhoneSnapshot, ledger: Mapping[str, LedgerEntry]) -> bool:
    """The phone holds what the ledger says, where it says: nothing left it without an
    action (the trash garbage collector drops entries without one)."""
    held = {key: entry.phone for key, entry in ledger.items() if entry.phone is not Where.GONE}
    return held == {key: fact.where for key, fact in snapshot.facts.items()}


def ledger_for(
    last: LastSession, status: DesktopStatus, ledger: dict[str, LedgerEntry]
) -> dict[str, LedgerEntry]:
    """The saved ledger, with UIDs forgotten where UIDVALIDITY changed."""
    for where in (Where.INBOX, Where.TRASH):
        if last.status is None or last.same_uidvalidity(where, status):
            continue
        log.warning(
            "UIDVALIDITY of the %s changed (%s -> %s): re-mapping by Message-ID",
            where.value,
            last.status.of(where).uidvalidity,
            status.of(where).uidvalidity,
        )
        for key, entry in ledger.items():
            if entry.desktop is where:
                ledger[key] = replace(entry, uid=None)
    return ledger


def last_window(ledger: Mapping[str, LedgerEntry]) -> list[DesktopMessage]:
    """The last window, as the ledger remembers it."""
    return [
        DesktopMessage(e.uid, e.key, e.internaldate, 0, e.flags)
        for e in ledger.values()
        if e.desktop is Where.INBOX
        and e.phone is Where.INBOX
        and e.uid is not None
        and e.internaldate is not None
    ]


def uidnext_since(last: LastSession, now: DesktopStatus) -> dict[Where, int | None]:
    """Each mailbox's UIDNEXT of the last session, where its UIDVALIDITY held."""
    return {
        where: last.status.of(where).uidnext
        if last.status is not None and last.same_uidvalidity(where, now)
        else None
        for where in (Where.INBOX, Where.TRASH)
    }


def same_inbox(last: LastSession, now: DesktopStatus) -> bool:
    """The same UIDVALIDITY, UIDNEXT and count: the same set of UIDs (a new message
    takes a new UID), so the last window still holds."""
    if last.status is None:
        return False
    then, inbox = last.status.inbox, now.inbox
    return (then.uidvalidity, then.uidnext, then.messages) == (
        inbox.uidvalidity,
        inbox.uidnext,
        inbox.messages,
    )


def only_added_since(
    last: LastSession, now: DesktopStatus, ledger: Mapping[str, LedgerEntry]
) -> int | None:
    """The inbox's UIDNEXT of the last session when since then messages were only added
    (its count grew by exactly the number of new UIDs) and the last window is fully
    known: the new window is then the newest of the last one and the new UIDs."""
    if last.status is None or not last.same_uidvalidity(Where.INBOX, now):
        return None
    if any(
        e.uid is None or e.internaldate is None
        for e in ledger.values()
        if e.desktop is Where.INBOX and e.phone is Where.INBOX
    ):
        return None
    then = last.status.inbox
    added = now.inbox.uidnext - then.uidnext
    return then.uidnext if now.inbox.messages == then.messages + added else None
