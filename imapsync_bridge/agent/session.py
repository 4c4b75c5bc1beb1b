"""One sync session, driven by the agent: the flow of :mod:`imapsync_bridge.sync.session`
carried out with the real IMAP adapter, the SQLite state and the link to the server.

The decisions (fast path, merge, held keys, normalize and pull, what to acknowledge) are
all in that flow; this module answers its steps with I/O, and does the link's own part:
hello, and resending what an earlier session journaled and the server did not apply.

The ledger is committed only at the end, and every action is idempotent, so a crash at
any point is recovered by simply running the next session.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from imapsync_bridge.agent.desktop import DesktopSide
from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.agent.outbox import Outbox, OutgoingSettings
from imapsync_bridge.agent.state import AgentState, PendingOp
from imapsync_bridge.logs import ProgressSink
from imapsync_bridge.model import (
    DesktopStatus,
    FlagChange,
    Flags,
    PhoneFact,
    Where,
    message_id_of,
)
from imapsync_bridge.protocol import schema
from imapsync_bridge.sync.ledger import roll_forward
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DestroyOnPhone,
    EvictFromPhone,
    MoveOnPhone,
    PhoneAction,
    PutOnPhone,
    SetPhoneFlags,
)
from imapsync_bridge.sync.session import (
    AcknowledgePhone,
    ApplyDesktop,
    BeginChanges,
    CheckWindowFlags,
    Commit,
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
    SessionReport,
    Step,
    session,
)

log = logging.getLogger(__name__)

# Seconds a no-change session may leave `last_sync` as it was (see _worth_recording).
LAST_SYNC_REFRESH = 60


def last_session(state: AgentState, meta: dict[str, str]) -> LastSession:
    """What the last completed session left in the state (*meta*: its facts, read once
    per session)."""
    saved = meta.get("desktop_status")
    window = meta.get("window")
    return LastSession(
        status=DesktopStatus.from_json(saved) if saved else None,
        window=int(window) if window else None,
        held=int(meta.get("held", "0")),
        quarantined=bool(state.quarantined()),
        interrupted=bool(meta.get("interrupted")),
    )


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


def phone_action_of(op: dict[str, Any]) -> PhoneAction:
    """The phone action a journaled op (:func:`phone_op`'s form) carried out."""
    key = op["key"]
    kind = op["kind"]
    if kind == "put":
        internaldate = datetime.fromisoformat(op["internaldate"])
        return PutOnPhone(key, 0, Flags(op["seen"], op["flagged"]), internaldate)
    if kind == "flags":
        return SetPhoneFlags(key, FlagChange(seen=op["seen"], flagged=op["flagged"]))
    if kind == "move":
        return MoveOnPhone(key, Where(op["folder"]))
    if kind == "evict":
        return EvictFromPhone(key)
    if kind == "destroy":
        return DestroyOnPhone(key)
    raise ValueError(f"unknown journaled op kind {kind!r}")


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


def phone_snapshot(snapshot: schema.Snapshot) -> PhoneSnapshot:
    return PhoneSnapshot(
        window=snapshot.window,
        facts=phone_facts(snapshot),
        destroyed=list(snapshot.destroyed),
        restored=list(snapshot.restored),
        action_seq=snapshot.action_seq,
    )


class SyncSession:
    def __init__(
        self,
        state: AgentState,
        desktop: DesktopSide,
        link: ServerLink,
        options: SessionOptions,
        *,
        phone_vouched: bool = False,
        keep_inbox_selected: bool = False,
        outgoing: OutgoingSettings | None = None,
        progress: ProgressSink | None = None,
    ) -> None:
        """``phone_vouched``: the caller knows the phone has not changed since the last
        session (``agent run``'s push link said nothing), so the session greets the
        server only if the desktop moved. ``keep_inbox_selected``: a running agent's
        session started by a change (see :meth:`DesktopSide.status`). ``outgoing``: how
        to send the snapshot's outgoing mail (None: the session leaves it to a session
        that can). ``progress``: told of each batch the server acknowledged (a terminal's
        progress line of a first sync; `agent run`'s watchdog, so a long session is not
        taken for a hung one)."""
        self.state = state
        self.desktop = desktop
        self.link = link
        self.options = options
        self.phone_vouched = phone_vouched
        self.keep_inbox_selected = keep_inbox_selected
        self._acked = 0  # highest op the server acknowledged; retired with the ledger
        self._journaled: list[PhoneAction] = []
        self._meta: dict[str, str] = {}
        self.outgoing = outgoing
        self._outgoing: list[schema.AnyAction] = []  # the snapshot's deliver/file_sent
        self.progress = progress

    def run(self) -> SessionReport:
        started = time.monotonic()
        self._meta = self.state.meta()
        last = last_session(self.state, self._meta)
        journal = self.state.pending()
        # An earlier session sent these and died before its commit; by the time the flow
        # reads the ledger the server has applied them all (the greeting resends what it
        # had not), so the ledger is rolled forward over them.
        self._journaled = [phone_action_of(pending.op) for pending in journal]
        unfinished = self.outgoing is not None and bool(self.state.deliveries())
        vouched = self.phone_vouched and not journal and not unfinished
        snapshot = None if vouched else self._greet(journal)
        flow = session(last, snapshot, self.options)
        answer: Any = None
        try:
            while True:
                answer = self._carry_out(flow.send(answer))
        except StopIteration as done:
            report: SessionReport = done.value
        # Outgoing mail after the inbox flow: its SMTP round trips do not hold up the
        # window, and it only touches the Outbox and Sent folders, never the inbox.
        if self.outgoing is not None and (self._outgoing or unfinished):
            Outbox(self.state, self.desktop, self.link, self.outgoing).run(self._outgoing)
        report.seconds = time.monotonic() - started
        if not report.fast_path:
            self.link.complete(report.summary())
        return report

    def _greet(self, journal: list[PendingOp]) -> PhoneSnapshot:
        """Hello, the resend of what an earlier session journaled, and the snapshot."""
        snapshot = self.link.hello(self.state.agent_instance(), with_snapshot=not journal)
        self.state.skip_sequence_past(self.link.last_seq)
        if snapshot is None:
            self._resend(journal)
            snapshot = self.link.snapshot()
        self._outgoing = [
            a for a in snapshot.actions if isinstance(a, schema.Deliver | schema.FileSent)
        ]
        return phone_snapshot(snapshot)

    def _carry_out(self, step: Step) -> Any:
        """One step of the flow, with I/O; returns its answer."""
        if isinstance(step, ReadDesktopStatus):
            return self.desktop.status(self.keep_inbox_selected)
        if isinstance(step, ReadPhoneSnapshot):
            return self._greet([])
        if isinstance(step, ReadLedger):
            return roll_forward(self.state.ledger(), self._journaled)
        if isinstance(step, CheckWindowFlags):
            return self.desktop.window_flags_agree(step.ledger)
        if isinstance(step, FindDesktopFacts):
            return self.desktop.facts(step.keys, step.ledger, step.since)
        if isinstance(step, BeginChanges):
            self.state.set_many({"interrupted": "1"})
            return None
        if isinstance(step, ApplyDesktop):
            copies = sum(isinstance(a, AppendToDesktop) for a in step.actions)
            return self.desktop.apply_all(
                step.actions, step.facts, step.ledger, self._pulling(copies)
            )
        if isinstance(step, SendToPhone):
            ops = [
                (
                    phone_op(action, step.planned_at),
                    step.raws.get(action.uid) if isinstance(action, PutOnPhone) else None,
                )
                for action in step.actions
            ]
            self._send(ops)
            return None
        if isinstance(step, ListNewest):
            return self.desktop.newest(step.count, step.skip, step.known)
        if isinstance(step, ListNewestAfterAdditions):
            return self.desktop.newest_after_additions(step.last_window, step.since_uid, step.count)
        if isinstance(step, FetchRaws):
            counted = self._reporting("fetching from the desktop", len(step.uids))
            return self.desktop.fetch_raws(step.uids, step.max_size, counted)
        if isinstance(step, AcknowledgePhone):
            self.link.ack_actions(step.up_to)
            return None
        if isinstance(step, NothingToDo):
            done = self._done_meta()
            if self._worth_recording(done):
                self.state.set_many(done, durable=False)
            return None
        if isinstance(step, Commit):
            meta = self._done_meta()
            meta.update(
                {
                    "desktop_status": step.status.to_json(),
                    "window": step.window,
                    "user": self.link.user,
                    "held": step.held,
                    "interrupted": None,
                }
            )
            self.state.commit_session(step.ledger, meta, step.quarantined, self._acked)
            return None
        raise TypeError(f"unknown session step {step!r}")

    def _worth_recording(self, done: dict[str, str | int | None]) -> bool:
        """Whether a session that found nothing to do writes its facts: when they
        changed, or its ``last_sync`` is LAST_SYNC_REFRESH old. A running agent's
        no-change session is otherwise one IMAP round trip; the write would double it."""
        if any(
            self._meta.get(name) != value for name, value in done.items() if name != "last_sync"
        ):
            return True
        try:
            recorded = datetime.fromisoformat(self._meta.get("last_sync") or "")
        except ValueError:
            return True
        return (datetime.now(UTC) - recorded).total_seconds() >= LAST_SYNC_REFRESH

    def _done_meta(self) -> dict[str, str | int | None]:
        return {
            "last_sync": datetime.now(UTC).isoformat(timespec="seconds"),
            "last_result": "ok",
            "last_error": None,
            "folders": json.dumps(self.desktop.folders),
        }

    # -- the link's own part -----------------------------------------------------------
    def _resend(self, journal: list[PendingOp]) -> None:
        """Send what an earlier session journaled and the server did not apply."""
        self._note_acked(self.link.last_seq)  # the server applied these already
        pending = [op for op in journal if op.seq > self.link.last_seq]
        if pending:
            log.info("resending %d unacknowledged action(s) from an earlier session", len(pending))
            self.link.send_ops(pending, self._note_acked)

    def _send(self, ops: list[tuple[dict[str, Any], bytes | None]]) -> None:
        """Journal the ops (durably), then send them. Their retirement waits for the
        ledger commit: if the session dies first, the server's ``last_seq`` at the next
        hello retires them instead."""
        if not ops:
            return
        pending = self.state.journal(ops)
        on_acked: Callable[[int], None] = self._note_acked
        if self.progress is not None:
            on_acked = self._counting([op.seq for op in pending], self.progress)
        self.link.send_ops(pending, on_acked)

    def _counting(self, seqs: list[int], progress: ProgressSink) -> Callable[[int], None]:
        def acked(seq: int) -> None:
            self._note_acked(seq)
            progress.update("sending to the phone", bisect.bisect_right(seqs, seq), len(seqs))

        return acked

    def _reporting(self, what: str, total: int) -> Callable[[int], None] | None:
        """``done -> None`` telling :attr:`progress` how far work of *total* steps is."""
        progress = self.progress
        if progress is None:
            return None
        return lambda done: progress.update(what, done, total)

    def _note_acked(self, seq: int) -> None:
        self._acked = max(self._acked, seq)

    def _pulling(self, total: int) -> Callable[[str], bytes]:
        """The phone's copy of a message, counted as a step of copying *total* of them."""
        counted = self._reporting("copying to the desktop", total)
        done = 0

        def fetch(key: str) -> bytes:
            nonlocal done
            raw = self.link.fetch(key)
            done += 1
            if counted is not None:
                counted(done)
            return raw

        return fetch
