"""PhoneStore against real SQLite files (no mocks)."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from imapsync_bridge.errors import StoreError
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.store_schema import MIGRATIONS, SCHEMA_VERSION, parse_summary


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = PhoneStore(tmp_path / "phone.db", clock=clock)
    s.add_user("alice", "alice@phone.example", "alice@corp.example", 5)
    s.add_user("bob", "bob@phone.example", "bob@corp.example", 5)
    yield s
    s.close()


def raw(key: str, subject: str = "hello") -> bytes:
    return f"Message-ID: {key}\r\nSubject: {subject}\r\nFrom: Sender <s@x>\r\n\r\nbody\r\n".encode()


def put(key: str, *, folder="inbox", seen=False, flagged=False, day=1) -> dict:
    return {
        "kind": "put",
        "key": key,
        "message_id": key,
        "raw": raw(key),
        "internaldate": f"2024-04-{day:02d}T08:00:00Z",
        "seen": seen,
        "flagged": flagged,
        "folder": folder,
    }


def apply_op(store: PhoneStore, user: str, seq: int, op: dict) -> None:
    """One desktop op, as the listener sends them: a batch of one."""
    store.apply_ops(user, [(seq, op)])


def fill(store: PhoneStore, user: str, keys: list[str]) -> dict[str, int]:
    """Put keys (dated in order) and return key -> phone id."""
    seq = store.last_seq(user)
    for day, key in enumerate(keys, start=1):
        seq += 1
        apply_op(store, user, seq, put(key, day=day))
    return {m.key: m.id for m in store.snapshot(user).messages}


def state(store: PhoneStore, user: str) -> list[tuple]:
    return [(m.key, m.folder, m.seen, m.flagged) for m in store.snapshot(user).messages]


def dump(path) -> list:
    """Every row of every table, read with a separate plain connection."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return [(t, sorted(conn.execute(f"SELECT * FROM {t}").fetchall())) for t in sorted(tables)]
    finally:
        conn.close()


# --- opening, schema, pragmas ---------------------------------------------------------


def test_pragmas_and_schema_version(tmp_path):
    path = tmp_path / "p.db"
    PhoneStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "p.db"
    PhoneStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        PhoneStore(path)


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "p.db"
    path.write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(StoreError) as info:
        PhoneStore(path)
    assert "\n" not in str(info.value)


def test_survives_reopen(tmp_path, clock):
    path = tmp_path / "p.db"
    with PhoneStore(path, clock=clock) as s:
        s.add_user("alice", "a@p", "a@d", 3)
        ids = fill(s, "alice", ["<1@x>", "<2@x>"])
        s.trash("alice", ids["<1@x>"])
        s.register_certificate("alice", 2**158 + 7, clock.now + timedelta(days=365))
        s.record_sync("alice", {"sent": 2})
    with PhoneStore(path, clock=clock) as s:
        assert s.get_user("alice").window == 3
        assert s.last_seq("alice") == 0  # reset by the certificate registered last
        assert [m.key for m in s.list_folder("alice", "trash")] == ["<1@x>"]
        assert s.get("alice", ids["<2@x>"]).raw == raw("<2@x>")
        assert s.pending_actions("alice")[0].kind == "trash"
        assert s.user_for_certificate(2**158 + 7) == "alice"
        assert s.last_sync("alice").summary == {"sent": 2}


# --- users -----------------------------------------------------------------------------


def test_users(store):
    assert [store.get_user(n).name for n in ("alice", "bob")] == ["alice", "bob"]
    user = store.get_user("alice")
    assert (user.address, user.desktop_address, user.window) == (
        "alice@phone.example",
        "alice@corp.example",
        5,
    )
    with pytest.raises(StoreError, match="user exists"):
        store.add_user("alice", "x@p", "x@d", 5)
    with pytest.raises(StoreError, match="no such user"):
        store.get_user("carol")


