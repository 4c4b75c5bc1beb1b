"""The agent's IMAP adapter against a real Dovecot (tests/dovecot.py): no mocks."""

from __future__ import annotations

import re
import socket
import ssl
from datetime import UTC, datetime, timedelta, timezone

import pytest
from dovecot import Dovecot

from imapsync_bridge import model
from imapsync_bridge.agent.imap import FETCH_BATCH, ImapMailbox
from imapsync_bridge.agent.imap_data import size_batches
from imapsync_bridge.agent.imap_session import MailboxStatus
from imapsync_bridge.errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    ImapError,
    MessageError,
    TransientError,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def connect(dovecot, user) -> ImapMailbox:
    return ImapMailbox.connect(
        dovecot.host,
        dovecot.port,
        security="none",
        username=user,
        password=dovecot.password,
        timeout=10,
    )


@pytest.fixture
def mbox(dovecot, imap_user):
    with connect(dovecot, imap_user) as m:
        yield m


def inbox_keys(m: ImapMailbox) -> list[str]:
    m.select("INBOX")
    return [s.key for s in m.summaries(m.inbox_order("INBOX"))]


# -- connecting -----------------------------------------------------------------------------


def test_wrong_password_is_auth_error_naming_user_and_server():
    # Own instance: a failed login would slow the shared one's next logins (auth penalty).
    with Dovecot() as own:
        with pytest.raises(AuthError) as err:
            ImapMailbox.connect(own.host, own.port, security="none", username="bob", password="x")
        text = str(err.value)
        assert "'bob'" in text
        assert f"{own.host}:{own.port}" in text
        assert "refused" in text and "Authentication failed" in text


@pytest.mark.parametrize("host", ["192.0.2.10", "mail.example.com", "10.0.0.1"])
def test_plain_text_to_non_loopback_host_is_config_error(host):
    with pytest.raises(ConfigError, match="loopback"):
        ImapMailbox.connect(host, 143, security="none", username="u", password="p")


def test_unknown_security_mode_is_config_error():
    with pytest.raises(ConfigError, match="security"):
        ImapMailbox.connect("127.0.0.1", 143, security="ssl", username="u", password="p")


def test_nothing_listening_is_connection_lost():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(ConnectionLost) as err:
            ImapMailbox.connect("127.0.0.1", port, security="none", username="u", password="p")
    assert isinstance(err.value, TransientError)


def test_capabilities_after_login(mbox):
    assert {"IMAP4REV1", "UIDPLUS", "MOVE", "CONDSTORE", "SORT"} <= mbox.capabilities
    assert all(c == c.upper() for c in mbox.capabilities)


def test_implicit_tls_with_pinned_certificate(dovecot, imap_user):
    with ImapMailbox.connect(
        "localhost",
        dovecot.tls_port,
        security="tls",
        username=imap_user,
        password=dovecot.password,
        ssl_context=dovecot.ssl_context(),
    ) as m:
        assert m.status("INBOX").messages == 0
        assert m._client.socket().version() in ("TLSv1.2", "TLSv1.3")


def test_starttls_with_pinned_certificate(dovecot, imap_user):
    with ImapMailbox.connect(
        "localhost",
        dovecot.port,
        security="starttls",
        username=imap_user,
        password=dovecot.password,
        ssl_context=dovecot.ssl_context(),
    ) as m:
        assert m.status("INBOX").messages == 0
        assert isinstance(m._client.socket(), ssl.SSLSocket)


def test_untrusted_certificate_is_auth_error(dovecot, imap_user):
    with pytest.raises(AuthError, match="certificate"):
        ImapMailbox.connect(
            "localhost",
            dovecot.tls_port,
            security="tls",
            username=imap_user,
            password=dovecot.password,
        )  # system CAs only: the self-signed test certificate is not trusted


def test_dropped_connection_is_connection_lost_and_stays_dead(mbox):
    mbox.select("INBOX")
    mbox._client.socket().shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectionLost):
        mbox.status("INBOX")
    with pytest.raises(ConnectionLost):
        mbox.select("INBOX")


def test_missing_mailbox_is_imap_error_and_session_goes_on(mbox):
    with pytest.raises(ImapError, match="NoSuchBox"):
        mbox.select("NoSuchBox")
    assert mbox.select("INBOX").messages == 0


