"""The desktop side of a session: find facts in the IMAP inbox and Trash, apply actions.

This is where planned :mod:`imapsync_bridge.sync.ops` meet IMAP. Every action finds its
message by key (UID when known and still valid, else a Message-ID search), so applying it
again after a crash finds the work already done and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.errors import ImapError, MessageError
from imapsync_bridge.model import (
    DesktopFact,
    DesktopMessage,
    DesktopStatus,
    FlagChange,
    LedgerEntry,
    Where,
)
from imapsync_bridge.sync.normalize import window_of
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DesktopAction,
    DestroyOnDesktop,
    MoveOnDesktop,
    SetDesktopFlags,
)
from imapsync_bridge.sync.session import DesktopOutcome
from imapsync_bridge.sync.trigger import carries_phrase

log = logging.getLogger(__name__)

FetchFromPhone = Callable[[str], bytes]
A = TypeVar("A", bound=DesktopAction)
SCAN_LIMIT = 500  # newest (or new) messages looked at before searching key by key
DATE_SCAN_LIMIT = 5000  # lower UIDs whose date alone the window check may read


#: Seconds after a session at which the kept connection sends a NOOP (see CatchUp).
CATCH_UP_AFTER = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)
#: A catch-up NOOP's answer must come within this (a Maildir re-read at 200,000 messages
#: takes ~1 s); a path that died silently then costs this, not the 30 s IMAP timeout.
CATCH_UP_REPLY = 5.0


class CatchUp:
    """NOOPs on the kept connection in the seconds after a session, while nothing waits.

    Stock Dovecot Maildir (``maildir_very_dirty_syncs = no``) counts a ``cur/`` changed
    within ``MAILDIR_SYNC_SECS`` (1 s, whole seconds) of its last scan as dirty, and
    re-reads all of it at the first sync that comes later than that: 100-350 ms at
    50,000 messages. After a change the only syncs (the session's own, the IDLE
    processes' at the 0.5 s notice) come too early, so the *next* session paid it:
    a phone change seconds after a desktop one waited for it. A NOOP from 1 to 3 s
    after each session lets one of them pay it instead (a trace: the next SELECT + STATUS
    2-3 ms instead of 117-356 ms); each costs ~0.5 ms when there is nothing to re-read.
    Only with the inbox kept selected (a session started by a change): a NOOP with
    nothing selected syncs no mailbox.
    """

    def __init__(self) -> None:
        self._due: list[float] = []

    def after_session(self, now: float) -> None:
        self._due = [now + after for after in CATCH_UP_AFTER]

    def due(self) -> float | None:
        """When the next NOOP is due (monotonic seconds), if one is."""
        return self._due[0] if self._due else None

    def run_due(self, imap: ImapMailbox, inbox: str, now: float) -> None:
        """The NOOP if one is due (those missed while a session ran are dropped)."""
        if not self._due or now < self._due[0]:
            return
        self._due = [due for due in self._due if due > now]
        if imap.selected == inbox:
            imap.noop(CATCH_UP_REPLY)


class DesktopSide:
    """The desktop mailboxes as a session sees them.

    With a ``sync_phrase``, inbox mail whose Subject carries it (a trigger mail, valid or
    not) is invisible to the window: it is never pulled to the phone, also when a sync
    runs before the trigger watch removed it. Only mail not known yet is looked at (its
    Subject comes with the Message-ID the window fetches anyway).
    """

    def __init__(
        self,
        imap: ImapMailbox,
        inbox: str,
        trash: str,
        folders: Mapping[str, str] | None = None,
        sync_phrase: str | None = None,
    ) -> None:
        self.imap = imap
        self.inbox = inbox
        self.trash = trash
        #: every folder the agent resolved, by role (shown by `agent status`)
        self.folders = {"inbox": inbox, "trash": trash, **(folders or {})}
        self._hide: Callable[[str], bool] | None = (
            partial(carries_phrase, phrase=sync_phrase) if sync_phrase else None
        )

    def status(self, keep_inbox_selected: bool = False) -> DesktopStatus:
        """Both mailboxes' counts now, fresh, in one round trip: cheap enough to run
        before deciding to do anything.

        With CONDSTORE, both STATUSes, pipelined (UNSELECT first when the inbox is
        selected: :meth:`ImapMailbox.current_statuses`). A running agent's session
        started by a change instead *keeps the inbox selected*: it is SELECTed again
        with the Trash's STATUS pipelined (:meth:`ImapMailbox.select_with_statuses`),
        so the work after a change finds Dovecot's view of a large Maildir open rather
        than re-reading it (100-280 ms at 50,000 messages). A re-SELECT costs the
        server about twice a STATUS, so a check that usually finds nothing (a timer's,
        a one-shot `agent sync`) takes the STATUS way.

        Without CONDSTORE no count moves when only flags change, so the session goes on
        to compare the window's flags (:meth:`window_flags_agree`) in the inbox, which
        is SELECTed for that here either way.
        """
        if self.imap.condstore and not keep_inbox_selected:
            return DesktopStatus(*self.imap.current_statuses([self.inbox, self.trash]))
        inbox, (trash,) = self.imap.select_with_statuses(self.inbox, [self.trash])
        return DesktopStatus(inbox, trash)

    def window_flags_agree(self, ledger: Mapping[str, LedgerEntry]) -> bool:
        """Whether every inbox message the phone holds still has the flags the last
        session agreed on: one ``UID FETCH (FLAGS)`` of the window, O(window), for
        servers without CONDSTORE (no HIGHESTMODSEQ moves when only flags change)."""
        held = [
            e for e in ledger.values() if e.desktop is Where.INBOX and e.phone is not Where.GONE
        ]
        if any(e.uid is None for e in held):
            return False
        expected = {e.uid: e.flags for e in held if e.uid is not None}
        if not expected:
            return True
        self.imap.ensure_selected(self.inbox)
        return self.imap.flags(sorted(expected)) == expected

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
        mailbox = self._mailbox(where)
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
        for uid, (flags, modseq) in self.imap.flag_states(sorted(by_uid)).items():
            key = by_uid[uid]
            facts[key] = DesktopFact(where, flags, uid, ledger[key].internaldate, modseq)
        missing = keys - facts.keys()
        if not missing:
            return
        candidates = self.imap.uids_from(first) if first is not None else []
        complete = first is not None and len(candidates) <= SCAN_LIMIT
        if not complete:
            newest = self.imap.newest_uids(mailbox, SCAN_LIMIT)
            candidates = newest if newest is not None else self.imap.highest_uids(SCAN_LIMIT)
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
            found = _newest_first(self.imap.summaries(partial, known, self._hide))
            if len(partial) < wanted or _enough(found, count, skip):
                return window_of(found, count, skip)
        else:
            by_uid = self._newest_by_uid(count, skip, known, wanted)
            if by_uid is not None:
                return by_uid
        # Ties/skips at the edge of the partial answer, or old UIDs with new dates
        # beyond what is worth fetching one by one: sort everything.
        order = self.imap.inbox_order(self.inbox)
        found = []
        start = 0
        while len(window_of(found, count, skip)) < count and start < len(order):
            chunk = order[start : start + wanted]
            start += len(chunk)
            found = _newest_first(found + self.imap.summaries(chunk, known, self._hide))
        return window_of(found, count, skip)

    def _newest_by_uid(
        self, count: int, skip: set[str], known: Mapping[int, str], wanted: int
    ) -> list[DesktopMessage] | None:
        """The window without ESORT, in O(window): the messages with the highest UIDs,
        checked by INTERNALDATE — every lower UID dated on or after the day before the
        window's oldest message (``SEARCH SINCE``) is looked at too, so a message
        appended with an old UID order but a new date is not missed.

        SINCE counts whole days, so on a busy inbox it finds the hundreds of lower
        messages of the window's own days; their dates alone (one small fetch from the
        server's index cache) rule out all but those at or after the window's oldest
        message, and only those are fetched and ranked (usually none): no message file
        is opened for the others.
        None when that check would fetch too much (then sort everything)."""
        uids = self.imap.highest_uids(wanted)
        if not uids:
            return []
        found = _newest_first(self.imap.summaries(uids, known, self._hide))
        window = window_of(found, count, skip)
        if len(window) < count:
            return None  # not enough distinct messages up there (a small mailbox)
        edge = window[-1].internaldate
        lower = self.imap.uids_since(uids[0], edge.date() - timedelta(days=1))
        if len(lower) > DATE_SCAN_LIMIT:
            return None
        dated = self.imap.internaldates(lower) if lower else {}
        contenders = sorted(uid for uid, when in dated.items() if when >= edge)
        if len(contenders) > SCAN_LIMIT:
            return None
        if contenders:
            found = _newest_first(found + self.imap.summaries(contenders, known, self._hide))
            log.info("window: %d older UID(s) with recent dates ranked too", len(contenders))
        return window_of(found, count, skip)

    def newest_after_additions(
        self, last_window: list[DesktopMessage], since_uid: int, count: int
    ) -> list[DesktopMessage]:
        """The window when messages were only added since the last one was computed:
        the newest ``count`` of the last window and the UIDs from ``since_uid`` on."""
        self.imap.ensure_selected(self.inbox)
        added = self.imap.summaries(self.imap.uids_from(since_uid), hide=self._hide)
        log.info("window: %d message(s) added since UID %d, no full sort", len(added), since_uid)
        return window_of(_newest_first(last_window + added), count)

    def fetch_raws(
        self, uids: list[int], max_size: int, on_batch: Callable[[int], None] | None = None
    ) -> dict[int, bytes | MessageError]:
        self.imap.ensure_selected(self.inbox)
        return self.imap.fetch_raws(uids, max_size, on_batch)

    # -- actions ---------------------------------------------------------------------
    def apply_all(
        self,
        actions: Sequence[DesktopAction],
        facts: Mapping[str, DesktopFact],
        ledger: Mapping[str, LedgerEntry],
        fetch_from_phone: FetchFromPhone,
    ) -> DesktopOutcome:
        """Carry out the desktop actions; returns the ledger with new UIDs, per message
        whose action failed why, and the messages a user changed meanwhile.

        One IMAP command per kind and mailbox where IMAP allows it: moves grouped by
        source and destination, destroys of known UIDs, flag changes grouped by the
        flags to set. A group the server refuses is tried again one message at a time,
        so only the messages that really fail are reported. Moves come first, so flags
        land on a message's new home. Every action finds its message by what the facts
        and the ledger say now, so applying it again after a crash changes nothing.
        Flag changes touch only the flags the plan changes and, with CONDSTORE, only
        messages nobody changed since their facts were read (``UNCHANGEDSINCE``).
        """
        entries = dict(ledger)
        failed: dict[str, str] = {}
        changed: set[str] = set()
        moves = [a for a in actions if isinstance(a, MoveOnDesktop)]
        for (source, dest), move_group in _grouped(moves, lambda a: (facts[a.key].where, a.to)):
            if source is not dest:
                known = [a for a in move_group if facts[a.key].uid is not None]
                run = partial(self._move, facts=facts, entries=entries, source=source, dest=dest)
                self._each_or_all(known, run, failed)
        destroys = [a for a in actions if isinstance(a, DestroyOnDesktop)]
        for where, destroy_group in _grouped(destroys, lambda a: facts[a.key].where):
            self._each_or_all(
                destroy_group, partial(self._destroy, facts=facts, where=where), failed
            )
        appends = [a for a in actions if isinstance(a, AppendToDesktop)]
        for append in appends:
            run_append = partial(self._append, entries=entries, fetch_from_phone=fetch_from_phone)
            self._each_or_all([append], run_append, failed)
        flag_sets = [a for a in actions if isinstance(a, SetDesktopFlags) and a.key not in failed]
        guards = {a.key: _modseq_guard(facts[a.key], entries.get(a.key)) for a in flag_sets}
        for (home, change, guarded), flag_group in _grouped(
            flag_sets,
            lambda a: (_home(entries.get(a.key)), a.change, guards[a.key] is not None),
        ):
            since = max(guards[a.key] or 0 for a in flag_group) if guarded else None
            run_flags = partial(
                self._set_flags, entries=entries, where=home, change=change, since=since,
                changed=changed,
            )  # fmt: skip
            self._each_or_all(flag_group, run_flags, failed)
        return DesktopOutcome(entries, failed, changed - failed.keys())

    @staticmethod
    def _each_or_all(
        group: Sequence[A], run: Callable[[list[A]], None], failed: dict[str, str]
    ) -> None:
        if not group:
            return
        try:
            run(list(group))
        except (MessageError, ImapError) as exc:
            if len(group) == 1:
                failed[group[0].key] = f"{type(group[0]).__name__}: {exc}"
                return
            for action in group:
                DesktopSide._each_or_all([action], run, failed)

    def _mailbox(self, where: Where) -> str:
        return self.inbox if where is Where.INBOX else self.trash

    def _move(
        self,
        batch: list[MoveOnDesktop],
        facts: Mapping[str, DesktopFact],
        entries: dict[str, LedgerEntry],
        source: Where,
        dest: Where,
    ) -> None:
        self.imap.ensure_selected(self._mailbox(source))
        old = {facts[a.key].uid: a.key for a in batch}
        moved = self.imap.move([uid for uid in old if uid is not None], self._mailbox(dest))
        for uid, key in old.items():
            if key in entries:
                entries[key] = replace(entries[key], uid=moved.get(uid) if uid else None)
        log.info("moved %d message(s) to %s", len(batch), self._mailbox(dest))

    def _destroy(
        self, batch: list[DestroyOnDesktop], facts: Mapping[str, DesktopFact], where: Where
    ) -> None:
        self.imap.ensure_selected(self._mailbox(where))
        uids: list[int] = []
        for action in batch:
            uid = facts[action.key].uid
            # A message never seen under a UID here is looked for by its key.
            uids += [uid] if uid is not None else self.imap.locate(self._mailbox(where), action.key)
        self.imap.expunge_uids(uids)
        log.info("destroyed %d message(s) in %s", len(batch), self._mailbox(where))

    def _append(
        self,
        batch: list[AppendToDesktop],
        entries: dict[str, LedgerEntry],
        fetch_from_phone: FetchFromPhone,
    ) -> None:
        (action,) = batch
        mailbox = self._mailbox(action.to)
        self.imap.ensure_selected(mailbox)
        if self.imap.locate(mailbox, action.key):
            return  # already there: an earlier run appended it
        entry = entries.get(action.key)
        if entry is None or entry.internaldate is None:
            raise MessageError(f"{action.key}: the phone gave no arrival time to append it")
        raw = fetch_from_phone(action.key)
        uid = self.imap.append(mailbox, raw, entry.internaldate, action.flags)
        entries[action.key] = replace(entry, uid=uid)
        log.info("appended %s from the phone into %s", action.key, mailbox)

    def _set_flags(
        self,
        batch: list[SetDesktopFlags],
        entries: dict[str, LedgerEntry],
        where: Where,
        change: FlagChange,
        since: int | None,
        changed: set[str],
    ) -> None:
        mailbox = self._mailbox(where)
        self.imap.ensure_selected(mailbox)
        uids: dict[int, str] = {}
        for action in batch:
            entry = entries.get(action.key)
            uid = entry.uid if entry else None
            if uid is None:
                located = self.imap.locate(mailbox, action.key)
                uid = located[0] if located else None
                if entry is not None and uid is not None:
                    entries[action.key] = replace(entry, uid=uid)
            if uid is not None:
                uids[uid] = action.key
        refused = self.imap.store_flags(list(uids), change, since)
        changed.update(uids[uid] for uid in refused if uid in uids)


def _modseq_guard(fact: DesktopFact, entry: LedgerEntry | None) -> int | None:
    """The MODSEQ a conditional flag write may check: the one the facts were read at,
    while the message is still under the UID they were read for (not moved since)."""
    if entry is None or fact.modseq is None or fact.uid is None:
        return None
    return fact.modseq if entry.uid == fact.uid and _home(entry) is fact.where else None


def _home(entry: LedgerEntry | None) -> Where:
    """Where a message is on the desktop once the moves are done."""
    return Where.INBOX if entry is not None and entry.desktop is Where.INBOX else Where.TRASH


def _grouped(actions: Iterable[A], key: Callable[[A], Hashable]) -> list[tuple[Any, list[A]]]:
    """Actions grouped by ``key``, in the order each group first appears."""
    groups: dict[Hashable, list[A]] = {}
    for action in actions:
        groups.setdefault(key(action), []).append(action)
    return list(groups.items())


def _newest_first(messages: list[DesktopMessage]) -> list[DesktopMessage]:
    return sorted(messages, key=lambda m: (m.internaldate, m.uid), reverse=True)


def _enough(found: list[DesktopMessage], count: int, skip: set[str]) -> bool:
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
    return DesktopFact(where, message.flags, message.uid, message.internaldate, message.modseq)