@pytest.mark.parametrize(
    "name, window",
    [
        ("Alice", 5),
        ("", 5),
        ("a" * 65, 5),
        ("a b", 5),
        ("al/ice", 5),
        ("ok", 0),
        ("ok", 10001),
        ("ok", True),
        ("ok", 2.5),
    ],
)
def test_add_user_validation(store, name, window):
    with pytest.raises(StoreError, match="bad"):
        store.add_user(name, "x@p", "x@d", window)


@pytest.mark.parametrize(
    "method, args",
    [
        ("last_seq", ()),
        ("snapshot", ()),
        ("counts", ()),
        ("list_folder", ("inbox",)),
        ("apply_ops", ([(1, {"kind": "evict", "key": "<k>"})],)),
        ("ack_actions", (1,)),
        ("set_pairing_code", ("0" * 64,)),
        ("register_certificate", (5, "2030-01-01T00:00:00Z")),
    ],
)
def test_unknown_user(store, method, args):
    with pytest.raises(StoreError, match="no such user"):
        getattr(store, method)("carol", *args)


# --- pairing codes and certificates ----------------------------------------------------


def h(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def test_pairing_code_single_use(store):
    store.set_pairing_code("alice", h("one"))
    assert store.consume_pairing_code(h("nope")) is None
    assert store.consume_pairing_code(h("one")) == "alice"
    assert store.consume_pairing_code(h("one")) is None


def test_pairing_code_expires(store, clock):
    store.set_pairing_code("alice", h("one"), ttl_seconds=60)
    clock.tick(60)
    assert store.consume_pairing_code(h("one")) is None


def test_pairing_code_replaces_previous(store, clock):
    store.set_pairing_code("alice", h("one"))
    store.set_pairing_code("bob", h("bobs"))
    store.set_pairing_code("alice", h("two"))
    assert store.consume_pairing_code(h("one")) is None
    assert store.consume_pairing_code(h("two")) == "alice"
    assert store.consume_pairing_code(h("bobs")) == "bob"


@pytest.mark.parametrize("token", ["abc", "G" * 64, "A" * 64, None])
def test_pairing_code_rejects_non_hash(store, token):
    with pytest.raises(StoreError, match="bad token hash"):
        store.set_pairing_code("alice", token)


def test_register_certificate_revokes_previous_and_resets_seq(store, clock):
    big = (1 << 159) - 1  # the largest 159-bit serial: far past SQLite's 64-bit INTEGER
    store.register_certificate("alice", big, clock.now + timedelta(days=30), "ab:cd")
    fill(store, "alice", ["<1@x>"])
    assert store.last_seq("alice") == 1
    store.register_certificate("alice", big - 1, "2030-01-01T00:00:00+00:00")
    assert store.user_for_certificate(big) is None
    assert store.user_for_certificate(big - 1) == "alice"
    assert store.last_seq("alice") == 0
    assert len(store.snapshot("alice").messages) == 1  # messages are kept
    store.register_certificate("bob", 12, "2030-01-01T00:00:00Z")
    assert store.user_for_certificate(big - 1) == "alice"  # bob's pairing leaves alice alone
    assert store.user_for_certificate(99) is None
    with pytest.raises(StoreError, match="already registered"):
        store.register_certificate("bob", 12, "2030-01-01T00:00:00Z")


# --- agent ops -------------------------------------------------------------------------


def test_flag_op_changes_only_the_flags_it_names(store):
    apply_op(store, "alice", 1, put("<a@x>", seen=True))
    apply_op(store, "alice", 2, {"kind": "flags", "key": "<a@x>", "seen": None, "flagged": True,
                                "since": 0})  # fmt: skip
    assert state(store, "alice") == [("<a@x>", "inbox", True, True)]


def test_flag_op_keeps_a_phone_change_made_after_the_snapshot(store):
    """Compare-and-set: the agent planned from the snapshot at action_seq ``since``; the
    phone user's later read is newer than the plan and stays, and stays pending."""
    apply_op(store, "alice", 1, put("<a@x>", seen=True))
    planned_at = store.snapshot("alice").action_seq
    phone_id = store.list_folder("alice", "inbox")[0].id
    assert store.set_seen("alice", phone_id, False)
    assert store.set_seen("alice", phone_id, True)  # unread, then read again: newer than the plan
    op = {"kind": "flags", "key": "<a@x>", "seen": False, "flagged": True, "since": planned_at}
    apply_op(store, "alice", 2, op)
    assert state(store, "alice") == [("<a@x>", "inbox", True, True)]  # \Flagged applied
    assert [a.kind for a in store.pending_actions("alice", planned_at)] == ["unseen", "seen"]
    # With the phone's actions acknowledged up to a later snapshot, the op applies.
    apply_op(store, "alice", 3, {**op, "since": store.snapshot("alice").action_seq})
    assert state(store, "alice") == [("<a@x>", "inbox", False, True)]


def test_evict_keeps_a_message_the_phone_user_changed_after_the_snapshot(store):
    apply_op(store, "alice", 1, put("<a@x>"))
    apply_op(store, "alice", 2, put("<b@x>"))
    planned_at = store.snapshot("alice").action_seq
    read = next(m.id for m in store.list_folder("alice", "inbox") if m.key == "<a@x>")
    assert store.set_seen("alice", read, True)
    apply_op(store, "alice", 3, {"kind": "evict", "key": "<a@x>", "since": planned_at})
    apply_op(store, "alice", 4, {"kind": "evict", "key": "<b@x>", "since": planned_at})
    assert state(store, "alice") == [("<a@x>", "inbox", True, False)]  # the read survives


def test_apply_op_idempotent_by_seq(store):
    apply_op(store, "alice", 1, put("<a@x>"))
    apply_op(store, "alice", 1, put("<b@x>"))  # a retransmitted seq: ignored
    assert [k for k, *_ in state(store, "alice")] == ["<a@x>"]
    apply_op(
        store,
        "alice",
        3,
        {"kind": "flags", "key": "<a@x>", "seen": True, "flagged": False, "since": 0},
    )
    apply_op(
        store,
        "alice",
        2,
        {"kind": "flags", "key": "<a@x>", "seen": False, "flagged": True, "since": 0},
    )
    assert state(store, "alice") == [("<a@x>", "inbox", True, False)]
    assert store.last_seq("alice") == 3


@pytest.mark.parametrize(
    "op, expected",
    [
        (put("<a@x>"), [("<a@x>", "inbox", False, False)]),
        (put("<a@x>", folder="trash", seen=True), [("<a@x>", "trash", True, False)]),
        (put("<a@x>", flagged=True), [("<a@x>", "inbox", False, True)]),
        (
            {"kind": "flags", "key": "<a@x>", "seen": True, "flagged": True, "since": 0},
            [("<a@x>", "inbox", True, True)],
        ),
        ({"kind": "move", "key": "<a@x>", "folder": "trash"}, [("<a@x>", "trash", False, False)]),
        ({"kind": "evict", "key": "<a@x>"}, []),
        ({"kind": "destroy", "key": "<a@x>"}, []),
        (
            {"kind": "move", "key": "<unknown@x>", "folder": "trash"},
            [("<a@x>", "inbox", False, False)],
        ),
        (
            {"kind": "flags", "key": "<unknown@x>", "seen": True, "flagged": True, "since": 0},
            [("<a@x>", "inbox", False, False)],
        ),
        ({"kind": "destroy", "key": "<unknown@x>"}, [("<a@x>", "inbox", False, False)]),
    ],
)
def test_ops_on_an_existing_message(store, op, expected):
    apply_op(store, "alice", 1, put("<a@x>"))
    first_id = store.snapshot("alice").messages[0].id
    apply_op(store, "alice", 2, op)
    assert state(store, "alice") == expected
    assert store.last_seq("alice") == 2  # advanced even when the op was a no-op
    snap = store.snapshot("alice")
    assert snap.destroyed == [] and snap.action_seq == 0  # desktop ops log no action
    assert all(m.id == first_id for m in snap.messages)  # never a second row
    assert not any(m.dirty for m in store.list_folder("alice", "inbox"))


def test_put_sets_trashed_at_for_gc_and_restore_clears(store):
    apply_op(store, "alice", 1, put("<a@x>", folder="trash"))
    apply_op(store, "alice", 2, {"kind": "move", "key": "<a@x>", "folder": "inbox"})
    assert store.counts("alice") == {"inbox": 1, "trash": 0, "pending_actions": 0}


@pytest.mark.parametrize(
    "op",
    [
        {"kind": "bogus", "key": "<a@x>"},
        {"kind": "put", "key": "<a@x>"},  # fields missing
        dict(put("<a@x>"), raw="not bytes"),
        dict(put("<a@x>"), folder="sent"),
        dict(put("<a@x>"), internaldate="yesterday"),
        dict(put("<a@x>"), seen="yes"),
        {"kind": "move", "key": "", "folder": "inbox"},
    ],
)
def test_bad_op_changes_nothing(store, op):
    with pytest.raises(StoreError, match="bad"):
        apply_op(store, "alice", 1, op)
    assert store.last_seq("alice") == 0
    assert state(store, "alice") == []


@pytest.mark.parametrize("seq", [0, -1, True, "1", None])
def test_bad_seq(store, seq):
    with pytest.raises(StoreError, match="bad seq"):
        apply_op(store, "alice", seq, put("<a@x>"))


def test_evict_leaves_no_tombstone_but_phone_destroy_does(store):
    ids = fill(store, "alice", ["<a@x>", "<b@x>"])
    apply_op(store, "alice", 3, {"kind": "evict", "key": "<a@x>"})
    assert store.destroy("alice", ids["<b@x>"]) is True
    snap = store.snapshot("alice")
    assert snap.messages == []
    assert snap.destroyed == ["<b@x>"]
    assert snap.action_seq > 0
    store.ack_actions("alice", snap.action_seq)
    snap = store.snapshot("alice")
    assert (snap.destroyed, snap.action_seq) == ([], 0)


def test_put_after_phone_destroy_does_not_resurrect(store):
    ids = fill(store, "alice", ["<a@x>"])
    store.destroy("alice", ids["<a@x>"])
    apply_op(store, "alice", 2, put("<a@x>"))  # raced with the destroy
    assert state(store, "alice") == []
    store.ack_actions("alice", store.snapshot("alice").action_seq)
    apply_op(store, "alice", 3, put("<a@x>"))  # after the ack, the key may come back
    assert [k for k, *_ in state(store, "alice")] == ["<a@x>"]
    assert store.snapshot("alice").messages[0].id != ids["<a@x>"]  # ids are never reused


def test_raw_message_and_summary(store):
    fill(store, "alice", ["<a@x>"])
    assert store.raw_message("alice", "<a@x>") == raw("<a@x>")
    assert store.raw_message("alice", "<nope@x>") is None
    assert store.raw_message("bob", "<a@x>") is None
    (msg,) = store.list_folder("alice", "inbox")
    assert (msg.subject, msg.from_addr, msg.size) == ("hello", "Sender <s@x>", len(raw("<a@x>")))


def test_record_sync(store, clock):
    assert store.last_sync("alice") is None
    store.record_sync("alice", {"ops": 3, "result": "ok"})
    record = store.last_sync("alice")
    assert record.summary == {"ops": 3, "result": "ok"}
    assert record.at.startswith("2024-05-01T12:00:00")
    with pytest.raises(StoreError, match="bad sync summary"):
        store.record_sync("alice", {"x": object()})


# --- phone side ------------------------------------------------------------------------


def test_list_folder_newest_first(store):
    ids = fill(store, "alice", ["<old@x>", "<mid@x>", "<new@x>"])
    apply_op(store, "alice", 4, dict(put("<twin@x>"), internaldate="2024-04-03T08:00:00Z"))
    listed = [m.key for m in store.list_folder("alice", "inbox")]
    # Same date: put order (the agent puts newest first, as the desktop lists them).
    assert listed == ["<new@x>", "<twin@x>", "<mid@x>", "<old@x>"]
    store.trash("alice", ids["<mid@x>"])
    assert [m.key for m in store.list_folder("alice", "trash")] == ["<mid@x>"]
    with pytest.raises(StoreError, match="bad folder"):
        store.list_folder("alice", "sent")


@pytest.mark.parametrize(
    "steps, expected_state, expected_actions",
    [
        ([("trash",)], ("trash", False, False), ["trash"]),
        ([("trash",), ("trash",)], ("trash", False, False), ["trash"]),
        ([("trash",), ("restore",)], ("inbox", False, False), ["trash", "restore"]),
        ([("restore",)], ("inbox", False, False), []),
        ([("set_seen", True)], ("inbox", True, False), ["seen"]),
        ([("set_seen", True), ("set_seen", True)], ("inbox", True, False), ["seen"]),
        ([("set_seen", False)], ("inbox", False, False), []),
        ([("set_seen", True), ("set_seen", False)], ("inbox", False, False), ["seen", "unseen"]),
        ([("set_flagged", True)], ("inbox", False, True), ["flag"]),
        (
            [("set_flagged", True), ("set_flagged", False)],
            ("inbox", False, False),
            ["flag", "unflag"],
        ),
    ],
)
def test_phone_changes(store, steps, expected_state, expected_actions):
    ids = fill(store, "alice", ["<a@x>"])
    for name, *args in steps:
        getattr(store, name)("alice", ids["<a@x>"], *args)
    assert state(store, "alice") == [("<a@x>", *expected_state)]
    assert [a.kind for a in store.pending_actions("alice")] == expected_actions
    assert all(a.key == "<a@x>" for a in store.pending_actions("alice"))
    msg = store.get("alice", ids["<a@x>"])
    assert msg.dirty == bool(expected_actions)


def test_destroy_from_trash(store):
    ids = fill(store, "alice", ["<a@x>"])
    store.trash("alice", ids["<a@x>"])
    store.destroy("alice", ids["<a@x>"])
    assert store.counts("alice") == {"inbox": 0, "trash": 0, "pending_actions": 2}
    with pytest.raises(StoreError, match=f"no message {ids['<a@x>']}"):
        store.get("alice", ids["<a@x>"])


def test_ack_clears_dirty_only_without_pending_actions(store):
    ids = fill(store, "alice", ["<a@x>", "<b@x>"])
    store.set_seen("alice", ids["<a@x>"], True)
    acked = store.snapshot("alice").action_seq
    store.set_seen("alice", ids["<b@x>"], True)
    store.ack_actions("alice", acked)
    assert store.get("alice", ids["<a@x>"]).dirty is False
    assert store.get("alice", ids["<b@x>"]).dirty is True
    assert [a.key for a in store.pending_actions("alice")] == ["<b@x>"]


# --- user isolation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, args",
    [
        ("get", ()),
        ("trash", ()),
        ("restore", ()),
        ("destroy", ()),
        ("set_seen", (True,)),
        ("set_flagged", (True,)),
    ],
)
def test_user_b_cannot_see_or_touch_a_ids(store, method, args):
    ids = fill(store, "alice", ["<a@x>"])
    with pytest.raises(StoreError, match=f"^no message {ids['<a@x>']}$"):
        getattr(store, method)("bob", ids["<a@x>"], *args)
    assert state(store, "alice") == [("<a@x>", "inbox", False, False)]
    assert store.pending_actions("alice") == [] and store.pending_actions("bob") == []


