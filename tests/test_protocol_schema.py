"""Every frame type of the protocol: a valid example decodes (and survives the wire);
broken ones are refused with a one-line error naming the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from imapsync_bridge.errors import ProtocolError
from imapsync_bridge.protocol import framing, schema

RAW = framing.b64encode_bytes(b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n")
DATE = "2024-05-01T09:30:00+00:00"

PUT = {
    "kind": "put",
    "key": "<1@example.com>",
    "message_id": "<1@example.com>",
    "raw": RAW,
    "internaldate": DATE,
    "seen": False,
    "flagged": True,
    "folder": "inbox",
}

VALID_TO_SERVER = {
    "hello": {"type": "hello", "protocol": 1, "agent": "desk-1"},
    "ca": {"type": "ca"},
    "pair": {
        "type": "pair",
        "code": "abcdefghijklmnopqrstuv.0123456789abcdef0123456789abcdef",
        "csr": "-----BEGIN CERTIFICATE REQUEST-----\nMII...\n-----END CERTIFICATE REQUEST-----\n",
    },
    "snapshot": {"type": "snapshot"},
    "ops": {
        "type": "ops",
        "ops": [{"seq": 1, "op": PUT}, {"seq": 2, "op": {"kind": "evict", "key": "<2@x>"}}],
    },
    "fetch": {"type": "fetch", "key": "<1@example.com>"},
    "ack_actions": {"type": "ack_actions", "up_to": 12},
    "complete": {"type": "complete", "summary": {"sent": 3, "errors": [], "ok": True}},
    "heartbeat": {"type": "heartbeat"},
}

OTHER_OPS = [
    {"kind": "put", **{k: v for k, v in PUT.items() if k != "kind"}, "message_id": None},
    {"kind": "flags", "key": "sha256:abc", "seen": True, "flagged": False, "since": 0},
    {"kind": "move", "key": "sha256:abc", "folder": "trash"},
    {"kind": "evict", "key": "sha256:abc"},
    {"kind": "destroy", "key": "sha256:abc"},
]

VALID_TO_AGENT = {
    "welcome": {"type": "welcome", "user": "alice", "last_seq": 0},
    "ca_cert": {"type": "ca_cert", "pem": "-----BEGIN CERTIFICATE-----\n..."},
    "paired": {
        "type": "paired",
        "user": "alice",
        "certificate": "-----BEGIN...",
        "window": 6,
        "sync_phrase": "sync-7KQ2-MX4P-9RTA-XW3H",
        "trigger_key": "0123456789abcdef" * 4,
        "address": "alice@phone.example",
        "desktop_address": "alice@corp.example",
    },
    "snapshot": {
        "type": "snapshot",
        "window": 6,
        "messages": [
            {
                "id": 1,
                "key": "<1@example.com>",
                "message_id": "<1@example.com>",
                "folder": "inbox",
                "seen": True,
                "flagged": False,
                "internaldate": DATE,
            },
            {
                "id": 2,
                "key": "sha256:0123",
                "message_id": None,
                "folder": "trash",
                "seen": False,
                "flagged": False,
                "internaldate": "2024-05-01T11:30:00.123456+02:00",
            },
        ],
        "actions": [
            {"kind": "destroy", "key": "<gone@example.com>"},
            {"kind": "restore", "key": "<back@example.com>"},
            {
                "kind": "deliver",
                "id": 7,
                "message_id": "<out@phone.example>",
                "sender": "me@corp.example",
                "to": ["you@example.com"],
                "raw": RAW,
            },
        ],
        "action_seq": 4,
    },
    "acked": {"type": "acked", "up_to": 3},
    "message": {"type": "message", "key": "<1@example.com>", "raw": RAW},
    "ok": {"type": "ok"},
    "error": {"type": "error", "code": "revoked", "message": "this agent was unpaired"},
    "changed": {"type": "changed", "reason": "phone_action"},
    "heartbeat": {"type": "heartbeat"},
}


def _decode(frame: Any, direction: schema.Direction) -> Any:
    """The frame as the peer's JSON text, decoded by the typed decoder."""
    return schema.decode(json.dumps(frame).encode(), direction)