def test_round_trip_and_byte_counters_only_when_asked(dovecot, imap_user, mbox):
    mbox.status("INBOX")
    assert (mbox.round_trips, mbox.bytes_read) == (0, 0)  # production: not instrumented
    with ImapMailbox.connect(
        dovecot.host, dovecot.port, security="none", username=imap_user,
        password=dovecot.password, count_traffic=True,
    ) as counted:  # fmt: skip
        before_rt, before_bytes = counted.round_trips, counted.bytes_read
        counted.status("INBOX")
        assert counted.round_trips == before_rt + 1
        assert counted.bytes_read > before_bytes


# -- mailboxes ---------------------------------------------------------------------------------


def test_status_and_select_report_the_same_mailbox(dovecot, imap_user, mbox):
    for n in range(3):
        dovecot.append(imap_user, dovecot.make_message(n), T0)
    st = mbox.status("INBOX")
    sel = mbox.select("INBOX")
    assert isinstance(st, MailboxStatus)
    assert (st.uidvalidity, st.uidnext, st.messages) == (sel.uidvalidity, 4, 3)
    assert sel.uidnext == 4 and sel.messages == 3
    assert st.highestmodseq is not None and sel.highestmodseq is not None


def test_current_statuses_pipelined_are_fresh(dovecot, imap_user):
    """The running agent's change check: the selected inbox left and both mailboxes'
    STATUS sent in one write; what another client did meanwhile shows."""
    with connect(dovecot, imap_user) as counted:
        counted.resolve_folders({})
        counted.select("INBOX")
        dovecot.append(imap_user, dovecot.make_message(1), T0)  # another client's new mail
        with connect(dovecot, imap_user) as other:
            other.select("INBOX")
        inbox, trash = counted.current_statuses(["INBOX", "Trash"])
        assert (inbox.messages, inbox.uidnext, trash.messages) == (1, 2, 0)
        assert inbox == counted.status("INBOX") and trash == counted.status("Trash")
        assert inbox.highestmodseq is not None
        with pytest.raises(ImapError):
            counted.current_statuses(["INBOX", "No Such Folder"])


def test_select_with_statuses_is_fresh_and_keeps_the_inbox_selected(dovecot, imap_user):
    """The running agent's change check: the inbox SELECTed again and Trash's STATUS
    sent in one write; what another client did meanwhile shows, and the inbox stays
    selected for the session's work."""
    with ImapMailbox.connect(
        dovecot.host, dovecot.port, security="none", username=imap_user,
        password=dovecot.password, count_traffic=True,
    ) as counted:  # fmt: skip
        counted.resolve_folders({})
        counted.select("INBOX")
        dovecot.append(imap_user, dovecot.make_message(1), T0)  # another client's new mail
        with connect(dovecot, imap_user) as other:
            other.select("INBOX")
            other.store_flags(other.highest_uids(1), model.FlagChange(seen=True))
        before = counted.round_trips
        inbox, (trash,) = counted.select_with_statuses("INBOX", ["Trash"])
        assert counted.round_trips - before == 2  # SELECT and STATUS, in one write
        assert (inbox.messages, inbox.uidnext, trash.messages) == (1, 2, 0)
        assert inbox.highestmodseq is not None
        assert counted.selected == "INBOX" and counted.highest_uids(5) == [1]
        assert counted.flags([1]) == {1: model.Flags(seen=True, flagged=False)}
        with pytest.raises(ImapError):
            counted.select_with_statuses("INBOX", ["No Such Folder"])
        with pytest.raises(ImapError):
            counted.select_with_statuses("No Such Folder", ["Trash"])
        assert counted.selected is None
        inbox, _ = counted.select_with_statuses("INBOX", [])
        assert inbox.messages == 1 and counted.selected == "INBOX"


def test_pipelined_statuses_of_folders_with_awkward_names(dovecot, imap_user, mbox):
    """The STATUS answers read by the adapter's own quick parser agree with
    imapclient's for names with spaces, parentheses, quotes and non-ASCII letters."""
    names = ["Deleted Items", "Projects (old)", 'Say "hi"', "Entwürfe"]
    for n, name in enumerate(names):
        mbox._client.create_folder(name)
        for k in range(n + 1):
            dovecot.append(imap_user, dovecot.make_message(10 * n + k), T0, mailbox=name)
    _inbox, statuses = mbox.select_with_statuses("INBOX", names)
    assert statuses == [mbox.status(name) for name in names] == mbox.current_statuses(names)
    assert [s.messages for s in statuses] == [1, 2, 3, 4]