def test_ops_of_a_never_touch_b(store):
    fill(store, "bob", ["<shared@x>"])
    before = state(store, "bob")
    for seq, op in enumerate(
        [
            put("<shared@x>", folder="trash", seen=True),
            {"kind": "flags", "key": "<shared@x>", "seen": True, "flagged": True, "since": 0},
            {"kind": "move", "key": "<shared@x>", "folder": "trash"},
            {"kind": "evict", "key": "<shared@x>"},
            {"kind": "destroy", "key": "<shared@x>"},
        ],
        start=1,
    ):
        apply_op(store, "alice", seq, op)
    assert state(store, "bob") == before
    assert store.last_seq("bob") == 1
    assert store.list_folder("bob", "inbox")[0].key == "<shared@x>"
    bob_id = store.snapshot("bob").messages[0].id
    store.destroy("bob", bob_id)
    assert store.snapshot("alice").destroyed == []
    store.ack_actions("alice", 10**9)
    assert store.snapshot("bob").destroyed == ["<shared@x>"]


# --- garbage collector -----------------------------------------------------------------


def test_gc_drops_oldest_acknowledged_beyond_capacity(store, clock):
    keys = [f"<{n}@x>" for n in range(14)]
    ids = fill(store, "alice", keys)  # window 5 -> trash capacity 10
    for key in keys:
        clock.tick()
        store.trash("alice", ids[key])
    # nothing acknowledged yet: all 14 are dirty and none may go
    assert store.ack_actions("alice", 0) == 0
    assert store.counts("alice")["trash"] == 14
    assert store.ack_actions("alice", store.snapshot("alice").action_seq) == 4
    kept = {m.key for m in store.list_folder("alice", "trash")}
    assert kept == set(keys[4:])


