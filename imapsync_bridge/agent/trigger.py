"""The agent's half of the trigger mail (patent FIG. 11): find trigger mails in the inbox,
judge them (:mod:`imapsync_bridge.sync.trigger`), remove the valid ones.

The service loop calls :meth:`TriggerWatch.scan` between sessions, on its own IMAP
connection, whenever IDLE or its poll says the inbox changed; an ``accepted`` count above
zero means "sync now" (the loop merges bursts and keeps ``min_interval``).

A scan costs O(new mail): it remembers the highest UID it looked at (with the inbox's
UIDVALIDITY) and asks only for the few header fields of the UIDs above it. A valid
trigger's once-only key is recorded durably *before* the mail is expunged (UID EXPUNGE,
never to Trash), so neither a crash nor a byte-exact copy makes it count twice. Rejected
triggers (forged, stale, bad token, replayed) are left where they are and logged once,
without the phrase or the key. Mail the sync already knows (in the ledger: it came from
the phone, or was mapped before the phrase changed) is ordinary mail, never a trigger:
expunging it would read as a delete on the desktop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr, parsedate_to_datetime

from imapsync_bridge import model
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.state import AgentState
from imapsync_bridge.headers import display_text, raw_fields
from imapsync_bridge.sync.trigger import (
    TOKEN_HEADER,
    TriggerMail,
    TriggerSecret,
    Verdict,
    carries_phrase,
    judge,
    keep_used_for,
)

log = logging.getLogger(__name__)

#: The header fields a judgement reads (one small FETCH per scan).
FIELDS = ("SUBJECT", "FROM", "DATE", "MESSAGE-ID", TOKEN_HEADER.upper())
#: UIDs looked at on the first scan after pairing or a UIDVALIDITY change (the newest).
FIRST_SCAN = 200
#: At most this many new UIDs per scan, the highest: a trigger is the newest mail, and
#: older mail bulk-imported beside it would be stale anyway.
SCAN_LIMIT = 500
POSITION = "trigger_scan"  # agent state meta: "<uidvalidity>:<highest UID looked at>"


@dataclass(frozen=True)
class ScanResult:
    accepted: int  # valid triggers found (and expunged where the server allows)
    rejected: int  # phrase-carrying mails left in place: forged, stale, bad token, replay


def trigger_secret(state: AgentState) -> TriggerSecret | None:
    """What pairing left in the state, None before pairing (no trigger can count)."""
    meta = state.meta()
    phrase, key = meta.get("sync_phrase"), meta.get("trigger_key")
    if not phrase or not key:
        return None
    return TriggerSecret(
        phrase=phrase,
        key=bytes.fromhex(key),
        user=meta.get("user", ""),
        own_addresses=frozenset(json.loads(meta.get("own_addresses", "[]"))),
    )


def trigger_mail(uid: int, block: bytes) -> TriggerMail:
    """The judged fields of one mail from its raw header-fields block; never raises on
    hostile headers (unreadable values become empty or None)."""
    header = raw_fields(block)
    raw_token = header.get(TOKEN_HEADER.lower())
    return TriggerMail(
        uid=uid,
        subject=display_text(header.get("subject", "")),
        sender=_address(header.get("from", "")),
        date=_date(header.get("date")),
        token=" ".join(raw_token.split()) if raw_token is not None else None,
        message_id=model.normalize_message_id(header.get("message-id")),
        header_digest=hashlib.sha256(block.replace(b"\r\n", b"\n")).hexdigest(),
    )


def _address(value: str) -> str:
    """The first addr-spec of a From value, lower case ('' when there is none)."""
    try:
        address = parseaddr(value)[1]
    except (TypeError, ValueError, IndexError):
        return ""
    return address.strip().lower() if address.isascii() else ""


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class TriggerWatch:
    """Scans one inbox for trigger mails (see the module docstring)."""

    def __init__(
        self,
        imap: ImapMailbox,
        state: AgentState,
        mailbox: str = "INBOX",
        max_age: int = 900,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.imap = imap
        self.state = state
        self.mailbox = mailbox
        self.max_age = max_age
        self._clock = clock or (lambda: datetime.now(UTC))
        self._told_no_uidplus = False

    def scan(self) -> ScanResult:
        """Look at the inbox mail not looked at yet; act on valid triggers.

        One SELECT (a fresh view: new mail, UIDVALIDITY), one UID SEARCH, one FETCH of a
        few header fields of the new UIDs, and per valid trigger one durable state write
        and one UID EXPUNGE. Raises what :class:`ImapMailbox` raises (the service retries
        at its next wake-up; nothing was half done: a key is recorded before its expunge).
        """
        secret = trigger_secret(self.state)
        if secret is None:
            return ScanResult(0, 0)
        status = self.imap.select(self.mailbox)
        uids = self._new_uids(status.uidvalidity, status.messages)
        if not uids:
            return ScanResult(0, 0)
        blocks = self.imap.header_fields(uids, FIELDS)
        mails = [trigger_mail(uid, blocks[uid]) for uid in uids if uid in blocks]
        mails = [m for m in mails if carries_phrase(m.subject, secret.phrase)]
        accepted = rejected = 0
        if mails:
            known = set(self.state.ledger())
            used = self.state.used_trigger_keys()
            for mail in mails:
                if mail.message_id is not None and mail.message_id in known:
                    continue  # synced mail that happens to carry the phrase
                if self._act_on(mail, secret, used):
                    accepted += 1
                else:
                    rejected += 1
        self.state.set_many({POSITION: f"{status.uidvalidity}:{max(uids)}"}, durable=False)
        return ScanResult(accepted, rejected)

    def _new_uids(self, uidvalidity: int, messages: int) -> list[int]:
        """The UIDs above the remembered position; the newest few without one."""
        if messages == 0:
            return []
        saved = self.state.get(POSITION) or ""
        validity, _sep, last = saved.partition(":")
        if validity == str(uidvalidity) and last.isdigit():
            uids = self.imap.uids_from(int(last) + 1)
        else:
            uids = self.imap.highest_uids(FIRST_SCAN)
        if len(uids) > SCAN_LIMIT:
            log.info("trigger scan: %d new messages, looking at the newest %d", len(uids),
                     SCAN_LIMIT)  # fmt: skip
            uids = uids[-SCAN_LIMIT:]
        return uids

    def _act_on(self, mail: TriggerMail, secret: TriggerSecret, used: set[str]) -> bool:
        """Judge one phrase-carrying mail; True when it is a valid trigger."""
        now = self._clock()
        judgement = judge(mail, secret, now, self.max_age, used)
        if judgement.verdict is not Verdict.ACCEPT:
            log.warning(
                "trigger mail UID %d left in place: %s (%s)",
                mail.uid, judgement.verdict.value, judgement.reason,
            )  # fmt: skip
            return False
        self.state.use_trigger_key(judgement.once_key, now, keep_used_for(self.max_age))
        used.add(judgement.once_key)
        if self.imap.has("UIDPLUS"):
            self.imap.expunge_uids([mail.uid])
            log.info("trigger mail UID %d accepted (%s) and expunged", mail.uid, judgement.reason)
        else:
            if not self._told_no_uidplus:
                log.warning(
                    "the IMAP server lacks UIDPLUS: trigger mails cannot be expunged alone, "
                    "so they stay in the inbox (never shown on the phone)"
                )
                self._told_no_uidplus = True
            log.info("trigger mail UID %d accepted (%s)", mail.uid, judgement.reason)
        return True