def test_resolve_folders_finds_trash_and_sent_by_special_use_and_creates_outbox(mbox):
    found = mbox.resolve_folders({})
    assert found == {"trash": "Trash", "sent": "Sent", "outbox": "Outbox"}
    assert mbox.status("Outbox").messages == 0
    assert mbox.resolve_folders({}) == found  # idempotent: found, not created again


def test_resolve_folders_configured_name_wins_and_is_created(mbox):
    assert mbox.resolve_folders({"trash": "Papierkorb"})["trash"] == "Papierkorb"
    assert mbox.select("Papierkorb").messages == 0


def test_reset_uidvalidity_really_changes_uidvalidity(dovecot, imap_user):
    for n in range(3):
        dovecot.append(imap_user, dovecot.make_message(n), T0 + timedelta(minutes=n))
    with connect(dovecot, imap_user) as m:
        before = m.status("INBOX")
        keys_before = inbox_keys(m)
    dovecot.reset_uidvalidity(imap_user)
    with connect(dovecot, imap_user) as m:
        after = m.status("INBOX")
        assert after.uidvalidity != before.uidvalidity
        assert after.messages == 3
        assert inbox_keys(m) == keys_before  # same messages, same order


# -- reading -----------------------------------------------------------------------------------


def test_inbox_order_is_by_internaldate_not_uid(dovecot, imap_user, mbox):
    offsets = [5, 1, 9, 3, 3, 7]  # appended in this order: UIDs 1..6
    for n, hours in enumerate(offsets):
        dovecot.append(imap_user, dovecot.make_message(n), T0 + timedelta(hours=hours))
    mbox.select("INBOX")
    order = mbox.inbox_order("INBOX")
    # newest first; the two messages at +3h tie: the higher UID (5) first
    assert order == [3, 6, 1, 5, 4, 2]
    dates = [s.internaldate for s in mbox.summaries(order)]
    assert dates == sorted(dates, reverse=True)


def test_inbox_order_selects_the_mailbox_and_handles_empty(mbox):
    assert mbox.inbox_order("INBOX") == []
    assert mbox.selected == "INBOX"


def test_inbox_order_without_sort_falls_back_to_internaldate(dovecot, imap_user, mbox):
    for n, hours in enumerate([2, 0, 1, 1]):
        dovecot.append(imap_user, dovecot.make_message(n), T0 + timedelta(hours=hours))
    mbox._capabilities = mbox.capabilities - {"SORT"}  # as on a server without SORT
    assert mbox.inbox_order("INBOX") == [1, 4, 3, 2]


def test_summaries_keys_flags_and_utc_dates(dovecot, imap_user, mbox):
    cest = timezone(timedelta(hours=2))
    raw1 = dovecot.make_message(1)
    raw2 = dovecot.make_message(2, message_id=False)
    uid1 = dovecot.append(imap_user, raw1, datetime(2024, 6, 1, 12, 30, tzinfo=cest), [b"\\Seen"])
    uid2 = dovecot.append(imap_user, raw2, T0, [b"\\Flagged", b"$Label1"])
    uid3 = dovecot.append(imap_user, dovecot.make_message(3), T0, [b"\\Seen", b"\\Flagged"])
    mbox.select("INBOX")
    got = mbox.summaries([uid3, uid1, 999, uid2])
    assert [s.uid for s in got] == [uid3, uid1, uid2]  # order as asked, missing left out
    s3, s1, s2 = got
    assert s1.key == model.normalize_message_id(raw1.split(b"Message-ID: ")[1].split(b"\r\n")[0])
    assert s1.key.startswith("<msg1.")
    assert s1.internaldate == datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    assert s1.internaldate.utcoffset() == timedelta(0)
    assert s1.flags == model.Flags(seen=True, flagged=False)
    assert s2.flags == model.Flags(seen=False, flagged=True)
    assert s3.flags == model.Flags(seen=True, flagged=True)
    assert s1.size == len(raw1)
    header2 = raw2.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert s2.key == model.header_hash_key(header2, len(raw2))
    assert s2.key == model.message_key(header2, len(raw2))[0]
    # summaries do not mark anything read
    assert mbox.flags([uid2])[uid2] == model.Flags(seen=False, flagged=True)