def test_gc_never_drops_a_dirty_entry(store, clock):
    keys = [f"<{n}@x>" for n in range(12)]
    ids = fill(store, "alice", keys)  # trash capacity 10
    for key in keys:
        clock.tick()
        store.trash("alice", ids[key])
    last_trash = store.snapshot("alice").action_seq
    store.set_seen("alice", ids[keys[0]], True)  # the oldest trash entry changes again
    assert store.ack_actions("alice", last_trash) == 2
    remaining = {m.key for m in store.list_folder("alice", "trash")}
    assert keys[0] in remaining  # unacknowledged: kept although trashed first
    assert remaining.isdisjoint(keys[1:3])  # the two oldest acknowledged entries went
    assert store.ack_actions("alice", store.snapshot("alice").action_seq) == 0  # 10 left
    clock.tick()
    apply_op(store, "alice", 13, put("<late@x>", folder="trash"))  # desktop-trashed: clean
    assert store.ack_actions("alice", 0) == 1
    assert keys[0] not in {m.key for m in store.list_folder("alice", "trash")}


def test_gc_may_leave_trash_over_capacity_while_dirty(store, clock):
    keys = [f"<{n}@x>" for n in range(12)]
    ids = fill(store, "alice", keys)
    for key in keys:
        clock.tick()
        store.trash("alice", ids[key])
    first = store.pending_actions("alice")[0].seq  # ack only the first trash action
    assert store.ack_actions("alice", first) == 1
    assert store.counts("alice")["trash"] == 11  # only <0@x> was clean; 11 dirty remain
    assert keys[0] not in {m.key for m in store.list_folder("alice", "trash")}


