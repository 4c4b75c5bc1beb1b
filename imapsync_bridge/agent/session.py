"""One sync session (patent FIGs. 3-10), driven by the agent.

1. hello: the server says which of our actions it already applied; resend the rest.
2. snapshot: the phone mailbox now (bounded: window + trash) and its pending actions.
3. fast path: nothing changed on either side since the last completed session -> done.
4. update sync: find the desktop facts, :func:`merge`, check the mass-delete breaker,
   apply the desktop actions, send the phone actions.
5. normalize and pull: :func:`normalize` over the desktop's newest messages; send.
6. acknowledge the phone actions, commit the ledger, tell the server we completed.

The ledger is committed only at step 6, and every action is idempotent, so a crash at
any point is recovered by simply running the next session.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from imapsync_bridge.agent.desktop import DesktopSide, DesktopStatus
from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.agent.state import AgentState, PendingOp
from imapsync_bridge.errors import MessageError
from imapsync_bridge.model import (
    DesktopFact,
    DesktopMessage,
    Flags,
    LedgerEntry,
    PhoneFact,
    QuarantinedMessage,
    Where,
    message_id_of,
)
from imapsync_bridge.protocol import schema
from imapsync_bridge.sync.breaker import check_mass_delete
from imapsync_bridge.sync.ledger import prune
from imapsync_bridge.sync.merge import MergePlan, keys_in_scope, merge
from imapsync_bridge.sync.normalize import normalize
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DestroyOnDesktop,
    DestroyOnPhone,
    EvictFromPhone,
    MoveOnDesktop,
    MoveOnPhone,
    PhoneAction,
    PutOnPhone,
    SetPhoneFlags,
)

log = logging.getLogger(__name__)

MAX_PULL_RETRIES = 20
LEDGER_RECORD = 200  # evicted / long-trashed entries kept as a record (at least)
# Actions after which the window must be computed again.
STRUCTURAL = (MoveOnDesktop, AppendToDesktop, DestroyOnDesktop, MoveOnPhone, DestroyOnPhone)


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


@dataclass(frozen=True)
class LastSession:
    """What the last completed session left in the state, read once per session."""

    status: DesktopStatus | None  # both mailboxes' STATUS as the session recorded it
    window: int | None
    held: int  # messages whose desktop action failed
    quarantined: bool

    @classmethod
    def load(cls, state: AgentState) -> LastSession:
        meta = state.meta()
        saved = meta.get("desktop_status")
        window = meta.get("window")
        return cls(
            status=DesktopStatus.from_json(saved) if saved else None,
            window=int(window) if window else None,
            held=int(meta.get("held", "0")),
            quarantined=bool(state.quarantined()),
        )

    def same_uidvalidity(self, where: Where, now: DesktopStatus) -> bool:
        return self.status is not None and (
            self.status.of(where).uidvalidity == now.of(where).uidvalidity
        )


@dataclass(frozen=True)
class SessionOptions:
    mass_delete_share: float = 0.5
    allow_mass_delete: bool = False
    max_message_size: int = 25 * 1024 * 1024


def phone_op(action: PhoneAction, planned_at: int = 0) -> dict[str, Any]:
    """The protocol form of one phone action (raw bytes travel beside it).

    ``planned_at`` is the phone's ``action_seq`` of the snapshot the plan was made from:
    the server leaves a flag alone that the phone user changed after it.
    """
    if isinstance(action, PutOnPhone):
        return {
            "kind": "put",
            "key": action.key,
            "message_id": message_id_of(action.key),
            "internaldate": action.internaldate.astimezone(UTC).isoformat(),
            "seen": action.flags.seen,
            "flagged": action.flags.flagged,
            "folder": "inbox",
        }
    if isinstance(action, SetPhoneFlags):
        return {
            "kind": "flags",
            "key": action.key,
            "seen": action.change.seen,
            "flagged": action.change.flagged,
            "since": planned_at,
        }
    if isinstance(action, MoveOnPhone):
        return {"kind": "move", "key": action.key, "folder": action.to.value}
    if isinstance(action, EvictFromPhone):
        return {"kind": "evict", "key": action.key, "since": planned_at}
    if isinstance(action, DestroyOnPhone):
        return {"kind": "destroy", "key": action.key}
    raise TypeError(f"unknown phone action {action!r}")


def phone_facts(snapshot: schema.Snapshot) -> dict[str, PhoneFact]:
    restored = set(snapshot.restored)
    return {
        m.key: PhoneFact(
            Where(m.folder),
            Flags(m.seen, m.flagged),
            m.id,
            m.internaldate,
            restored=m.key in restored,
        )
        for m in snapshot.messages
    }


class SyncSession:
    def __init__(
        self,
        state: AgentState,
        desktop: DesktopSide,
        link: ServerLink,
        options: SessionOptions,
    ) -> None:
        self.state = state
        self.desktop = desktop
        self.link = link
        self.options = options
        self.report = SessionReport()
        self._acked = 0  # highest op the server acknowledged; retired with the ledger
        self._planned_at = 0

    def run(self) -> SessionReport:
        started = time.monotonic()
        last = LastSession.load(self.state)
        journal = self.state.pending()
        snapshot = self.link.hello(self.state.agent_instance(), with_snapshot=not journal)
        self.state.skip_sequence_past(self.link.last_seq)
        if snapshot is None:
            self._resend(journal)
            snapshot = self.link.snapshot()
        window = snapshot.window
        self._planned_at = snapshot.action_seq  # the phone's state the plan starts from

        before_status = self.desktop.status()
        if self._nothing_changed(last, snapshot, before_status) and (
            before_status.inbox.highestmodseq is not None
            or self.desktop.window_flags_agree(self.state.ledger())
        ):
            self.report.fast_path = True
            self.report.seconds = time.monotonic() - started
            self.state.set_many(
                {**_done_meta(), "folders": json.dumps(self.desktop.folders)}, durable=False
            )
            return self.report

        ledger = self._ledger_for(last, before_status)
        phone = phone_facts(snapshot)
        scope = keys_in_scope(ledger, phone, snapshot.destroyed)
        facts = self.desktop.facts(scope, ledger, _uidnext_since(last, before_status))
        plan = merge(ledger, facts, phone, snapshot.destroyed)
        if not self.options.allow_mass_delete:
            check_mass_delete(plan.desktop_deletions, window, self.options.mass_delete_share)

        ledger, held = self._apply_desktop(plan, facts, ledger)
        phone_actions = [a for a in plan.phone if a.key not in held]
        self._send([(phone_op(a, self._planned_at), None) for a in phone_actions])
        self.report.phone_actions += len(phone_actions)

        # The status to remember is the one taken before this session read anything: a
        # change a user makes while the session runs (even between our own writes) then
        # shows at the next session. Our own writes make that next one a full session.
        status = before_status
        moved = any(isinstance(a, STRUCTURAL) for a in [*plan.desktop, *plan.phone])
        same_window = last.window == window and not moved and not self.report.quarantined
        if not (same_window and _same_inbox(last, before_status)):
            added_since = None
            if same_window and not held and not last.held and not last.quarantined:
                added_since = _only_added_since(last, before_status, plan.ledger)
            ledger = self._normalize_and_pull(ledger, window, held, added_since)
        # A held message's tombstone or restore must survive until its action succeeds.
        keep_actions = held & (set(snapshot.destroyed) | set(snapshot.restored))
        if snapshot.action_seq and not keep_actions:
            self.link.ack_actions(snapshot.action_seq)
        self.report.seconds = time.monotonic() - started
        meta = _done_meta()
        meta.update(
            {
                "desktop_status": status.to_json(),
                "window": window,
                "user": self.link.user,
                "held": len(held),
                "folders": json.dumps(self.desktop.folders),
            }
        )
        ledger = prune(ledger, keep=max(4 * window, LEDGER_RECORD))
        self.state.commit_session(ledger, meta, self.report.quarantined, self._acked)
        self.link.complete(self.report.summary())
        return self.report

    # -- steps -----------------------------------------------------------------------
    def _resend(self, journal: list[PendingOp]) -> None:
        """Send what an earlier session journaled and the server did not apply."""
        self._note_acked(self.link.last_seq)  # the server applied these already
        pending = [op for op in journal if op.seq > self.link.last_seq]
        if pending:
            log.info("resending %d unacknowledged action(s) from an earlier session", len(pending))
            self.link.send_ops(pending, self._note_acked)

    def _apply_desktop(
        self, plan: MergePlan, facts: dict[str, DesktopFact], saved: dict[str, LedgerEntry]
    ) -> tuple[dict[str, LedgerEntry], set[str]]:
        """Carry out the desktop actions; returns the ledger and the keys held back.

        A message whose action failed, or whose flags a user changed while the session
        ran (a conditional STORE refused), keeps its saved ledger entry and is held out
        of this session's phone actions and normalization, so the next session plans it
        again from the new facts (and the phone keeps what its user did). Only a
        failure is quarantined.
        """
        outcome = self.desktop.apply_all(plan.desktop, facts, plan.ledger, self._fetch_from_phone)
        ledger = outcome.ledger
        for key, reason in outcome.failed.items():
            self._quarantine(key, facts[key].uid, reason)
        held = set(outcome.failed) | outcome.changed_meanwhile
        for key in held:
            if key in saved:
                ledger[key] = saved[key]
            else:
                ledger.pop(key, None)
        self.report.desktop_actions += sum(a.key not in held for a in plan.desktop)
        return ledger, held

    def _nothing_changed(
        self, last: LastSession, snapshot: schema.Snapshot, status: DesktopStatus
    ) -> bool:
        return (
            not snapshot.action_seq
            and not snapshot.destroyed
            and not last.held  # an action failed last time: try it again
            and last.window == snapshot.window
            and last.status == status
        )

    def _ledger_for(self, last: LastSession, status: DesktopStatus) -> dict[str, LedgerEntry]:
        """The saved ledger, with UIDs forgotten where UIDVALIDITY changed."""
        ledger = self.state.ledger()
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

    def _normalize_and_pull(
        self,
        ledger: dict[str, LedgerEntry],
        window: int,
        held: set[str],
        added_since: int | None = None,
    ) -> dict[str, LedgerEntry]:
        """Evict and pull until the window is right; a message that cannot be pulled
        is quarantined and the next newest takes its slot."""
        skip = set(held)
        for _attempt in range(MAX_PULL_RETRIES):
            known = {e.uid: k for k, e in ledger.items() if e.desktop is Where.INBOX and e.uid}
            if added_since is not None and not skip - held:
                newest = self.desktop.newest_after_additions(_mapped(ledger), added_since, window)
            else:
                newest = self.desktop.newest(window, skip, known)
            plan = normalize({k: e for k, e in ledger.items() if k not in held}, newest, window)
            puts = [a for a in plan.phone if isinstance(a, PutOnPhone)]
            limit = self.options.max_message_size
            too_big = {a.key for a in puts if a.size > limit}
            raws = self.desktop.fetch_raws([a.uid for a in puts if a.key not in too_big], limit)
            failed = [
                (put, f"{put.size} bytes, larger than max_message_size {limit}")
                if put.key in too_big
                else (put, str(raws[put.uid]))
                for put in puts
                if put.key in too_big or isinstance(raws[put.uid], MessageError)
            ]
            for put, reason in failed:
                self._quarantine(put.key, put.uid, reason)
                skip.add(put.key)
            if failed:
                continue  # plan again without them: the next newest fill their slots
            ops: list[tuple[dict[str, Any], bytes | None]] = []
            for action in plan.phone:
                raw = raws[action.uid] if isinstance(action, PutOnPhone) else None
                ops.append(
                    (phone_op(action, self._planned_at), raw if isinstance(raw, bytes) else None)
                )
            self._send(ops)
            self.report.pulled += len(puts)
            self.report.evicted += sum(isinstance(a, EvictFromPhone) for a in plan.phone)
            self.report.phone_actions += len(plan.phone)
            return {**plan.ledger, **{k: ledger[k] for k in held if k in ledger}}
        raise MessageError("too many messages could not be pulled; see `agent status`")

    def _send(self, ops: list[tuple[dict[str, Any], bytes | None]]) -> None:
        """Journal the ops (durably), then send them. Their retirement waits for the
        ledger commit: if the session dies first, the server's ``last_seq`` at the next
        hello retires them instead."""
        if ops:
            self.link.send_ops(self.state.journal(ops), self._note_acked)

    def _note_acked(self, seq: int) -> None:
        self._acked = max(self._acked, seq)

    def _fetch_from_phone(self, key: str) -> bytes:
        return self.link.fetch(key)

    def _quarantine(self, key: str, uid: int | None, reason: str) -> None:
        log.warning("quarantined %s (uid %s): %s", key, uid, reason)
        self.report.quarantined.append(QuarantinedMessage(key, uid, reason))


def _mapped(ledger: dict[str, LedgerEntry]) -> list[DesktopMessage]:
    """The last window, as the ledger remembers it."""
    return [
        DesktopMessage(e.uid, e.key, e.internaldate, 0, e.flags)
        for e in ledger.values()
        if e.desktop is Where.INBOX
        and e.phone is Where.INBOX
        and e.uid is not None
        and e.internaldate is not None
    ]


def _uidnext_since(last: LastSession, now: DesktopStatus) -> dict[Where, int | None]:
    """Each mailbox's UIDNEXT of the last session, where its UIDVALIDITY held."""
    return {
        where: last.status.of(where).uidnext
        if last.status is not None and last.same_uidvalidity(where, now)
        else None
        for where in (Where.INBOX, Where.TRASH)
    }


def _same_inbox(last: LastSession, now: DesktopStatus) -> bool:
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


def _only_added_since(
    last: LastSession, now: DesktopStatus, ledger: dict[str, LedgerEntry]
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


def _done_meta() -> dict[str, str | int | None]:
    return {
        "last_sync": datetime.now(UTC).isoformat(timespec="seconds"),
        "last_result": "ok",
        "last_error": None,
    }