def test_summaries_of_8bit_nul_and_broken_mime_messages(dovecot, imap_user, mbox):
    broken = (
        b"From: =?utf-8?q?Bj=C3=B6rn?= <bjorn@example.com>\n"
        b"Subject: caf\xe9 \xff\xfe raw 8-bit\n"
        b"Message-ID: <broken.8bit@test.example.com>\n"
        b'Content-Type: multipart/mixed; boundary="never-closed"\n'
        b"Content-Transfer-Encoding: base64\n"
        b"\n"
        b"--never-closed\n"
        b'Content-Type: text/plain; charset="no-such-charset\n'
        b"\n"
        b"NUL here:\x00 and \xc3\x28 invalid utf-8 !!!not base64!!!\n"
    )
    no_id = b"Subject: \xe4\xf6\xfc no id\nFrom: x@example.com\n\nbody\x00with nul\n"
    dovecot.deliver_file(imap_user, broken, T0)
    dovecot.deliver_file(imap_user, no_id, T0 + timedelta(hours=1))
    mbox.select("INBOX")
    order = mbox.inbox_order("INBOX")
    newest, oldest = mbox.summaries(order)
    assert oldest.key == "<broken.8bit@test.example.com>"
    assert oldest.internaldate == T0
    assert newest.internaldate == T0 + timedelta(hours=1)
    assert newest.key.startswith("sha256:")
    # the same key a second look (e.g. after a move) computes from the stored bytes
    assert mbox.locate("INBOX", newest.key) == [newest.uid]
    assert mbox.locate("INBOX", oldest.key) == [oldest.uid]
    raw = mbox.fetch_raws([oldest.uid], 10_000)[oldest.uid]
    assert isinstance(raw, bytes)
    assert b"<broken.8bit@test.example.com>" in raw and b"caf\xe9" in raw


def test_flags_and_existing(dovecot, imap_user, mbox):
    a = dovecot.append(imap_user, dovecot.make_message(1), T0, [b"\\Seen"])
    b = dovecot.append(imap_user, dovecot.make_message(2), T0)
    mbox.select("INBOX")
    assert mbox.flags([a, b, 77]) == {a: model.Flags(seen=True), b: model.Flags()}
    assert mbox.existing([a, b, 77, 78]) == {a, b}
    mbox.expunge_uids([a])
    assert mbox.existing([a, b]) == {b}


def test_locate_by_message_id_in_trash_confirms_the_header(dovecot, imap_user, mbox):
    target = b"Message-ID: <Case@Example.COM>\r\nSubject: target\r\n\r\nbody\r\n"
    decoy = b"Message-ID: <case@example.com>\r\nSubject: decoy\r\n\r\nbody\r\n"
    dovecot.append(imap_user, target, T0)
    dovecot.append(imap_user, decoy, T0)
    mbox.select("INBOX")
    trash = mbox.resolve_folders({})["trash"]
    moved = mbox.move([1, 2], trash)
    # SEARCH HEADER is a case-insensitive substring search: both match, one is ours
    assert mbox.locate(trash, "<Case@Example.COM>") == [moved[1]]
    assert mbox.locate(trash, "<case@example.com>") == [moved[2]]
    assert mbox.locate(trash, "<nobody@example.com>") == []
    assert mbox.locate("INBOX", "<Case@Example.COM>") == []


def test_fetch_raws_exact_bytes_limit_and_gone(dovecot, imap_user, mbox):
    raw = dovecot.make_message(1)
    uid = dovecot.append(imap_user, raw, T0)
    mbox.select("INBOX")
    assert mbox.fetch_raws([uid], len(raw)) == {uid: raw}
    assert mbox.flags([uid])[uid].seen is False  # BODY.PEEK
    too_large = mbox.fetch_raws([uid], len(raw) - 1)[uid]
    assert isinstance(too_large, MessageError) and re.search("larger", str(too_large))
    gone = mbox.fetch_raws([uid + 1], 10_000)[uid + 1]
    assert isinstance(gone, MessageError) and re.search("no longer exists", str(gone))