def test_gc_capacity_is_the_window_when_larger(tmp_path, clock):
    with PhoneStore(tmp_path / "p.db", clock=clock) as s:
        s.add_user("big", "b@p", "b@d", 12)
        for seq in range(1, 15):
            clock.tick()
            apply_op(s, "big", seq, put(f"<{seq}@x>", folder="trash"))
        assert s.ack_actions("big", 0) == 2
        assert s.counts("big")["trash"] == 12


def test_gc_never_touches_the_inbox(store):
    fill(store, "alice", [f"<{n}@x>" for n in range(20)])
    assert store.ack_actions("alice", 0) == 0
    assert store.counts("alice")["inbox"] == 20


# --- atomicity -------------------------------------------------------------------------


def _boom_trigger(path, table: str, event: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TRIGGER boom BEFORE {event} ON {table} BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "table, event, action",
    [
        # the op's insert succeeds, then updating last_seq fails: the insert must go too
        ("users", "UPDATE", lambda s, ids: apply_op(s, "alice", 2, put("<new@x>"))),
        # the message moves to trash, then logging the action fails
        ("phone_actions", "INSERT", lambda s, ids: s.trash("alice", ids["<a@x>"])),
        ("phone_actions", "INSERT", lambda s, ids: s.destroy("alice", ids["<a@x>"])),
        # actions are deleted, then clearing dirty fails
        ("messages", "UPDATE", lambda s, ids: s.ack_actions("alice", 10**9)),
        # old certificates are revoked, then the insert fails
        (
            "certificates",
            "INSERT",
            lambda s, ids: s.register_certificate("alice", 2, "2030-01-01T00:00:00Z"),
        ),
        # the old code is deleted, then the new one cannot be inserted
        ("pairing_codes", "INSERT", lambda s, ids: s.set_pairing_code("alice", h("new"))),
    ],
)
def test_failure_mid_method_leaves_db_unchanged(store, tmp_path, table, event, action):
    path = tmp_path / "phone.db"
    ids = fill(store, "alice", ["<a@x>"])
    store.set_seen("alice", ids["<a@x>"], True)
    store.register_certificate("alice", 1, "2030-01-01T00:00:00Z")
    store.set_pairing_code("alice", h("old"))
    apply_op(store, "alice", 1, put("<a@x>", seen=True))
    before = dump(path)
    _boom_trigger(path, table, event)
    with pytest.raises(StoreError) as info:
        action(store, ids)
    assert "boom" in str(info.value) and "\n" not in str(info.value)
    assert dump(path) == before
    assert store.counts("alice")["inbox"] == 1  # the store is still usable


