"""Send via the desktop, exactly once (patent FIG. 12; DESIGN.md invariant 6).

Run by the sync session after its inbox flow, over the same IMAP connection and server
link: the snapshot's ``deliver`` actions are sent through the corporate SMTP server and
filed in the desktop Sent folder; its ``file_sent`` actions (mail the hosted server
already sent) are only filed. Nothing is ever sent that did not come in a ``deliver``
action over the authenticated link, and only as the user's own ``[smtp] from_address``.

Every step of a delivery is recorded in the agent state (``deliveries``, keyed by
Message-ID) *before* it is taken; the decisions (what a recorded step means after a
crash, what an SMTP reply means, the limits) are :mod:`imapsync_bridge.sync.outgoing`'s.
Before anything is appended or sent, the Message-ID is looked for in Sent and in the
Outbox, so a lost state, a re-offered message or a crash at any step never sends twice:

* found in Sent → it was sent (by us, or filed by a server that files sent mail): report;
* recorded ``sending`` or later → never sent again (RFC 1047's window): filed as sent;
* otherwise it is (re)appended to the Outbox only when missing there, and sent.

A refused, failed or deferred message is taken out of the Outbox again, so no desktop
mail client finds it there and sends it by itself; the phone keeps it (with its state).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from imapsync_bridge.agent.desktop import DesktopSide
from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.agent.state import AgentState, DeliveryRecord
from imapsync_bridge.config import MailServer
from imapsync_bridge.model import Flags, normalize_message_id
from imapsync_bridge.protocol import schema
from imapsync_bridge.sync.outgoing import Limits, Next, Outcome, Step, over_sync_limit, refusal
from imapsync_bridge.sync.outgoing import resume as next_action

log = logging.getLogger(__name__)

SEEN = Flags(seen=True, flagged=False)


@dataclass(frozen=True)
class OutgoingSettings:
    """How this agent sends: ``[smtp]`` (None: not configured, deliveries are refused)
    and the limits (sender, size, recipients, messages per sync)."""

    smtp: MailServer | None
    limits: Limits
    local_hostname: str = ""


@dataclass
class OutboxReport:
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    filed: int = 0
    waiting: int = 0  # over this sync's limit: the next sync takes them

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v}


class Outbox:
    """One session's outgoing work; blocking, in the session's thread."""

    def __init__(
        self,
        state: AgentState,
        desktop: DesktopSide,
        link: ServerLink,
        settings: OutgoingSettings,
    ) -> None:
        self.state = state
        self.desktop = desktop
        self.link = link
        self.settings = settings
        self.report = OutboxReport()

    @property
    def _outbox(self) -> str:
        return self.desktop.folders.get("outbox", "Outbox")

    @property
    def _sent(self) -> str:
        return self.desktop.folders.get("sent", "Sent")

    def run(self, actions: Sequence[schema.AnyAction]) -> OutboxReport:
        """Finish what an earlier session left, then the snapshot's outgoing actions."""
        offered = [a for a in actions if isinstance(a, schema.Deliver)]
        offered_ids = {_key(a.message_id) for a in offered}
        for record in self.state.deliveries():
            if record.message_id not in offered_ids:
                self._carry_on(record)
        nth = 0
        for action in offered:
            held = self.state.delivery(_key(action.message_id))
            if held is not None:
                self._carry_on(replace(held, server_id=action.id))
                continue
            nth += 1
            if over_sync_limit(nth, self.settings.limits):
                self.report.waiting += 1
                continue
            self._take(action)
        for filing in (a for a in actions if isinstance(a, schema.FileSent)):
            self._file_sent(filing)
        if self.report.summary():
            log.info("outgoing: %s", self.report.summary())
        return self.report

    # -- one delivery ----------------------------------------------------------------
    def _take(self, action: schema.Deliver) -> None:
        why = refusal(action.sender, list(action.to), len(action.raw), self.settings.limits)
        if why is None and self.settings.smtp is None:
            why = "the desktop agent has no [smtp] server configured"
        if why is not None:
            log.warning("outgoing %s refused: %s", action.message_id, why)
            self._report(action.id, "failed", why)
            self.report.failed += 1
            return
        record = DeliveryRecord(
            _key(action.message_id), action.id, Step.CLAIMED, action.sender, list(action.to),
            action.raw,
        )  # fmt: skip
        self.state.record_delivery(record)
        self._carry_on(record)

    def _carry_on(self, record: DeliveryRecord) -> None:
        """Take a delivery from its recorded step to its report, one step at a time."""
        step = Step(record.step)
        # Where it is: looked up once (what a crash or a lost state left); after that
        # each step's own effect says it.
        in_sent = step not in _FINAL and bool(self._find(self._sent, record))
        in_outbox = step not in _FINAL and not in_sent and bool(self._find(self._outbox, record))
        while True:
            step = Step(record.step)
            action = next_action(step, in_sent, in_outbox)
            if action is Next.REPORT:
                if step not in _FINAL:  # found in Sent: it was sent
                    record = self._record(record, Step.SENT, record.reply)
                self._finish(record)
                return
            if action is Next.APPEND:
                self.desktop.imap.append(self._outbox, record.raw, datetime.now(UTC), SEEN)
                record = self._record(record, Step.OUTBOX)
                in_outbox = True
            elif action is Next.SEND:
                record = self._send(record)
                in_outbox = Step(record.step) is Step.SUBMITTED  # else taken out again
            elif action is Next.FILE:
                self._move_to_sent(record)
                record = self._record(record, Step.SENT, record.reply)
                in_sent, in_outbox = True, False

    def _send(self, record: DeliveryRecord) -> DeliveryRecord:
        from imapsync_bridge import smtp_out  # smtplib, tenacity: only when mail goes out

        assert self.settings.smtp is not None
        sending = replace(record, step=Step.SENDING)
        result = smtp_out.send(
            self.settings.smtp, self.settings.limits.from_address, record.recipients,
            record.raw, local_hostname=self.settings.local_hostname or socket.gethostname(),
            before_data=lambda: self.state.record_delivery(sending),
        )  # fmt: skip
        if result.outcome in (Outcome.ACCEPTED, Outcome.UNKNOWN):
            reply = result.reply if result.accepted else f"unconfirmed: {result.reply}"
            record = self._record(record, Step.SUBMITTED, reply)
            self._report(record.server_id, "submitted", reply)
            return record
        step = Step.FAILED if result.outcome is Outcome.PERMANENT else Step.DEFERRED
        record = self._record(record, step, result.reply)
        self._remove(self._outbox, record)
        return record

    def _finish(self, record: DeliveryRecord) -> None:
        """Report the final step; forget the delivery once the server acknowledged it."""
        state = _REPORTED[Step(record.step)]
        self._report(record.server_id, state, record.reply)
        self.state.forget_delivery(record.message_id)
        setattr(self.report, state, getattr(self.report, state) + 1)
        log.info("outgoing %s: %s (%s)", record.message_id, state, record.reply or "-")

    # -- desktop folders -------------------------------------------------------------
    def _find(self, mailbox: str, record: DeliveryRecord) -> list[int]:
        return self.desktop.imap.locate(mailbox, record.message_id)

    def _move_to_sent(self, record: DeliveryRecord) -> None:
        """Outbox → Sent (``\\Seen``); APPENDed to Sent if the Outbox copy is gone."""
        uids = self._find(self._outbox, record)
        if not uids:
            self.desktop.imap.append(self._sent, record.raw, datetime.now(UTC), SEEN)
            return
        self.desktop.imap.move(uids[:1], self._sent)
        if len(uids) > 1:  # an earlier APPEND whose answer was lost: drop the spare
            self.desktop.imap.expunge_uids(uids[1:])

    def _remove(self, mailbox: str, record: DeliveryRecord) -> None:
        uids = self._find(mailbox, record)
        if uids:
            self.desktop.imap.expunge_uids(uids)

    def _file_sent(self, action: schema.FileSent) -> None:
        """A send-now copy into Sent, unless it is there already; then ``filed``."""
        if not self.desktop.imap.locate(self._sent, _key(action.message_id)):
            self.desktop.imap.append(self._sent, action.raw, datetime.now(UTC), SEEN)
        self._report(action.id, "filed", "")
        self.report.filed += 1

    # -- state and link --------------------------------------------------------------
    def _record(self, record: DeliveryRecord, step: Step, reply: str = "") -> DeliveryRecord:
        updated = replace(record, step=step, reply=reply)
        self.state.record_delivery(updated)
        return updated

    def _report(self, server_id: int, state: schema.DeliveryState, reply: str) -> None:
        self.link.request(schema.Delivery(id=server_id, state=state, reply=reply[:2000]), schema.Ok)


_FINAL = (Step.SENT, Step.FAILED, Step.DEFERRED)
_REPORTED: dict[Step, schema.DeliveryState] = {
    Step.SENT: "sent",
    Step.FAILED: "failed",
    Step.DEFERRED: "deferred",
}


def _key(message_id: str) -> str:
    """The Message-ID as the sync keys it (``model.normalize_message_id``)."""
    return normalize_message_id(message_id) or message_id