def test_fetch_raws_reports_each_batch_and_skips_bodies_too_large(dovecot, imap_user, mbox):
    raws = [dovecot.make_message(n) for n in range(FETCH_BATCH + 12)]
    big = dovecot.make_message(99, body="x" * 20_000)
    uids = [dovecot.append(imap_user, raw, T0) for raw in [*raws, big]]
    mbox.select("INBOX")
    done: list[int] = []
    got = mbox.fetch_raws([*uids, uids[-1] + 1], 10_000, done.append)
    assert [got[uid] for uid in uids[:-1]] == raws
    assert "larger" in str(got[uids[-1]]) and "no longer exists" in str(got[uids[-1] + 1])
    assert done == [FETCH_BATCH + 2, FETCH_BATCH + 14], "each batch counted, errors at once"


@pytest.mark.parametrize(
    ("sizes", "batches"),
    [
        ([], []),
        ([10, 10], [[0, 1]]),  # within both limits: one batch
        ([10] * 5, [[0, 1], [2, 3], [4]]),  # at most 2 messages
        ([60, 50, 10, 100], [[0], [1, 2], [3]]),  # at most 100 bytes
        ([500, 10], [[0], [1]]),  # larger than the limit: alone
    ],
)
def test_size_batches(sizes: list[int], batches: list[list[int]]) -> None:
    uids = list(range(len(sizes)))
    assert list(size_batches(uids, dict(enumerate(sizes)), 2, 100)) == batches


# -- changing -----------------------------------------------------------------------------------


def test_store_flags_sets_exactly_seen_and_flagged_leaving_others(dovecot, imap_user, mbox):
    uid = dovecot.append(imap_user, dovecot.make_message(1), T0, [b"\\Answered", b"$Work"])
    mbox.select("INBOX")
    mbox.store_flags([uid], model.FlagChange(seen=True, flagged=True))
    assert mbox.flags([uid])[uid] == model.Flags(seen=True, flagged=True)
    mbox.store_flags([uid], model.FlagChange(seen=False))
    assert mbox.flags([uid])[uid] == model.Flags(seen=False, flagged=True)
    mbox.store_flags([uid], model.FlagChange(seen=False, flagged=True))  # no change: fine
    with dovecot.client(imap_user) as c:
        c.select_folder("INBOX", readonly=True)
        assert set(c.get_flags([uid])[uid]) == {b"\\Answered", b"$Work", b"\\Flagged"}
    with pytest.raises(MessageError):
        mbox.store_flags([uid + 5], model.FlagChange(seen=True))


def test_store_flags_touches_only_the_flags_it_changes(dovecot, imap_user, mbox):
    """Another client reads the message between our read and our write: the read stays."""
    uid = dovecot.append(imap_user, dovecot.make_message(1), T0)
    mbox.select("INBOX")
    assert mbox.flags([uid])[uid] == model.Flags()
    with dovecot.client(imap_user) as other:
        other.select_folder("INBOX")
        other.add_flags([uid], [b"\\Seen"])
    assert mbox.store_flags([uid], model.FlagChange(flagged=True)) == set()
    assert mbox.flags([uid])[uid] == model.Flags(seen=True, flagged=True)


def test_conditional_store_leaves_a_message_changed_since_it_was_read(dovecot, imap_user, mbox):
    """UNCHANGEDSINCE (RFC 7162): a write planned from stale flags is refused for the
    message another client changed, and done for the others, both directions."""
    changed = dovecot.append(imap_user, dovecot.make_message(1), T0, [b"\\Seen"])
    untouched = dovecot.append(imap_user, dovecot.make_message(2), T0, [b"\\Seen"])
    mbox.select("INBOX")
    states = mbox.flag_states([changed, untouched])
    since = max(modseq for _flags, modseq in states.values() if modseq is not None)
    with dovecot.client(imap_user) as other:
        other.select_folder("INBOX")
        other.remove_flags([changed], [b"\\Seen"])  # the user marks it unread ...
        other.add_flags([changed], [b"\\Seen"])  # ... and read again: same flags, new MODSEQ
    refused = mbox.store_flags(
        [changed, untouched], model.FlagChange(seen=False, flagged=True), since
    )
    assert refused == {changed}
    assert mbox.flags([changed, untouched]) == {
        changed: model.Flags(seen=True),
        untouched: model.Flags(seen=False, flagged=True),
    }