# --- concurrency with another process ----------------------------------------------------


def _other_process(path: str) -> None:
    with PhoneStore(path) as s:
        for n in range(20):
            s.set_seen("alice", 1, n % 2 == 0)


def test_second_process_on_the_same_file(tmp_path):
    path = tmp_path / "phone.db"
    with PhoneStore(path) as s:
        s.add_user("alice", "a@p", "a@d", 5)
        apply_op(s, "alice", 1, put("<a@x>"))
        proc = multiprocessing.get_context("spawn").Process(target=_other_process, args=(path,))
        proc.start()
        for seq in range(2, 40):
            apply_op(s, "alice", seq, put(f"<m{seq}@x>"))
        proc.join(30)
        assert proc.exitcode == 0
        assert s.counts("alice") == {"inbox": 39, "trash": 0, "pending_actions": 20}


# --- hostile headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, subject, sender",
    [
        (
            b"Subject: =?utf-8?q?H=C3=A9llo?= world\r\nFrom: =?iso-8859-1?q?J=F6rg?= <j@x>\r\n\r\n",
            "H\u00e9llo world",
            "J\u00f6rg <j@x>",
        ),
        (
            b"Subject: caf\xc3\xa9 (raw UTF-8)\r\nFrom: M\xfcller <m@x>\r\n\r\n",
            "caf\u00e9 (raw UTF-8)",
            "M\u00fcller <m@x>",
        ),
        (b"Subject: =?utf-8?b?broken\r\n\r\n", "=?utf-8?b?broken", ""),
        (b"Subject: =?no-such-charset?q?abc?= =?utf-8?b?!!!?=\r\n\r\n", "abc=?utf-8?b?!!!?=", ""),
        (b"Subject: a\x00b\x01c\r\nFrom: x\x00@y\r\n\r\n", "ab c", "x@y"),
        (b"From: a@b\r\n\r\nno subject header", "", "a@b"),
        (b"Subject: =?utf-8?q?a?=\r\n =?utf-8?q?b?=\r\n\r\n", "ab", ""),
        (b"", "", ""),
        (b"\x00\xff\xfe\r\n\r\n", "", ""),
        (b"Subject: " + b"\xff" * 5000 + b"\r\n\r\n", "\u00ff" * 998, ""),
        (b"Subject: one\r\nSubject: two\r\n\r\n", "one", ""),
    ],
)
def test_parse_summary_hostile(message, subject, sender):
    assert parse_summary(message) == (subject, sender)