def _names(classes: tuple[type[schema.Frame], ...]) -> set[str]:
    return {schema.frame_type(cls) for cls in classes}


def test_a_batch_of_ops_is_bounded_and_each_op_checked():
    many = [{"seq": n, "op": {"kind": "evict", "key": "k"}} for n in range(schema.MAX_BATCH + 1)]
    with pytest.raises(ProtocolError, match="at most"):
        _decode({"type": "ops", "ops": many}, "to_server")
    bad = [{"seq": 1, "op": {"kind": "evict", "key": "k"}}, {"seq": True, "op": PUT}]
    with pytest.raises(ProtocolError, match=r"ops\[1\]"):
        _decode({"type": "ops", "ops": bad}, "to_server")


def test_examples_cover_every_frame_type():
    assert set(VALID_TO_SERVER) == _names(schema.TO_SERVER)
    assert set(VALID_TO_AGENT) == _names(schema.TO_AGENT)
    assert {op["kind"] for op in OTHER_OPS} == set(schema.OP_KINDS)
    actions = VALID_TO_AGENT["snapshot"]["actions"]
    assert {a["kind"] for a in actions} == set(schema.ACTION_KINDS)


def _round_trips(frame: Any, direction: schema.Direction) -> Any:
    decoded = _decode(frame, direction)
    assert schema.frame_type(decoded) == frame["type"]
    assert schema.decode(schema.encode(decoded), direction) == decoded
    return decoded


@pytest.mark.parametrize("name", sorted(VALID_TO_SERVER))
def test_valid_to_server(name):
    _round_trips(VALID_TO_SERVER[name], "to_server")


@pytest.mark.parametrize("name", sorted(VALID_TO_AGENT))
def test_valid_to_agent(name):
    _round_trips(VALID_TO_AGENT[name], "to_agent")


@pytest.mark.parametrize("op", OTHER_OPS, ids=lambda op: op["kind"])
def test_valid_ops(op):
    _round_trips({"type": "ops", "ops": [{"seq": 9, "op": op}]}, "to_server")


def test_decoded_values_are_typed():
    ops = _decode(VALID_TO_SERVER["ops"], "to_server")
    put = ops.ops[0].op
    assert isinstance(put, schema.Put)
    assert put.raw == framing.b64decode_field(RAW)  # base64 on the wire, bytes here
    assert put.internaldate.isoformat() == DATE
    assert ops.ops[1].op == schema.Evict(key="<2@x>", since=None)


def test_server_actions_have_one_general_form():
    """destroy/restore and a deliver-shaped action ride in one list of actions."""
    snap = _round_trips(VALID_TO_AGENT["snapshot"], "to_agent")
    assert snap.destroyed == ["<gone@example.com>"]
    assert snap.restored == ["<back@example.com>"]
    deliver = snap.actions[2]
    assert isinstance(deliver, schema.Deliver)
    assert (deliver.id, deliver.to, deliver.raw) == (
        7,
        ["you@example.com"],
        framing.b64decode_field(RAW),
    )
    wire = json.loads(schema.encode(deliver))
    assert wire == VALID_TO_AGENT["snapshot"]["actions"][2]


def test_flags_null_means_leave_alone_and_evict_since_is_optional():
    flags = {"kind": "flags", "key": "k", "seen": None, "flagged": True, "since": 3}
    item = _decode({"type": "ops", "ops": [{"seq": 1, "op": flags}]}, "to_server").ops[0]
    assert (item.op.seen, item.op.flagged, item.op.since) == (None, True, 3)
    assert schema.op_fields(item.op) == flags
    with pytest.raises(ProtocolError, match="'ops\\[0\\].op.since' is missing"):
        no_since = {k: v for k, v in flags.items() if k != "since"}
        _decode({"type": "ops", "ops": [{"seq": 1, "op": no_since}]}, "to_server")
    evict = schema.Evict(key="k")
    assert json.loads(schema.encode(evict)) == {"kind": "evict", "key": "k"}  # no since


def test_valid_frames_survive_the_wire():
    for frame in [*VALID_TO_SERVER.values()]:
        wire = framing.encode_frame(frame)
        _decode(framing.decode_payload(wire[4:]), "to_server")


