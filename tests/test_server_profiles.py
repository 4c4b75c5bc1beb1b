"""The paths the agent takes on servers other than stock Dovecot (issue 5, docs/compat.md).

Each test runs against Dovecot profiles that stand in for Exchange, Cyrus and Courier
(tests/dovecot.py): folders found as those servers name them, the window found without
ESORT, fresh counts without UNSELECT, and a cheap no-change sync without CONDSTORE.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge
from dovecot import CYRUS_LIKE, EXCHANGE_LIKE, Dovecot

from imapsync_bridge.agent import runner
from imapsync_bridge.agent.desktop import DesktopSide
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.session import SyncSession
from imapsync_bridge.config import load_agent_config
from imapsync_bridge.sync.session import SessionReport

T0 = dt.datetime(2024, 3, 1, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def bridge(profiled_dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(profiled_dovecot, tmp_path, window=4).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def connect(dovecot: Dovecot, user: str) -> ImapMailbox:
    return ImapMailbox.connect(
        dovecot.host, dovecot.port, security="none", username=user, password=dovecot.password
    )


def test_agent_status_shows_the_folders_it_found(bridge: Bridge) -> None:
    bridge.deliver(1)
    bridge.sync_ok()
    profile = bridge.dovecot.profile
    assert bridge.agent_status()["folders"] == {
        "inbox": "INBOX",
        "trash": profile.trash,
        "sent": profile.sent,
        "outbox": profile.folder("Outbox"),  # created under the personal namespace
    }
    with bridge.dovecot.client(bridge.user) as client:
        names = [name for _flags, _sep, name in client.list_folders()]
    assert profile.folder("Outbox") in names
    assert "Trash" not in names or profile.trash == "Trash"  # no stray top-level Trash


def test_a_folder_that_cannot_be_created_names_the_key_to_set(tmp_path: Path) -> None:
    """A configured Trash a Cyrus-like server refuses to create (outside its ``INBOX.``
    namespace): the sync fails with one line saying which [imap] key to set."""
    with Dovecot(profile=CYRUS_LIKE) as dovecot:
        bridge = Bridge(dovecot, tmp_path, window=4).start()
        try:
            bridge.pair()
            text = bridge.agent_ini.read_text().replace("[imap]\n", "[imap]\ntrash = Papierkorb\n")
            bridge.agent_ini.write_text(text)
            bridge.deliver(1)
            rc, _out, err = bridge.sync()
            assert rc == 1
            line = err.strip().splitlines()[-1]
            assert "cannot create the trash folder 'Papierkorb'" in line
            assert "`trash = <name of your trash folder>` in the [imap] section" in line
            assert "Papierkorb" in bridge.agent_status()["last_error"]
        finally:
            bridge.stop()


def test_no_change_without_condstore_is_three_round_trips_and_sees_a_flag(
    bridge: Bridge,
) -> None:
    """A running agent (connections kept): a no-change session is SELECT, one FLAGS fetch
    of the window and STATUS of Trash; a \\Seen set in the mail client is still seen."""
    ids = [bridge.deliver(n) for n in range(1, 9)]
    config = load_agent_config(bridge.agent_ini)
    state = runner.open_state(config)
    options = runner.session_options(config, False)
    with runner.open_link(config) as link, runner.connect_imap(config, count_traffic=True) as imap:
        desktop = runner.open_desktop(config, imap)
        assert SyncSession(state, desktop, link, options).run().fast_path is False
        SyncSession(state, desktop, link, options).run()  # after our own writes
        before = imap.round_trips
        report = SyncSession(state, desktop, link, options).run()
        assert report.fast_path is True
        assert imap.round_trips - before <= 3
    state.close()
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[-1])], [b"\\Seen"])
    bridge.sync_ok()
    assert bridge.phone_list()["inbox"][0]["seen"] is True
    bridge.assert_in_sync()


def test_a_running_agent_keeps_the_inbox_selected_and_sees_every_change(
    bridge: Bridge,
) -> None:
    """Connections kept, as `agent run` does: a session started by a change reads the
    counts by SELECTing the inbox again, and leaves it selected for the next; a timer's
    session while the push link vouches for the phone is one pipelined exchange of at
    most three commands. A flag set in the mail client shows either way."""
    ids = [bridge.deliver(n) for n in range(1, 9)]
    config = load_agent_config(bridge.agent_ini)
    state = runner.open_state(config)
    options = runner.session_options(config, False)
    with runner.open_link(config) as link, runner.connect_imap(config, count_traffic=True) as imap:
        desktop = runner.open_desktop(config, imap)

        def session(**kwargs: bool) -> SessionReport:
            return SyncSession(state, desktop, link, options, **kwargs).run()

        assert session(keep_inbox_selected=True).pulled == 4
        session(keep_inbox_selected=True)  # after our own writes
        assert imap.selected == "INBOX"
        before = imap.round_trips
        assert session(phone_vouched=True).fast_path is True
        assert imap.round_trips - before <= 3
        for n, flag in ((1, b"\\Seen"), (2, b"\\Flagged")):
            with bridge.imap() as client:
                client.add_flags([bridge.desktop_uid(ids[-n])], [flag])
            report = session(phone_vouched=True, keep_inbox_selected=n == 2)  # timer, IDLE
            assert report.phone_actions == 1
        assert imap.selected == "INBOX"
    state.close()
    phone = bridge.phone_list()["inbox"]
    assert phone[0]["seen"] is True and phone[1]["flagged"] is True
    bridge.assert_in_sync()


@pytest.mark.parametrize("profile", [EXCHANGE_LIKE, CYRUS_LIKE], ids=lambda p: p.name)
def test_window_without_esort_ranks_old_uids_with_new_dates(profile, tmp_path: Path) -> None:
    """Without ESORT the window comes from the highest UIDs checked by INTERNALDATE: a
    message with a low UID but the newest date (an import, a restored message) is in it."""
    with Dovecot(profile=profile) as dovecot:
        bridge = Bridge(dovecot, tmp_path, window=4).start()
        try:
            bridge.pair()
            newest = bridge.deliver(1, minutes=10_000)  # UID 1, dated after everything
            ids = [bridge.deliver(n) for n in range(2, 40)]
            bridge.sync_ok()
            assert bridge.phone_inbox_ids() == [newest, *list(reversed(ids))[:3]]
            bridge.assert_in_sync()
        finally:
            bridge.stop()


def test_a_busy_day_below_the_window_costs_its_dates_only(caplog, tmp_path: Path) -> None:
    """Without ESORT, more than SCAN_LIMIT messages of the window's own day below it
    (SINCE matches whole days) and one old UID with the newest date: the window is
    still found from the highest UIDs, ranking only that one message beside them (the
    others' dates rule them out), not by sorting the whole inbox."""
    with Dovecot(profile=EXCHANGE_LIKE) as dovecot:
        user = dovecot.new_user()
        newest = T0 + dt.timedelta(hours=12)
        with dovecot.client(user) as client:
            client.append("INBOX", dovecot.make_message(0, date=newest), msg_time=newest)
            for n in range(1, 601):
                date = T0 + dt.timedelta(seconds=n)
                client.append("INBOX", dovecot.make_message(n, date=date), msg_time=date)
        with connect(dovecot, user) as mbox:
            desktop = DesktopSide(mbox, "INBOX", EXCHANGE_LIKE.trash)
            with caplog.at_level(logging.INFO, logger="imapsync_bridge.agent.desktop"):
                window = desktop.newest(4, set(), {})
    assert [m.uid for m in window] == [1, 601, 600, 599]
    assert "window: 1 older UID(s) with recent dates ranked too" in caplog.text


def test_highest_uids_and_uids_since(dovecot: Dovecot, imap_user: str) -> None:
    for n in range(1, 11):
        dovecot.append(imap_user, dovecot.make_message(n), T0 + dt.timedelta(days=n))
    with connect(dovecot, imap_user) as mbox:
        mbox.select("INBOX")
        assert mbox.highest_uids(3) == [8, 9, 10]
        assert mbox.highest_uids(50) == list(range(1, 11))
        day_five = (T0 + dt.timedelta(days=5)).date()
        assert mbox.uids_since(8, day_five) == [5, 6, 7]
        assert mbox.uids_since(1, day_five) == []


def test_counts_of_the_selected_mailbox_are_fresh_without_unselect(tmp_path: Path) -> None:
    """No UNSELECT (and CLOSE would expunge): the selected mailbox is selected again."""
    with Dovecot(profile=CYRUS_LIKE) as dovecot:
        user = dovecot.new_user()
        dovecot.append(user, dovecot.make_message(1), T0)
        with connect(dovecot, user) as mbox:
            assert not mbox.has("UNSELECT")
            mbox.select("INBOX")
            assert mbox.current_status("INBOX").messages == 1
            dovecot.append(user, dovecot.make_message(2), T0)  # another client delivers
            with dovecot.client(user) as other:
                other.select_folder("INBOX")
                other.add_flags(other.search("ALL"), [b"\\Deleted"])  # marked, not expunged
            status = mbox.current_status("INBOX")
            assert status.messages == 2 and mbox.selected == "INBOX"
        with dovecot.client(user) as check:
            assert check.select_folder("INBOX")[b"EXISTS"] == 2  # nothing was expunged