@pytest.mark.parametrize(
    "message",
    [
        b"\x00" * 100,
        b"Subject:\r\n\r\n",
        b": no name\r\n\r\n",
        b"Subject: =?=?==?\r\n\r\n",
        b"\r\n" * 50,
        b"From: <<<@@@>>>\r\nSubject: \x1b[31mred\r\n\r\n",
        bytes(range(256)) * 4,
    ],
)
def test_hostile_mail_is_stored(store, message):
    apply_op(store, "alice", 1, dict(put("<h@x>"), raw=message))
    (msg,) = store.list_folder("alice", "inbox")
    assert "\x00" not in msg.subject + msg.from_addr and "\x1b" not in msg.subject
    assert store.raw_message("alice", "<h@x>") == message


def test_a_batch_applies_whole_or_not_at_all(store):
    store.apply_ops("alice", [(1, put("<a@x>")), (2, put("<b@x>", day=2))])
    assert store.last_seq("alice") == 2
    before = store.snapshot("alice")
    bad = {"kind": "flags", "key": "<a@x>", "seen": "yes", "flagged": False, "since": 0}
    with pytest.raises(StoreError, match="bad op"):
        store.apply_ops("alice", [(3, {"kind": "evict", "key": "<b@x>"}), (4, bad)])
    assert store.snapshot("alice") == before  # the evict of the same batch was undone
    assert store.last_seq("alice") == 2