def test_the_journal_form_of_an_op_is_its_wire_form():
    journaled = {k: v for k, v in PUT.items() if k != "raw"}
    op = schema.op_from_journal(journaled, b"raw bytes")
    assert isinstance(op, schema.Put) and op.raw == b"raw bytes"
    with pytest.raises(ProtocolError, match="seen"):
        schema.op_from_journal({**journaled, "seen": "yes"}, b"x")


def _op(**changes):
    op = dict(PUT)
    for key, value in changes.items():
        if value is _DROP:
            del op[key]
        else:
            op[key] = value
    return _single({"seq": 1, "op": op})


def _snap(**changes):
    frame = copy.deepcopy(VALID_TO_AGENT["snapshot"])
    frame["messages"][1].update(changes)
    return frame


_DROP = object()


def _single(item):
    """A batch of one action: field paths inside it read ``ops[0].<field>``."""
    return {"type": "ops", "ops": [item]}


INVALID = [
    # (direction, frame, text the one-line error must contain)
    (
        "to_server",
        _single({"seq": True, "op": PUT}),
        "frame 'ops': field 'ops[0].seq' must be an integer",
    ),
    ("to_server", _single({"seq": -1, "op": PUT}), "field 'ops[0].seq'"),
    ("to_server", _single({"seq": 2**64, "op": PUT}), "field 'ops[0].seq'"),
    ("to_server", _single({"seq": 1.5, "op": PUT}), "field 'ops[0].seq' must be an integer"),
    ("to_server", _single({"seq": "1", "op": PUT}), "field 'ops[0].seq' must be an integer"),
    ("to_server", _single({"op": PUT}), "field 'ops[0].seq' is missing"),
    (
        "to_server",
        _single({"seq": 1, "op": PUT, "extra": 1}),
        "field 'ops[0].extra' is not allowed",
    ),
    ("to_server", {"type": "ack_actions", "up_to": False}, "field 'up_to' must be an integer"),
    ("to_server", {"type": "hello", "protocol": 2, "agent": "a"}, "field 'protocol' must be 1"),
    ("to_server", {"type": "hello", "protocol": True, "agent": "a"}, "field 'protocol'"),
    (
        "to_server",
        {"type": "hello", "protocol": 1, "agent": "a" * 65},
        "field 'agent' must be at most 64",
    ),
    ("to_server", {"type": "hello", "protocol": 1}, "field 'agent' is missing"),
    ("to_server", {"type": "hello", "protocol": 1, "agent": 5}, "field 'agent' must be a string"),
    ("to_server", {"type": "ca", "x": 1}, "field 'x' is not allowed"),
    (
        "to_server",
        {"type": "pair", "code": "c", "csr": "x" * 10_001},
        "field 'csr' must be at most",
    ),
    ("to_server", {"type": "pair", "code": "c" * 201, "csr": "x"}, "field 'code'"),
    ("to_server", {"type": "fetch", "key": "k" * 1001}, "field 'key' must be at most 1000"),
    ("to_server", {"type": "fetch", "key": ""}, "field 'key' must not be empty"),
    ("to_server", {"type": "fetch", "key": None}, "field 'key' must be a string"),
    ("to_server", {"type": "fetch", "key": "\ud800"}, "not valid JSON"),
    ("to_server", {"type": "complete", "summary": []}, "field 'summary' must be an object"),
    ("to_server", {"type": "complete", "summary": {"x": "y" * 70_000}}, "field 'summary'"),
    ("to_server", _op(folder="sent"), 'field \'ops[0].op.folder\' must be "inbox" or "trash"'),
    ("to_server", _op(kind="delete"), "field 'ops[0].op.kind' must be"),
    ("to_server", _op(kind=_DROP), "field 'ops[0].op.kind' is missing"),
    ("to_server", _op(seen=1), "field 'ops[0].op.seen' must be true or false"),
    ("to_server", _op(flagged=None), "field 'ops[0].op.flagged'"),
    ("to_server", _op(raw="not base64!"), "field 'ops[0].op.raw' must be valid base64"),
    ("to_server", _op(raw="abc"), "field 'ops[0].op.raw' must be valid base64"),
    ("to_server", _op(raw=None), "field 'ops[0].op.raw' must be a base64 string"),
    ("to_server", _op(message_id=3), "field 'ops[0].op.message_id' must be a string or null"),
    ("to_server", _op(message_id="m" * 1001), "field 'ops[0].op.message_id'"),
    ("to_server", _op(internaldate="yesterday"), "field 'ops[0].op.internaldate'"),
    ("to_server", _op(internaldate="2024-05-01T09:30:00"), "field 'ops[0].op.internaldate'"),
    ("to_server", _op(internaldate="2024-13-01T09:30:00Z"), "field 'ops[0].op.internaldate'"),
    ("to_server", _op(key=_DROP), "field 'ops[0].op.key' is missing"),
    ("to_server", _op(uid=5), "field 'ops[0].op.uid' is not allowed"),
    (
        "to_server",
        _single({"seq": 1, "op": {"kind": "evict", "key": "k", "folder": "inbox"}}),
        "field 'ops[0].op.folder' is not allowed",
    ),
    ("to_server", _single({"seq": 1, "op": "put"}), "field 'ops[0].op' must be an object"),
    (
        "to_server",
        {"type": "welcome", "user": "a", "window": 1, "last_seq": 0},
        "unknown frame type 'welcome'",
    ),
    ("to_server", {"type": "nope"}, "unknown frame type 'nope'"),
    ("to_server", {"seq": 1}, "no 'type'"),
    ("to_server", {"type": 3}, "no 'type'"),
    ("to_server", ["type", "ok"], "is a JSON array, not an object"),
    ("to_agent", {"type": "hello", "protocol": 1, "agent": "a"}, "unknown frame type 'hello'"),
    ("to_agent", {"type": "welcome", "user": "a", "window": "6", "last_seq": 0}, "field 'window'"),
    ("to_agent", {"type": "acked", "up_to": False}, "field 'up_to' must be an integer"),
    ("to_agent", {"type": "acked"}, "field 'up_to' is missing"),
    ("to_server", {"type": "ops", "ops": []}, "field 'ops' must have at least 1 item"),
    ("to_agent", {"type": "ok", "detail": "x"}, "field 'detail' is not allowed"),
    ("to_agent", {"type": "error", "code": "x", "message": "m" * 5000}, "field 'message'"),
    ("to_agent", {"type": "message", "key": "k", "raw": "%%%%"}, "field 'raw'"),
    ("to_agent", _snap(folder="sent"), "field 'messages[1].folder'"),
    ("to_agent", _snap(id=True), "field 'messages[1].id' must be an integer"),
    ("to_agent", _snap(subject="hi"), "field 'messages[1].subject' is not allowed"),
    ("to_agent", _snap(internaldate=None), "field 'messages[1].internaldate'"),
    (
        "to_agent",
        {**VALID_TO_AGENT["snapshot"], "messages": {"a": 1}},
        "field 'messages' must be a list",
    ),
    (
        "to_agent",
        {
            **VALID_TO_AGENT["snapshot"],
            "actions": [{"kind": "destroy", "key": "ok"}, {"kind": "destroy", "key": 5}],
        },
        "field 'actions[1].key' must be a string",
    ),
    (
        "to_agent",
        {**VALID_TO_AGENT["snapshot"], "messages": [None]},
        "field 'messages[0]' must be an object",
    ),
]


@pytest.mark.parametrize(("direction", "frame", "expected"), INVALID)
def test_invalid_frames(direction, frame, expected):
    with pytest.raises(ProtocolError) as info:
        _decode(frame, direction)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert len(message) < 300  # never echoes a huge value


def test_huge_field_names_are_not_echoed():
    with pytest.raises(ProtocolError) as info:
        _decode({"type": "ok", "x" * 10_000: 1}, "to_agent")
    assert len(str(info.value)) < 200


def test_bad_direction_is_a_programming_error():
    with pytest.raises(ValueError):
        schema.decode(b'{"type": "ok"}', "sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("trigger_key", "AB" * 32), ("trigger_key", "ab" * 31), ("sync_phrase", "short")],
)
def test_paired_carries_a_well_formed_trigger_secret(field: str, value: str) -> None:
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        _decode({**VALID_TO_AGENT["paired"], field: value}, "to_agent")