def test_move_to_trash_returns_new_uids_and_keeps_internaldate(dovecot, imap_user, mbox):
    dates = [T0 + timedelta(days=n) for n in range(4)]
    uids = [dovecot.append(imap_user, dovecot.make_message(n), d) for n, d in enumerate(dates)]
    mbox.select("INBOX")
    before = {s.uid: s for s in mbox.summaries(uids)}
    trash = mbox.resolve_folders({})["trash"]
    mapping = mbox.move([uids[0], uids[2], uids[3]], trash)
    assert set(mapping) == {uids[0], uids[2], uids[3]}
    assert mbox.existing(uids) == {uids[1]}
    mbox.select(trash)
    after = {s.uid: s for s in mbox.summaries(list(mapping.values()))}
    for old, new in mapping.items():
        assert after[new].key == before[old].key
        assert after[new].internaldate == before[old].internaldate
        assert after[new].flags == before[old].flags


def test_move_without_move_capability_uses_copy_and_uid_expunge(dovecot, imap_user, mbox):
    uids = [dovecot.append(imap_user, dovecot.make_message(n), T0) for n in range(3)]
    with dovecot.client(imap_user) as other:  # someone else's \Deleted message
        other.select_folder("INBOX")
        other.add_flags([uids[0]], [b"\\Deleted"])
    mbox.select("INBOX")
    mbox._capabilities = mbox.capabilities - {"MOVE"}
    mapping = mbox.move([uids[1]], "Trash")
    assert list(mapping) == [uids[1]]
    assert mbox.existing(uids) == {uids[0], uids[2]}  # the other \Deleted one stays
    assert mbox.locate("Trash", mbox_key(mbox, "Trash", mapping[uids[1]])) == [mapping[uids[1]]]


def mbox_key(mbox: ImapMailbox, mailbox: str, uid: int) -> str:
    mbox.select(mailbox)
    return mbox.summaries([uid])[0].key


def test_append_keeps_internaldate_flags_and_returns_uid(dovecot, imap_user, mbox):
    when = datetime(2023, 12, 24, 18, 0, 5, tzinfo=timezone(timedelta(hours=-5)))
    raw = dovecot.make_message(42)
    uid = mbox.append("INBOX", raw, when, model.Flags(seen=True))
    assert isinstance(uid, int)
    mbox.select("INBOX")
    (s,) = mbox.summaries([uid])
    assert s.internaldate == datetime(2023, 12, 24, 23, 0, 5, tzinfo=UTC)
    assert s.flags == model.Flags(seen=True, flagged=False)
    assert s.key.startswith("<msg42.")
    assert mbox.fetch_raws([uid], 100_000) == {uid: raw}
    with pytest.raises(ValueError):
        mbox.append("INBOX", raw, datetime(2024, 1, 1), model.Flags())


def test_append_to_missing_mailbox_is_imap_error(dovecot, mbox):
    with pytest.raises(ImapError):
        mbox.append("No/Such", dovecot.make_message(1), T0, model.Flags())


def test_expunge_uids_leaves_other_deleted_messages_alone(dovecot, imap_user, mbox):
    uids = [dovecot.append(imap_user, dovecot.make_message(n), T0) for n in range(4)]
    with dovecot.client(imap_user) as other:  # the user's mail program marked one \Deleted
        other.select_folder("INBOX")
        other.add_flags([uids[3]], [b"\\Deleted"])
    mbox.select("INBOX")
    mbox.expunge_uids([uids[0], uids[1]])
    assert mbox.existing(uids) == {uids[2], uids[3]}
    with dovecot.client(imap_user) as c:
        c.select_folder("INBOX", readonly=True)
        assert b"\\Deleted" in c.get_flags([uids[3]])[uids[3]]


def test_commands_needing_a_selected_mailbox_say_so(mbox):
    with pytest.raises(ImapError, match="no mailbox selected"):
        mbox.summaries([1])


def test_locate_message_id_with_quote_and_backslash(dovecot, imap_user, mbox):
    raw = b'Message-ID: <we"ird\\id@example.com>\r\nSubject: odd\r\n\r\nbody\r\n'
    uid = dovecot.append(imap_user, raw, T0)
    mbox.select("INBOX")
    (s,) = mbox.summaries([uid])
    assert s.key == '<we"ird\\id@example.com>'
    assert mbox.locate("INBOX", s.key) == [uid]


def test_empty_mailbox_queries(mbox):
    st = mbox.select("INBOX")
    assert st.messages == 0
    assert mbox.summaries([1, 2]) == []
    assert mbox.flags([1]) == {} and mbox.existing([1]) == set()
    assert mbox.move([], "Trash") == {}
    mbox._capabilities = mbox.capabilities - {"SORT"}
    assert mbox.inbox_order("INBOX") == []
