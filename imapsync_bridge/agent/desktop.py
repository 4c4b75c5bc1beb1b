"""The desktop side of a session: find facts in the IMAP inbox and Trash, apply actions.

This is where planned :mod:`imapsync_bridge.sync.ops` meet IMAP. Every action finds its
message by key (UID when known and still valid, else a Message-ID search), so applying it
again after a crash finds the work already done and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.imap_session import MailboxStatus
from imapsync_bridge.errors import MessageError
from imapsync_bridge.model import DesktopFact, DesktopMessage, LedgerEntry, Where
from imapsync_bridge.sync.normalize import window_of
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DesktopAction,
    DestroyOnDesktop,
    MoveOnDesktop,
    SetDesktopFlags,
)

log = logging.getLogger(__name__)

FetchFromPhone = Callable[[str], bytes]
SCAN_LIMIT = 500  # newest (or new) messages looked at before searching key by key


@dataclass(frozen=True)
class DesktopStatus:
    inbox: MailboxStatus
    trash: MailboxStatus

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DesktopStatus:
        data = json.loads(text)
        return cls(MailboxStatus(**data["inbox"]), MailboxStatus(**data["trash"]))

    def of(self, where: Where) -> MailboxStatus:
        return self.inbox if where is Where.INBOX else self.trash


class DesktopSide:
    def __init__(self, imap: ImapMailbox, inbox: str, trash: str) -> None:
        self.imap = imap
        self.inbox = inbox
        self.trash = trash

    def status(self) -> DesktopStatus:
        """Two STATUS commands; cheap enough to run before deciding to do anything.

        Nothing may be selected: Dovecot answers STATUS of the selected mailbox from the
        session's own view, which misses what other clients did since.
        """
        self.imap.unselect()
        return DesktopStatus(self.imap.status(self.inbox), self.imap.status(self.trash))

    # -- facts -----------------------------------------------------------------------
    def facts(
        self,
        keys: Iterable[str],
        ledger: Mapping[str, LedgerEntry],
        since: Mapping[Where, int | None],
    ) -> dict[str, DesktopFact]:
        """Where each key is now: the inbox, Trash, or gone (expunged).

        ``since[where]`` is the mailbox's UIDNEXT at the end of the last session, given
        only when its UIDVALIDITY has not changed: a known message that is no longer
        under its UID can then only be among the UIDs from there on (moved or restored
        messages get new UIDs), so no search is needed. Without it (first sync, new
        UIDVALIDITY) the newest messages are looked at first and only the rest is
        searched for by Message-ID, which on a large mailbox costs seconds per key.
        """
        facts: dict[str, DesktopFact] = {}
        wanted = set(keys)
        in_trash = {k for k in wanted if (e := ledger.get(k)) and e.desktop is Where.TRASH}
        # Trash first for what should be there, then the inbox, which is left selected
        # for the window scan; then Trash again only for what is still missing (it left
        # the inbox, or the ledger never knew it).
        passes = ((Where.TRASH, in_trash), (Where.INBOX, wanted), (Where.TRASH, wanted))
        for where, candidates in passes:
            keys_left = candidates - facts.keys()
            if keys_left:
                self._find_in(where, keys_left, ledger, since.get(where), facts)
        for key in wanted - facts.keys():
            facts[key] = DesktopFact(Where.GONE)
        return facts

    def _find_in(
        self,
        where: Where,
        keys: set[str],
        ledger: Mapping[str, LedgerEntry],
        first: int | None,
        facts: dict[str, DesktopFact],
    ) -> None:
        """Add to ``facts`` those of ``keys`` found in one mailbox."""
        mailbox = self.inbox if where is Where.INBOX else self.trash
        self.imap.ensure_selected(mailbox)
        by_uid = {
            entry.uid: key
            for key in keys
            if (entry := ledger.get(key)) is not None
            and entry.desktop is where
            and entry.uid is not None
        }
        # UIDs in the ledger belong to the current UIDVALIDITY (the session forgets
        # them when it changes), so a UID still present is still the same message.
        for uid, flags in self.imap.flags(sorted(by_uid)).items():
            key = by_uid[uid]
            facts[key] = DesktopFact(where, flags, uid, ledger[key].internaldate)
        missing = keys - facts.keys()
        if not missing:
            return
        candidates = self.imap.uids_from(first) if first is not None else []
        complete = first is not None and len(candidates) <= SCAN_LIMIT
        if not complete:
            newest = self.imap.newest_uids(mailbox, SCAN_LIMIT)
            candidates = newest if newest is not None else self.imap.inbox_order(mailbox)
        for message in self.imap.summaries(candidates[:SCAN_LIMIT]):
            if message.key in missing and message.key not in facts:
                facts[message.key] = _fact(where, message)
        unsure = missing - facts.keys()
        if complete:
            # Only a message whose UID here was never known can hide under an old UID.
            unsure = {
                key
                for key in unsure
                if (entry := ledger.get(key)) is None
                or (entry.desktop is where and entry.uid is None)
            }
        for key in sorted(unsure):
            found = self.imap.summaries(self.imap.locate(mailbox, key))
            if found:
                facts[key] = _fact(where, found[0])

    def newest(self, count: int, skip: set[str], known: Mapping[int, str]) -> list[DesktopMessage]:
        """The inbox newest first, enough to fill ``count`` distinct keys not in ``skip``.

        ``known`` maps inbox UIDs to keys the ledger already has (no header fetch for
        them). Reuses the inbox if it is selected: after a change Dovecot re-scans a
        Maildir on every SELECT for a while (~200 ms at 50,000 messages).
        """
        self.imap.ensure_selected(self.inbox)
        wanted = count + len(skip) + 8
        partial = self.imap.newest_uids(self.inbox, wanted)
        if partial is not None:
            found = _newest_first(self.imap.summaries(partial, known))
            if len(partial) < wanted or _enough(found, count, skip, wanted):
                return window_of(found, count, skip)
        # No ESORT, or ties/skips at the edge of the partial answer: sort everything.
        order = self.imap.inbox_order(self.inbox)
        found = []
        start = 0
        while len(window_of(found, count, skip)) < count and start < len(order):
            chunk = order[start : start + wanted]
            start += len(chunk)
            found = _newest_first(found + self.imap.summaries(chunk, known))
        return window_of(found, count, skip)

    def newest_after_additions(
        self, last_window: list[DesktopMessage], since_uid: int, count: int
    ) -> list[DesktopMessage]:
        """The window when messages were only added since the last one was computed:
        the newest ``count`` of the last window and the UIDs from ``since_uid`` on."""
        self.imap.ensure_selected(self.inbox)
        added = self.imap.summaries(self.imap.uids_from(since_uid))
        log.info("window: %d message(s) added since UID %d, no full sort", len(added), since_uid)
        return window_of(_newest_first(last_window + added), count)

    def fetch_raws(self, uids: list[int], max_size: int) -> dict[int, bytes | MessageError]:
        self.imap.ensure_selected(self.inbox)
        return self.imap.fetch_raws(uids, max_size)

    # -- actions ---------------------------------------------------------------------
    def apply(
        self,
        action: DesktopAction,
        fact: DesktopFact,
        entry: LedgerEntry | None,
        fetch_from_phone: FetchFromPhone,
    ) -> LedgerEntry | None:
        """Carry out one action; returns the ledger entry with its new UID, if any."""
        if isinstance(action, MoveOnDesktop):
            source = self.inbox if fact.where is Where.INBOX else self.trash
            dest = self.inbox if action.to is Where.INBOX else self.trash
            if fact.where is action.to or fact.uid is None:
                return entry
            self.imap.ensure_selected(source)
            moved = self.imap.move([fact.uid], dest)
            log.info("moved %s to %s", action.key, dest)
            return replace(entry, uid=moved.get(fact.uid)) if entry else entry
        if isinstance(action, DestroyOnDesktop):
            for mailbox in (self.inbox, self.trash):
                self.imap.ensure_selected(mailbox)
                uids = self.imap.locate(mailbox, action.key)
                if uids:
                    self.imap.expunge_uids(uids)
                    log.info("destroyed %s in %s", action.key, mailbox)
            return entry
        if isinstance(action, SetDesktopFlags):
            mailbox = self.inbox if (entry and entry.desktop is Where.INBOX) else self.trash
            uid = entry.uid if entry else None
            self.imap.ensure_selected(mailbox)
            if uid is None:
                located = self.imap.locate(mailbox, action.key)
                uid = located[0] if located else None
            if uid is not None:
                self.imap.store_flags(uid, action.flags)
            return replace(entry, uid=uid) if entry else entry
        if isinstance(action, AppendToDesktop):
            mailbox = self.inbox if action.to is Where.INBOX else self.trash
            self.imap.ensure_selected(mailbox)
            if self.imap.locate(mailbox, action.key):
                return entry  # already there: an earlier run appended it
            if entry is None or entry.internaldate is None:
                raise MessageError(f"{action.key}: the phone gave no arrival time to append it")
            raw = fetch_from_phone(action.key)
            uid = self.imap.append(mailbox, raw, entry.internaldate, action.flags)
            log.info("appended %s from the phone into %s", action.key, mailbox)
            return replace(entry, uid=uid)
        raise TypeError(f"unknown desktop action {action!r}")


def _newest_first(messages: list[DesktopMessage]) -> list[DesktopMessage]:
    return sorted(messages, key=lambda m: (m.internaldate, m.uid), reverse=True)


def _enough(found: list[DesktopMessage], count: int, skip: set[str], fetched: int) -> bool:
    """Whether a partial answer certainly holds the window.

    It does when the window fills before the oldest message fetched, and that oldest
    message's INTERNALDATE is not shared by a window message (a tie could hide an equal
    date just past the partial answer).
    """
    window = window_of(found, count, skip)
    if len(window) < count or not found:
        return False
    return window[-1].internaldate > found[-1].internaldate


def _fact(where: Where, message: DesktopMessage) -> DesktopFact:
    return DesktopFact(where, message.flags, message.uid, message.internaldate)


def ordered_for_apply(actions: Iterable[DesktopAction]) -> list[DesktopAction]:
    """Moves and appends before flag changes, so flags land on the message's new home."""
    first = (MoveOnDesktop, AppendToDesktop, DestroyOnDesktop)
    actions = list(actions)
    return [a for a in actions if isinstance(a, first)] + [
        a for a in actions if not isinstance(a, first)
    ]