def test_a_resent_batch_applies_only_what_is_new(store):
    store.apply_ops("alice", [(1, put("<a@x>")), (2, put("<b@x>", day=2))])
    store.trash("alice", store.snapshot("alice").messages[0].id)  # the phone user acts
    resent = [(1, put("<a@x>")), (2, put("<b@x>", day=2)), (3, put("<c@x>", day=3))]
    store.apply_ops("alice", resent)
    folders = {m.key: m.folder for m in store.snapshot("alice").messages}
    assert folders == {"<a@x>": "trash", "<b@x>": "inbox", "<c@x>": "inbox"}
    assert store.last_seq("alice") == 3


# --- the trigger secret ---------------------------------------------------------------


def test_trigger_secret_is_per_user_replaced_by_each_pairing_and_survives(tmp_path, clock):
    path = tmp_path / "p.db"
    with PhoneStore(path, clock=clock) as s:
        s.add_user("alice", "a@p", "a@d", 3)
        s.add_user("bob", "b@p", "b@d", 3)
        assert s.trigger_secret("alice") is None
        s.set_trigger_secret("alice", "sync-AAAA-BBBB-CCCC-DDDD", b"k" * 32)
        s.set_trigger_secret("alice", "sync-EEEE-FFFF-GGGG-HHHH", b"n" * 32)
        assert s.trigger_secret("bob") is None
    with PhoneStore(path, clock=clock) as s:
        assert s.trigger_secret("alice") == ("sync-EEEE-FFFF-GGGG-HHHH", b"n" * 32)
        for phrase, key in (("short", b"k" * 32), ("sync-AAAA-BBBB", b"k" * 31)):
            with pytest.raises(StoreError, match="bad"):
                s.set_trigger_secret("alice", phrase, key)
        with pytest.raises(StoreError, match="no such user"):
            s.set_trigger_secret("carol", "sync-AAAA-BBBB-CCCC-DDDD", b"k" * 32)


def test_a_version_2_database_gains_the_trigger_secrets(tmp_path):
    path = tmp_path / "p.db"
    conn = sqlite3.connect(path)
    for version in (1, 2):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with PhoneStore(path) as s:
        s.add_user("alice", "a@p", "a@d", 3)
        s.set_trigger_secret("alice", "sync-AAAA-BBBB-CCCC-DDDD", b"k" * 32)
        assert s.trigger_secret("alice") == ("sync-AAAA-BBBB-CCCC-DDDD", b"k" * 32)
