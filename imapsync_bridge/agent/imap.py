"""The agent's IMAP adapter: the desktop mailbox seen through ``imapclient``.

Everything that talks IMAP goes through :class:`ImapMailbox`; imapclient, imaplib,
socket and ssl exceptions never leave this module (see the class docstring for what
each of ours means).
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from imapclient.response_parser import parse_message_list

from imapsync_bridge import model
from imapsync_bridge.agent import folders
from imapsync_bridge.agent.imap_data import (
    PARTIAL,
    by_uid,
    chunks,
    expand_set,
    fetch_item,
    flags_of,
    modseq_of,
    msgset,
    raw_or_error,
    size_batches,
    utc,
)
from imapsync_bridge.agent.imap_idle import ImapWatching
from imapsync_bridge.errors import (
    ImapError,
    MessageError,
)
from imapsync_bridge.headers import display_text, parse_headers, raw_fields

log = logging.getLogger(__name__)

#: How many of a mailbox's newest messages :meth:`ImapMailbox.locate` scans for a
#: ``sha256:`` key (a message without a Message-ID cannot be searched for).
HASH_SCAN_LIMIT = 2000
#: fetch_raws batches: few enough bytes that each reports progress within seconds on a
#: slow line (a service's watchdog waits minutes), many enough messages per round trip.
FETCH_BATCH, FETCH_BATCH_BYTES = 50, 4_000_000

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.I)
_COPYUID = re.compile(rb"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]", re.I)
_COPYUID_DATA = re.compile(rb"^(\d+) ([\d:,]+) ([\d:,]+)")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MODIFIED = re.compile(rb"\[MODIFIED ([\d:,]+)\]", re.I)


class ImapMailbox(ImapWatching):
    """One logged-in IMAP session to the desktop mail server.

    Work on the *selected* mailbox (:meth:`select`; :meth:`inbox_order` and
    :meth:`locate` select the mailbox they are given) and speak in UIDs only.

    Errors (everything else from imapclient/imaplib/socket/ssl is translated):

    ``ConnectionLost`` (a ``TransientError``)
        The connection failed, dropped, timed out or the server said BYE. The session
        is dead: every later call raises ``ConnectionLost`` again. Retry later with a
        new :meth:`connect`. Whether the last command took effect is unknown, so what
        follows must be idempotent (look before you append or move again).
    ``AuthError``
        Login refused, TLS certificate not trusted, or STARTTLS asked for and not
        offered. Retrying does not help until the configuration or password changes.
    ``ConfigError``
        The arguments are unusable (plain text to a non-loopback host, unknown
        security mode). Fix the configuration.
    ``ImapError``
        The server answered NO or BAD to a command that is not about one message
        (SELECT of a missing mailbox, CREATE refused, a capability we need missing).
        The session is still usable; the operation did not happen. A later sync may
        try again; it does not go away by itself.
    ``MessageError``
        One message cannot be handled (gone, larger than allowed, unparseable FETCH
        data). The session is still usable: quarantine or skip that message and go on.

    Counters for benchmarks and tests, kept only when asked (``connect(count_traffic=
    True)``): :attr:`round_trips` (commands sent, including login) and :attr:`bytes_read`
    (bytes received from the server, after TLS).

    Where imapclient 4.1 has no public way, this class and its base
    :class:`~imapsync_bridge.agent.imap_session.ImapSession` — and nothing else — use the
    imaplib connection under it (``_uid_command``, the counters, clearing stale
    untagged responses): ``UID SORT RETURN (PARTIAL ...)`` (ESORT), the untagged
    ``COPYUID`` Dovecot sends for MOVE (imapclient's ``move()`` drops it), and
    ``UID FETCH 1:*`` (imapclient's ``fetch()`` raises on it, see FACTS.md). Tests in
    ``tests/test_imap_adapter.py`` pin each of these against a real Dovecot, so an
    imapclient upgrade that changes them fails loudly.
    """

    def find_folders(self, configured: Mapping[str, str | None]) -> dict[str, folders.Choice]:
        """The folder for each role of :data:`folders.ROLES` (trash, sent, outbox), and
        whether it exists, without creating anything (``agent check`` shows this).

        *configured* maps a role name to the ``[imap]`` setting (empty = find it).
        One LIST; NAMESPACE only when a folder is not found without it.
        """
        with self._guard("LIST"):
            listing = self._client.list_folders()
        listed = [folders.Listed.of(name, flags) for flags, _sep, name in listing]
        separator = next((sep for _f, sep, _n in listing if sep), b"/")
        sep_text = separator.decode() if isinstance(separator, bytes) else str(separator)

        def choose_all(prefix: str, sep: str) -> dict[str, folders.Choice]:
            return {
                role.name: folders.choose(role, listed, configured.get(role.name), prefix, sep)
                for role in folders.ROLES
            }

        choices = choose_all("", sep_text)
        if not all(c.exists for c in choices.values()) and self.has("NAMESPACE"):
            prefix, sep_text = self._personal_namespace(sep_text)
            choices = choose_all(prefix, sep_text)
        return choices

    def resolve_folders(self, configured: Mapping[str, str | None]) -> dict[str, str]:
        """:meth:`find_folders`, creating under the personal namespace those missing.
        ImapError naming the ``[imap]`` key to set when a folder cannot be created."""
        choices = self.find_folders(configured)
        for role, choice in choices.items():
            if not choice.exists:
                self._create(choice.name, role)
            log.info("%s folder: %s (%s)", role, choice.name, choice.how)
        return {role: choice.name for role, choice in choices.items()}

    def _personal_namespace(self, default_separator: str) -> tuple[str, str]:
        with self._guard("NAMESPACE"):
            spaces = self._client.namespace()
        personal = spaces.personal or ()
        if not personal:
            return "", default_separator
        prefix, sep = personal[0][0], personal[0][1]
        return str(prefix or ""), str(sep or default_separator)

    def _create(self, name: str, role: str) -> None:
        with self._guard(f"CREATE {name}"):
            try:
                self._client.create_folder(name)
            except imaplib.IMAP4.error as exc:
                # Someone else may have created it meanwhile.
                again = {n.lower() for _f, _s, n in self._client.list_folders()}
                if name.lower() not in again:
                    reason = exc.args[0] if exc.args else exc
                    if isinstance(reason, bytes):
                        reason = reason.decode("utf-8", "replace")
                    raise ImapError(
                        f"cannot create the {role} folder {name!r} ({reason}): set "
                        f"`{role} = <name of your {role} folder>` in the [imap] section"
                    ) from exc
            with contextlib.suppress(imaplib.IMAP4.error):
                self._client.subscribe_folder(name)

    # -- reading ------------------------------------------------------------------------------

    def inbox_order(self, mailbox: str) -> list[int]:
        """All UIDs of *mailbox* (selected now if it is not), newest INTERNALDATE first;
        equal INTERNALDATEs: higher UID first.

        With SORT: ``UID SORT (ARRIVAL)`` reversed (SORT breaks ties by sequence
        number ascending, also under REVERSE, so reversing the ascending result gives
        the wanted tie order). Without: one ``UID FETCH 1:* (INTERNALDATE)``.
        """
        self.ensure_selected(mailbox)
        with self._guard(f"order of {mailbox}"):
            if self.has("SORT"):
                _text, untagged = self._uid_command("SORT", "(ARRIVAL)", "US-ASCII", "ALL")
                uids = parse_message_list(untagged.pop("SORT", []))
                return list(reversed(uids))
            data = self._fetch("1:*", "UID INTERNALDATE")
        dated = [(utc(d[b"INTERNALDATE"]), uid) for uid, d in data.items()]
        dated.sort(reverse=True)
        return [uid for _date, uid in dated]

    def newest_uids(self, mailbox: str, count: int) -> list[int] | None:
        """Up to *count* UIDs of *mailbox*, newest INTERNALDATE first, in one small answer.

        ``UID SORT RETURN (PARTIAL 1:count) (REVERSE ARRIVAL)`` (ESORT + RFC 5267): the
        server sorts, only the window comes back, not all UIDs of a 50,000-message inbox.
        Equal INTERNALDATEs come back lowest UID first; callers re-sort what they fetch.
        None when the server does not offer it (use :meth:`inbox_order`).
        """
        if count <= 0 or not (self.has("ESORT") and self.has("CONTEXT=SEARCH")):
            return None
        self.ensure_selected(mailbox)
        with self._guard(f"newest of {mailbox}"):
            _text, untagged = self._uid_command(
                "SORT", "RETURN", f"(PARTIAL 1:{count})", "(REVERSE ARRIVAL)", "US-ASCII", "ALL"
            )
        for line in untagged.pop("ESEARCH", []):
            found = PARTIAL.search(line if isinstance(line, bytes) else bytes(line))
            if found:
                return [] if found.group(1) == b"NIL" else expand_set(found.group(1))
        return []

    def highest_uids(self, count: int) -> list[int]:
        """The UIDs of the selected mailbox's last *count* messages (the highest UIDs),
        ascending: ``UID SEARCH n:*`` over sequence numbers, an answer of O(count).

        The newest mail usually has the highest UIDs; callers check that by INTERNALDATE
        (:meth:`uids_since`). A stale message count only widens or narrows the range.
        """
        self._require_selected()
        if count <= 0:
            return []
        first = max(self._exists - count + 1, 1)
        with self._guard("SEARCH newest"):
            _text, untagged = self._uid_command("SEARCH", f"{first}:*")
        return sorted(parse_message_list(untagged.pop("SEARCH", [])))

    def uids_since(self, below_uid: int, day: date) -> list[int]:
        """UIDs under *below_uid* whose INTERNALDATE falls on *day* or later
        (``UID SEARCH UID 1:n SINCE day``; SINCE ignores the time of day and zone)."""
        self._require_selected()
        if below_uid <= 1:
            return []
        since = day.strftime("%d-%b-%Y")
        with self._guard("SEARCH SINCE"):
            _text, untagged = self._uid_command(
                "SEARCH", "UID", f"1:{below_uid - 1}", "SINCE", since
            )
        return sorted(u for u in parse_message_list(untagged.pop("SEARCH", [])) if u < below_uid)

    def internaldates(self, uids: Sequence[int]) -> dict[int, datetime]:
        """INTERNALDATE (UTC) of each of *uids* in the selected mailbox (absent = gone):
        ``UID FETCH (INTERNALDATE)``, answered from the server's index cache without
        opening a message file, ~40 bytes a message."""
        self._require_selected()
        wanted = set(uids)
        out: dict[int, datetime] = {}
        with self._guard("FETCH INTERNALDATE"):
            for chunk in chunks(sorted(wanted)):
                for uid, data in self._fetch(msgset(chunk), "UID INTERNALDATE").items():
                    if uid in wanted and b"INTERNALDATE" in data:
                        out[uid] = utc(data[b"INTERNALDATE"])
        return out

    def fetch_raws(
        self,
        uids: Sequence[int],
        max_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[int, bytes | MessageError]:
        """Whole messages (BODY.PEEK[]: \\Seen not set) in batches of at most
        FETCH_BATCH messages and about FETCH_BATCH_BYTES, sized by one ``RFC822.SIZE``
        fetch first; ``on_batch(done)`` after each, so a long first sync shows progress
        and keeps a service's watchdog fed however slow the line.

        Each UID maps to its bytes, or to the MessageError that makes it unusable (gone,
        larger than *max_size*: such a message's body is never transferred).
        """
        self._require_selected()
        sizes: dict[int, int] = {}
        with self._guard("FETCH sizes"):
            for chunk in chunks(sorted(set(uids))):
                for uid, item in self._fetch(msgset(chunk), "UID RFC822.SIZE").items():
                    if b"RFC822.SIZE" in item:
                        sizes[uid] = int(item[b"RFC822.SIZE"])
        out: dict[int, bytes | MessageError] = {}
        wanted = []
        for uid in uids:
            if uid in sizes and sizes[uid] <= max_size:
                wanted.append(uid)
            else:  # gone or too large: the error a fetch would give, without the body
                known = {b"RFC822.SIZE": sizes[uid]} if uid in sizes else None
                out[uid] = raw_or_error(uid, known, max_size, self._selected)
        for batch in size_batches(wanted, sizes, FETCH_BATCH, FETCH_BATCH_BYTES):
            with self._guard("FETCH messages"):
                data = self._fetch(msgset(batch), f"UID RFC822.SIZE BODY.PEEK[]<0.{max_size + 1}>")
            for uid in batch:
                out[uid] = raw_or_error(uid, data.get(uid), max_size, self._selected)
            if on_batch is not None:
                on_batch(len(out))
        return out

    def summaries(
        self,
        uids: Sequence[int],
        known: Mapping[int, str] | None = None,
        hide: Callable[[str], bool] | None = None,
    ) -> list[model.DesktopMessage]:
        """Key, INTERNALDATE (UTC), size and flags of each of *uids* in the selected
        mailbox, in the order of *uids*; UIDs that no longer exist are left out.

        *known* maps UIDs whose key the caller already has (a UID never changes its
        message while UIDVALIDITY holds); their header is not fetched, which spares the
        server opening those message files. *hide* is asked about the decoded Subject of
        every other message (fetched with its Message-ID, no extra command); those it
        says yes to are left out too: trigger mails are not part of the synced inbox.
        """
        self._require_selected()
        if not uids:
            return []
        wanted = set(uids)
        known = {uid: key for uid, key in (known or {}).items() if uid in wanted}
        found: dict[int, dict[bytes, Any]] = {}
        basic = "UID FLAGS INTERNALDATE RFC822.SIZE" + (" MODSEQ" if self.condstore else "")
        fields = "MESSAGE-ID SUBJECT" if hide is not None else "MESSAGE-ID"
        with self._guard("FETCH summaries"):
            for items, group in (
                (basic, sorted(known)),
                (f"{basic} BODY.PEEK[HEADER.FIELDS ({fields})]", sorted(wanted - known.keys())),
            ):
                for chunk in chunks(group):
                    found.update(self._fetch(msgset(chunk), items))
        keys: dict[int, str] = {uid: key for uid, key in known.items() if uid in found}
        need_header: list[int] = []
        for uid, data in found.items():
            if uid not in wanted or uid in known:
                continue
            named = raw_fields(fetch_item(data, b"BODY[HEADER.FIELDS") or b"")
            if hide is not None and hide(display_text(named.get("subject", ""))):
                continue
            mid = model.normalize_message_id(named.get("message-id"))
            if mid:
                keys[uid] = mid
            else:
                need_header.append(uid)
        if need_header:
            with self._guard("FETCH headers"):
                headers = self._fetch(msgset(need_header), "UID RFC822.SIZE BODY.PEEK[HEADER]")
            for uid in need_header:
                hdata = headers.get(uid)
                header = fetch_item(hdata, b"BODY[HEADER") if hdata else None
                if hdata is None or header is None:
                    continue  # expunged between the two commands
                keys[uid] = model.message_key(header, int(hdata[b"RFC822.SIZE"]))[0]
        out: list[model.DesktopMessage] = []
        seen: set[int] = set()
        for uid in uids:
            if uid in seen or uid not in keys:
                continue
            seen.add(uid)
            data = found[uid]
            try:
                out.append(
                    model.DesktopMessage(
                        uid=uid,
                        key=keys[uid],
                        internaldate=utc(data[b"INTERNALDATE"]),
                        size=int(data[b"RFC822.SIZE"]),
                        flags=flags_of(data.get(b"FLAGS", ())),
                        modseq=modseq_of(data),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise MessageError(f"UID {uid}: incomplete FETCH data: {exc!r}") from exc
        return out

    def header_fields(self, uids: Sequence[int], names: Sequence[str]) -> dict[int, bytes]:
        """The named header fields of each of *uids* in the selected mailbox, as the raw
        block ``BODY.PEEK[HEADER.FIELDS (...)]`` returns (\\Seen is not set); UIDs that
        no longer exist are absent. O(len(uids)): the server opens only those messages."""
        self._require_selected()
        wanted = set(uids)
        out: dict[int, bytes] = {}
        items = f"UID BODY.PEEK[HEADER.FIELDS ({' '.join(names)})]"
        with self._guard("FETCH header fields"):
            for chunk in chunks(sorted(wanted)):
                for uid, data in self._fetch(msgset(chunk), items).items():
                    block = fetch_item(data, b"BODY[HEADER.FIELDS")
                    if uid in wanted and block is not None:
                        out[uid] = block
        return out

    def flags(self, uids: Sequence[int]) -> dict[int, model.Flags]:
        """\\Seen/\\Flagged of *uids* in the selected mailbox (absent = gone)."""
        return {uid: flags for uid, (flags, _modseq) in self.flag_states(uids).items()}

    def flag_states(self, uids: Sequence[int]) -> dict[int, tuple[model.Flags, int | None]]:
        """Flags of *uids* in the selected mailbox with the MODSEQ they were read at
        (None without CONDSTORE), for a later conditional STORE; absent = gone."""
        self._require_selected()
        wanted = set(uids)
        out: dict[int, tuple[model.Flags, int | None]] = {}
        items = "UID FLAGS MODSEQ" if self.condstore else "UID FLAGS"
        with self._guard("FETCH FLAGS"):
            for chunk in chunks(sorted(wanted)):
                for uid, data in self._fetch(msgset(chunk), items).items():
                    if uid in wanted and b"FLAGS" in data:
                        out[uid] = (flags_of(data[b"FLAGS"]), modseq_of(data))
        return out

    def existing(self, uids: Iterable[int]) -> set[int]:
        """Which of *uids* still exist in the selected mailbox (``UID SEARCH UID set``)."""
        self._require_selected()
        wanted = sorted(set(uids))
        out: set[int] = set()
        with self._guard("SEARCH UID"):
            for chunk in chunks(wanted):
                _text, untagged = self._uid_command("SEARCH", "UID", msgset(chunk))
                out.update(parse_message_list(untagged.pop("SEARCH", [])))
        return out & set(wanted)

    def uids_from(self, first: int) -> list[int]:
        """UIDs >= *first* in the selected mailbox, ascending (``UID SEARCH UID first:*``).

        ``first:*`` also matches the highest UID when it is below *first* (RFC 3501
        ranges are unordered), so that one is filtered out.
        """
        self._require_selected()
        with self._guard("SEARCH UID"):
            _text, untagged = self._uid_command("SEARCH", "UID", f"{max(first, 1)}:*")
        return sorted(uid for uid in parse_message_list(untagged.pop("SEARCH", [])) if uid >= first)

    def locate(self, mailbox: str, key: str) -> list[int]:
        """UIDs in *mailbox* (which this selects) of the message with this key.

        Message-ID keys: ``UID SEARCH HEADER Message-ID`` (a substring search), then
        each hit is confirmed by its own Message-ID. ``sha256:`` keys (and Message-IDs
        that are not ASCII): the headers of the newest :data:`HASH_SCAN_LIMIT`
        messages are hashed; an older copy is not found.
        """
        self.ensure_selected(mailbox)
        message_id = model.message_id_of(key)
        if message_id is not None and message_id.isascii():
            with self._guard(f"SEARCH Message-ID in {mailbox}"):
                hits = self._client.search(["HEADER", "Message-ID", key])
                if not hits:
                    return []
                data = self._fetch(msgset(hits), "UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]")
            out = []
            for uid in sorted(data):
                fields = fetch_item(data[uid], b"BODY[HEADER.FIELDS") or b""
                raw = parse_headers(fields).get("Message-ID")
                if raw and model.normalize_message_id(raw.encode("utf-8", "surrogateescape")) == (
                    key
                ):
                    out.append(uid)
            return out
        newest = self.inbox_order(mailbox)[:HASH_SCAN_LIMIT]
        out = []
        with self._guard(f"scan headers in {mailbox}"):
            for chunk in chunks(newest, 500):
                data = self._fetch(msgset(chunk), "UID RFC822.SIZE BODY.PEEK[HEADER]")
                for uid, d in data.items():
                    header = fetch_item(d, b"BODY[HEADER")
                    if header is None or b"RFC822.SIZE" not in d:
                        continue
                    if model.message_key(header, int(d[b"RFC822.SIZE"]))[0] == key:
                        out.append(uid)
        return sorted(out)

    # -- changing ------------------------------------------------------------------------------

    def store_flags(
        self, uids: Sequence[int], change: model.FlagChange, unchanged_since: int | None = None
    ) -> set[int]:
        """Set or clear exactly the flags *change* names on *uids* (``+FLAGS`` /
        ``-FLAGS``, one STORE per direction); every other flag is left as it is.

        With *unchanged_since* (CONDSTORE, RFC 7162) each STORE is conditional: a message
        whose MODSEQ moved past it — a user changed it since the plan read its flags — is
        left alone and returned, for the next session to plan again. The second STORE is
        conditional on the MODSEQs the first one reported, so our own first write does
        not refuse the second. MessageError naming the UIDs that no longer exist.
        """
        self._require_selected()
        targets = set(uids)
        if not targets or not change:
            return set()
        named = (("\\Seen", change.seen), ("\\Flagged", change.flagged))
        add = [name for name, value in named if value is True]
        remove = [name for name, value in named if value is False]
        since = unchanged_since if self.condstore else None
        reported: set[int] = set()
        modified: set[int] = set()
        with self._guard(f"STORE {len(targets)} message(s)"):
            for op, names in (("+FLAGS", add), ("-FLAGS", remove)):
                if not names or not targets:
                    continue
                written: dict[int, dict[bytes, Any]] = {}
                for chunk in chunks(sorted(targets)):
                    condition = [f"(UNCHANGEDSINCE {since})"] if since is not None else []
                    text, untagged = self._uid_command(
                        "STORE", msgset(chunk), *condition, op, f"({' '.join(names)})"
                    )
                    written.update(by_uid(untagged.get("FETCH", [])))
                    found = _MODIFIED.search(text)
                    if found:
                        modified.update(expand_set(found.group(1)))
                targets -= modified
                reported.update(written)
                modseqs = [m for d in written.values() if (m := modseq_of(d)) is not None]
                if since is not None and modseqs:
                    since = max(since, *modseqs)
        # UID STORE on a missing UID is a silent no-op: look whether they still exist.
        unsure = targets - reported
        gone = sorted(unsure - self.existing(unsure)) if unsure else []
        if gone:
            raise MessageError(f"UID(s) {msgset(gone)} in {self._selected} no longer exist")
        if modified:
            log.info(
                "%d message(s) changed by someone else meanwhile: left for the next sync",
                len(modified),
            )
        return modified

    def move(self, uids: Sequence[int], dest: str) -> dict[int, int]:
        """Move *uids* of the selected mailbox to *dest*; returns old UID → new UID
        (from COPYUID; empty when the server does not say). MOVE when offered, else
        COPY + \\Deleted + UID EXPUNGE of exactly these UIDs (needs UIDPLUS)."""
        self._require_selected()
        uids = sorted(set(uids))
        if not uids:
            return {}
        if not self.has("MOVE") and not self.has("UIDPLUS"):
            raise ImapError("server offers neither MOVE nor UIDPLUS: cannot move safely")
        mapping: dict[int, int] = {}
        with self._guard(f"MOVE to {dest}"):
            for chunk in chunks(uids):
                uid_set = msgset(chunk)
                if self.has("MOVE"):
                    text, untagged = self._uid_command("MOVE", uid_set, self._folder(dest))
                else:
                    text, untagged = self._uid_command("COPY", uid_set, self._folder(dest))
                mapping.update(self._copyuid(text, untagged))
                if not self.has("MOVE"):
                    self._store(chunk, "+FLAGS.SILENT", "\\Deleted")
                    self._uid_command("EXPUNGE", uid_set)
                self._exists = max(self._exists - len(chunk), 0)
        return mapping

    @staticmethod
    def _copyuid(text: bytes, untagged: dict[str, list]) -> dict[int, int]:
        found = _COPYUID.search(text)
        if found:
            src, dst = found.group(2), found.group(3)
        else:
            # MOVE sends COPYUID in an untagged OK before the EXPUNGEs; imaplib files
            # it under "COPYUID".
            data = [d for d in untagged.get("COPYUID", []) if d]
            m = _COPYUID_DATA.match(data[-1]) if data else None
            if not m:
                return {}
            src, dst = m.group(2), m.group(3)
        old, new = expand_set(src), expand_set(dst)
        if len(old) != len(new):
            return {}
        return dict(zip(old, new, strict=True))

    def expunge_uids(self, uids: Sequence[int]) -> None:
        """\\Deleted + ``UID EXPUNGE`` of exactly *uids* (never a plain EXPUNGE, which
        would also remove other messages marked \\Deleted). Needs UIDPLUS."""
        self._require_selected()
        uids = sorted(set(uids))
        if not uids:
            return
        if not self.has("UIDPLUS"):
            raise ImapError("server lacks UIDPLUS: cannot expunge single messages safely")
        with self._guard("UID EXPUNGE"):
            for chunk in chunks(uids):
                self._store(chunk, "+FLAGS.SILENT", "\\Deleted")
                self._uid_command("EXPUNGE", msgset(chunk))
                self._exists = max(self._exists - len(chunk), 0)

    def append(
        self, mailbox: str, raw: bytes, internaldate: datetime, flags: model.Flags
    ) -> int | None:
        """APPEND *raw* to *mailbox* with this INTERNALDATE (timezone-aware) and flags;
        returns the new UID (APPENDUID), or None when the server does not say.
        Bare LF line ends are sent as CRLF (imaplib does that)."""
        if internaldate.tzinfo is None:
            raise ValueError("internaldate must be timezone-aware")
        names = [n for n, on in (("\\Seen", flags.seen), ("\\Flagged", flags.flagged)) if on]
        with self._guard(f"APPEND to {mailbox}"):
            self._client._imap.untagged_responses.clear()
            resp = self._client.append(mailbox, raw, flags=names, msg_time=internaldate)
        found = _APPENDUID.search(resp if isinstance(resp, bytes) else str(resp).encode())
        return int(found.group(2)) if found else None
