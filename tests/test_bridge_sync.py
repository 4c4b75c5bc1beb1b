"""End to end on loopback: real Dovecot, the hosted server over mutual TLS, the agent.

Each test is one of the user stories of the core sync (issue 2, tests 1-5, 8, 9).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge
from dovecot import Dovecot
from proxy import RewritingProxy


@pytest.fixture
def bridge(profiled_dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    """The product on each server profile (full Dovecot, Exchange-like, Cyrus-like)."""
    b = Bridge(profiled_dovecot, tmp_path, window=6).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def test_first_sync_fills_the_phone_with_the_newest_six(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 31)]
    bridge.sync_ok()
    assert bridge.phone_inbox_ids() == list(reversed(ids))[:6]
    bridge.assert_in_sync()
    assert bridge.agent_status()["mapped"] == 6
    assert len(bridge.desktop_ids()) == 30  # the desktop is untouched


def test_window_follows_internaldate_not_arrival_order(bridge: Bridge) -> None:
    ids = {n: bridge.deliver(n) for n in (5, 1, 9, 3, 7, 2, 8, 4, 6)}
    bridge.sync_ok()
    assert bridge.phone_inbox_ids() == [ids[n] for n in (9, 8, 7, 6, 5, 4)]


def test_new_mail_evicts_the_oldest_phone_message_and_keeps_the_desktop_copy(
    bridge: Bridge,
) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    oldest_on_phone = ids[4]
    assert oldest_on_phone in bridge.phone_inbox_ids()
    new = bridge.deliver(11)
    bridge.sync_ok()
    phone = bridge.phone_inbox_ids()
    assert phone[0] == new
    assert oldest_on_phone not in phone
    assert oldest_on_phone in bridge.desktop_ids()  # evicted, not deleted
    assert bridge.phone_list()["trash"] == []
    bridge.assert_in_sync()
    # A further sync changes nothing: eviction was not mistaken for a delete.
    bridge.sync_ok()
    assert oldest_on_phone in bridge.desktop_ids()
    assert bridge.desktop_ids(bridge.trash) == []


def test_delete_and_restore_on_the_phone(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    target = ids[8]
    bridge.phone("delete", str(bridge.phone_id(target)))
    bridge.sync_ok()
    assert target in bridge.desktop_ids(bridge.trash)
    assert target not in bridge.desktop_ids()
    assert ids[3] in bridge.phone_inbox_ids()  # the freed slot was filled
    bridge.assert_in_sync()

    bridge.phone("restore", str(bridge.phone_id(target, "trash")))
    bridge.sync_ok()
    assert target in bridge.desktop_ids()
    assert target not in bridge.desktop_ids(bridge.trash)
    assert target in bridge.phone_inbox_ids()
    bridge.assert_in_sync()


def test_delete_and_restore_on_the_desktop(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    target = ids[9]
    bridge.desktop_move(target, bridge.trash)
    bridge.sync_ok()
    listing = bridge.phone_list()
    assert target in [m["message_id"] for m in listing["trash"]]
    assert target not in bridge.phone_inbox_ids()
    bridge.assert_in_sync()

    bridge.desktop_move(target, "INBOX", source=bridge.trash)
    bridge.sync_ok()
    assert bridge.phone_inbox_ids()[0] == target
    assert bridge.phone_list()["trash"] == []
    bridge.assert_in_sync()


def test_destroy_on_the_phone_is_permanent_on_both_sides(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 9)]
    bridge.sync_ok()
    bridge.phone("destroy", str(bridge.phone_id(ids[7])))
    bridge.phone("delete", str(bridge.phone_id(ids[6])))
    bridge.sync_ok()
    bridge.phone("destroy", str(bridge.phone_id(ids[6], "trash")))
    bridge.sync_ok()
    for gone in (ids[7], ids[6]):
        assert gone not in bridge.desktop_ids()
        assert gone not in bridge.desktop_ids(bridge.trash)
        assert gone not in [m["message_id"] for m in bridge.phone_list()["trash"]]
    bridge.assert_in_sync()


def test_destroy_on_the_desktop_removes_the_phone_copy(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 5)]
    bridge.sync_ok()
    with bridge.imap() as client:
        uid = bridge.desktop_uid(ids[3])
        client.add_flags([uid], [b"\\Deleted"])
        client.uid_expunge([uid])
    bridge.sync_ok()
    listing = bridge.phone_list()
    assert ids[3] not in [m["message_id"] for m in listing["inbox"] + listing["trash"]]
    bridge.assert_in_sync()


def test_read_and_flag_both_ways(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 7)]
    bridge.sync_ok()
    bridge.phone("read", str(bridge.phone_id(ids[5])))
    bridge.phone("flag", str(bridge.phone_id(ids[4])))
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[3])], [b"\\Seen", b"\\Flagged"])
    bridge.sync_ok()
    mails = {m.message_id: m for m in bridge.mails()}
    assert mails[ids[5]].seen and not mails[ids[5]].flagged
    assert mails[ids[4]].flagged and not mails[ids[4]].seen
    phone = {m["message_id"]: m for m in bridge.phone_list()["inbox"]}
    assert phone[ids[3]]["seen"] and phone[ids[3]]["flagged"]
    bridge.assert_in_sync()

    bridge.phone("unread", str(bridge.phone_id(ids[5])))
    with bridge.imap() as client:
        client.remove_flags([bridge.desktop_uid(ids[3])], [b"\\Flagged"])
    bridge.sync_ok()
    mails = {m.message_id: m for m in bridge.mails()}
    assert not mails[ids[5]].seen
    assert not {m["message_id"]: m for m in bridge.phone_list()["inbox"]}[ids[3]]["flagged"]
    bridge.assert_in_sync()


def test_conflicts_resolve_by_the_design_rules(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 7)]
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[5])], [b"\\Seen"])
    bridge.sync_ok()
    # \Seen: the phone unsets it while the desktop keeps it set and flags it -> set wins.
    bridge.phone("unread", str(bridge.phone_id(ids[5])))
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[4])], [b"\\Seen"])
    bridge.phone("read", str(bridge.phone_id(ids[4])))
    # Delete beats a flag change: the phone deletes, the desktop flags the same message.
    bridge.phone("delete", str(bridge.phone_id(ids[3])))
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[3])], [b"\\Flagged"])
    # Restore beats delete: deleted on the desktop, deleted then restored on the phone.
    bridge.phone("delete", str(bridge.phone_id(ids[2])))
    bridge.phone("restore", str(bridge.phone_id(ids[2], "trash")))
    bridge.desktop_move(ids[2], bridge.trash)
    bridge.sync_ok()

    mails = {m.message_id: m for m in bridge.mails()}
    assert not mails[ids[5]].seen  # only the phone changed it: its unset stands
    assert mails[ids[4]].seen
    trash = {m.message_id: m for m in bridge.mails(bridge.trash)}
    assert ids[3] in trash and trash[ids[3]].flagged
    assert ids[2] in mails  # restored on the desktop
    bridge.assert_in_sync()


def test_seen_set_beats_unset_when_both_sides_change(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 4)]
    bridge.sync_ok()
    bridge.phone("read", str(bridge.phone_id(ids[2])))
    bridge.phone("unread", str(bridge.phone_id(ids[2])))
    bridge.phone("read", str(bridge.phone_id(ids[1])))
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[2])], [b"\\Seen"])
    bridge.sync_ok()
    mails = {m.message_id: m for m in bridge.mails()}
    assert mails[ids[2]].seen and mails[ids[1]].seen
    bridge.assert_in_sync()


def test_uidvalidity_change_makes_no_duplicates_and_keeps_phone_actions(
    bridge: Bridge,
) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    phone_ids_before = {m["message_id"]: m["id"] for m in bridge.phone_list()["inbox"]}
    bridge.phone("read", str(bridge.phone_id(ids[9])))
    bridge.phone("delete", str(bridge.phone_id(ids[8])))
    bridge.dovecot.reset_uidvalidity(bridge.user)
    bridge.sync_ok()
    assert ids[8] in bridge.desktop_ids(bridge.trash)
    assert {m.message_id: m for m in bridge.mails()}[ids[9]].seen
    assert len(bridge.desktop_ids()) == 9
    phone_after = {m["message_id"]: m["id"] for m in bridge.phone_list()["inbox"]}
    for message_id, phone_id in phone_after.items():
        if message_id in phone_ids_before:
            assert phone_ids_before[message_id] == phone_id  # re-mapped, not re-copied
    bridge.assert_in_sync()


def test_repairing_with_fresh_agent_state_makes_no_duplicates(
    bridge: Bridge, tmp_path: Path
) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    bridge.phone("read", str(bridge.phone_id(ids[9])))
    rc, out, err = _server_cli(bridge, "pair-code", bridge.phone_user)
    assert rc == 0, err
    fresh = tmp_path / "fresh-agent" / "agent.ini"
    bridge.write_agent_config(fresh)
    bridge.pair(fresh, out.strip().splitlines()[-1])
    rc, _out, err = bridge.sync(ini=fresh)
    assert rc == 0, err
    assert len(bridge.desktop_ids()) == 10
    assert len(bridge.phone_list()["inbox"]) == 6
    assert {m.message_id: m for m in bridge.mails()}[ids[9]].seen
    bridge.assert_in_sync()
    # The old agent's certificate is revoked.
    rc, _out, err = bridge.sync()
    assert rc == 1 and "certificate" in err


def test_mass_delete_breaker_stops_and_keeps_the_phone(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 31)]
    bridge.sync_ok()
    with bridge.imap() as client:
        client.add_flags(client.search("ALL"), [b"\\Deleted"])
        client.expunge()
    rc, _out, err = bridge.sync()
    assert rc == 1
    assert "mass-delete breaker" in err
    assert bridge.phone_inbox_ids() == list(reversed(ids))[:6]
    status = bridge.agent_status()
    assert status["last_result"] == "failed" and "mass-delete" in status["last_error"]
    # The user confirms: the deletes go through.
    rc, _out, err = bridge.sync("--allow-mass-delete")
    assert rc == 0, err
    assert bridge.phone_list()["inbox"] == []


HOSTILE = [
    b"From: a@example.com\r\nSubject: no message id\r\n\r\nbody without id\r\n",
    b"From: b@example.com\r\nMessage-ID: <nul@example.com>\r\nSubject: nul\r\n\r\nbad\x00byte\r\n",
    b"From: =?utf-8?q?broken?=\r\nMessage-ID: <8bit@example.com>\r\nSubject: caf\xe9 \xff\r\n"
    b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nno end boundary\r\n',
]


def test_malformed_messages_sync_or_are_quarantined(bridge: Bridge) -> None:
    dovecot = bridge.dovecot
    base = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)
    good = [bridge.deliver(n) for n in (1, 2, 3)]
    for i, raw in enumerate(HOSTILE):
        dovecot.deliver_file(bridge.user, raw, base + dt.timedelta(minutes=10 + i))
    bridge.sync_ok()
    listing = bridge.phone_list()
    status = bridge.agent_status()
    assert len(listing["inbox"]) + len(status["quarantined"]) == 6
    for message_id in good:
        assert message_id in bridge.phone_inbox_ids()
    subjects = {m["subject"] for m in listing["inbox"]}
    assert "no message id" in subjects
    bridge.sync_ok()  # a second sync is stable: nothing doubles
    assert len(bridge.phone_list()["inbox"]) == len(listing["inbox"])


def test_an_oversized_message_is_quarantined_and_the_rest_syncs(
    bridge: Bridge, tmp_path: Path
) -> None:
    ini = bridge.agent_ini
    bridge.write_agent_config(ini, max_message_size="2048")
    small = [bridge.deliver(n) for n in (1, 2)]
    big = bridge.deliver(3, body="x" * 5000)
    bridge.sync_ok()
    status = bridge.agent_status()
    assert [q["key"] for q in status["quarantined"]] == [big]
    assert "larger" in status["quarantined"][0]["reason"]
    assert bridge.phone_inbox_ids() == list(reversed(small))


def _server_cli(bridge: Bridge, *argv: str) -> tuple[int, str, str]:
    from bridge import run_cli

    return run_cli("server", argv[0], "--config", str(bridge.server_ini), *argv[1:])


def test_equal_arrival_times_order_by_uid_at_the_window_edge(bridge: Bridge) -> None:
    # Ten messages delivered in the same minute: newest first means highest UID first.
    ids = [bridge.deliver(n, minutes=0) for n in range(1, 11)]
    bridge.sync_ok()
    assert bridge.phone_inbox_ids() == list(reversed(ids))[:6]
    bridge.assert_in_sync()


def test_a_flag_change_alone_keeps_the_window_and_syncs_the_flag(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    phone_before = bridge.phone_list()["inbox"]
    with bridge.imap() as client:
        client.add_flags([bridge.desktop_uid(ids[7])], [b"\\Seen"])
    out = bridge.sync_ok()
    assert "pulled=0" in out and "evicted=0" in out
    assert [m["id"] for m in bridge.phone_list()["inbox"]] == [m["id"] for m in phone_before]
    assert {m["message_id"]: m for m in bridge.phone_list()["inbox"]}[ids[7]]["seen"]
    bridge.assert_in_sync()


def test_a_failed_desktop_action_is_held_and_retried(bridge: Bridge) -> None:
    ids = [bridge.deliver(n) for n in range(1, 9)]
    bridge.sync_ok()
    bridge.phone("delete", str(bridge.phone_id(ids[7])))
    # Dovecot refuses the MOVE for real: the proxy sends it to a mailbox that is not there.
    # (COPY where the server has no MOVE)
    proxy = RewritingProxy(
        bridge.dovecot.port, rb"UID (MOVE|COPY) (\S+) [^\r\n]+", rb"UID \1 \2 Nowhere"
    )
    proxied = bridge.agent_ini.parent / "proxied.ini"
    bridge.write_agent_config(proxied, imap_port=proxy.port)
    try:
        rc, _out, err = bridge.sync(ini=proxied)
        assert rc == 0, err
        assert proxy.rewritten == 1
        status = bridge.agent_status()
        assert [q["key"] for q in status["quarantined"]] == [ids[7]]
        assert "MoveOnDesktop" in status["quarantined"][0]["reason"]
        assert ids[7] in bridge.desktop_ids()  # not moved...
        trash_ids = [m["message_id"] for m in bridge.phone_list()["trash"]]
        assert ids[7] in trash_ids  # ...and the phone keeps what its user did
    finally:
        proxy.close()
    bridge.sync_ok()
    assert ids[7] in bridge.desktop_ids(bridge.trash)
    assert bridge.agent_status()["quarantined"] == []
    bridge.assert_in_sync()


def test_new_mail_of_any_arrival_time_takes_its_place_in_the_window(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imapsync_bridge")
    ids = {n: bridge.deliver(n, minutes=10 * n) for n in range(1, 11)}
    bridge.sync_ok()
    ids[11] = bridge.deliver(11, minutes=5)  # arrived long ago (an old mail re-filed)
    ids[12] = bridge.deliver(12, minutes=75)  # between messages 7 and 8
    ids[13] = bridge.deliver(13, minutes=200)  # the newest
    caplog.clear()
    bridge.sync_ok()
    assert "added since UID" in caplog.text  # only additions: no sort of the inbox
    assert bridge.phone_inbox_ids() == [ids[n] for n in (13, 10, 9, 8, 12, 7)]
    bridge.assert_in_sync()
    # Then a delete on the desktop: a message left the inbox, the full scan takes over.
    bridge.desktop_move(ids[13], bridge.trash)
    caplog.clear()
    bridge.sync_ok()
    assert "added since UID" not in caplog.text
    assert bridge.phone_inbox_ids() == [ids[n] for n in (10, 9, 8, 12, 7, 6)]
    bridge.assert_in_sync()


def test_deletes_on_the_phone_reach_the_desktop_in_one_move(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imapsync_bridge")
    ids = [bridge.deliver(n) for n in range(1, 11)]
    bridge.sync_ok()
    for message_id in ids[7:]:
        bridge.phone("delete", str(bridge.phone_id(message_id)))
    caplog.clear()
    bridge.sync_ok()
    assert caplog.text.count(f"moved 3 message(s) to {bridge.trash}") == 1
    assert set(ids[7:]) <= set(bridge.desktop_ids(bridge.trash))
    bridge.assert_in_sync()
