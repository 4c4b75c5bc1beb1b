"""The frames of the sync protocol: one typed definition per frame, both directions.

Each frame is a :mod:`msgspec` Struct. That one class is the frame's schema (field types
and bounds), its encoder and its decoder: there is no second, hand-written validator to
drift from it. Frames are tagged unions on ``"type"``; the agent's ops and the server's
actions inside them are tagged unions on ``"kind"``.

A session, agent → server (:data:`ToServer`) and server → agent (:data:`ToAgent`)::

    pairing (a connection without a client certificate; only these two are allowed):
      ca                                  → ca_cert   (agent checks it against the code)
      pair {code, csr}                    → paired {user, certificate, window,
                                                    sync_phrase, trigger_key, address,
                                                    desktop_address}
                                            | error

    sync (mutual TLS, the client certificate names the user):
      hello {protocol: 1, agent}          → welcome {user, last_seq}
      snapshot                            → snapshot {window, messages, actions,
                                                      action_seq}
      ops {ops: [{seq, op}, ...]} ...     → acked {up_to}, one per batch, in order: the
        (pipelined batches)                 server applies a batch in one transaction
                                            and acks it after the commit; the agent drops
                                            an op from its action list only once acked
      fetch {key}                         → message {key, raw} | error
      ack_actions {up_to}                 → ok   (the server drops its actions <= up_to)
      complete {summary}                  → ok   (both sides commit; the server closes)
      heartbeat                           → heartbeat   (the agent checks the server is there)

    unsolicited, server → agent, at any time after welcome (never in reply to a request;
    a reader skips or queues them while it waits for a reply):
      changed {reason}                    something changed on the phone side: sync soon
      heartbeat                           the server is alive (sent on a quiet connection)

    any request may be answered by error {code, message}; the session may then go on
    (per-request errors) or the server closes the connection.

Ops (the agent's actions, ``op.kind``): ``put`` (a message the phone should hold, its raw
bytes in base64), ``flags`` (set or clear single flags, ``null`` = leave alone, unless the
phone user changed that flag after the snapshot ``since`` the plan came from), ``move``
(inbox <-> trash), ``evict`` (drop from the phone window, not a delete; with ``since``,
kept when the phone user changed it after that snapshot) and ``destroy`` (permanent).
Sequence numbers are the agent's, increasing; ``welcome.last_seq`` is the highest one the
server has applied, so a retry after a lost connection resends only what is newer and an
op is applied once.

Actions (the server's, in ``snapshot.actions``, ``kind``): ``destroy`` (the phone user
destroyed a message: a tombstone until acknowledged), ``restore`` (the phone user
restored it from the trash) and ``deliver`` (an outgoing message for the desktop to send;
defined, not yet produced). They are acknowledged together by ``ack_actions``.

Decoding refuses, with a one-line :class:`ProtocolError` naming the field: unknown frame
types, missing fields, fields of the wrong type (a JSON boolean is not an integer),
strings and lists over their bound, unknown extra fields, invalid base64, timestamps
without a UTC offset. Raw message bytes are ``bytes`` fields (standard base64 in JSON).
Duplicate keys inside an object are not refused: the last one wins (one parser reads the
frame, so no validator and reader can disagree about it).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from imapsync_bridge.errors import ProtocolError

PROTOCOL_VERSION: Literal[1] = 1
MAX_INT = 2**63 - 1  # what SQLite stores
MAX_BATCH = 256  # ops in one "ops" frame
MAX_SUMMARY_BYTES = 64 * 1024

# --------------------------------------------------------------------------- field types

Seq = Annotated[int, Meta(ge=0, le=MAX_INT)]
Window = Annotated[int, Meta(ge=0, le=1_000_000)]
Key = Annotated[str, Meta(min_length=1, max_length=1000)]  # Message-ID, or sha256:<hash>
MessageId = Annotated[str, Meta(min_length=1, max_length=1000)] | None
User = Annotated[str, Meta(min_length=1, max_length=200)]
Pem = Annotated[str, Meta(min_length=1, max_length=20000)]
Address = Annotated[str, Meta(min_length=1, max_length=1000)]
Folder = Literal["inbox", "trash"]
Timestamp = Annotated[datetime, Meta(tz=True)]  # ISO 8601 with a UTC offset
Raw = bytes  # standard base64 in JSON


class Frame(Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    """Base of every frame; the subclass's ``tag`` is its ``"type"``."""


class Op(Struct, tag_field="kind", forbid_unknown_fields=True, omit_defaults=True):
    """Base of the agent's ops (``kind``)."""


class Action(Struct, tag_field="kind", forbid_unknown_fields=True):
    """Base of the server's actions (``kind``)."""


# --------------------------------------------------------------------------- ops


class Put(Op, tag="put"):
    key: Key
    message_id: MessageId
    raw: Raw
    internaldate: Timestamp
    seen: bool
    flagged: bool
    folder: Folder


class SetFlags(Op, tag="flags"):
    """Only the flags that change (``None``: leave alone); ``since`` is the snapshot's
    ``action_seq`` the plan was made from: a flag the phone user changed later stays."""

    key: Key
    seen: bool | None
    flagged: bool | None
    since: Seq


class Move(Op, tag="move"):
    key: Key
    folder: Folder


class Evict(Op, tag="evict"):
    """``since`` (optional): kept on the phone when its user changed it after that
    snapshot; without it the eviction is unconditional."""

    key: Key
    since: Seq | None = None


class Destroy(Op, tag="destroy"):
    key: Key


AnyOp = Put | SetFlags | Move | Evict | Destroy
OP_KINDS = ("put", "flags", "move", "evict", "destroy")


class OpItem(Struct, forbid_unknown_fields=True):
    seq: Seq
    op: AnyOp


# --------------------------------------------------------------------------- actions


class Destroyed(Action, tag="destroy"):
    key: Key


class Restored(Action, tag="restore"):
    key: Key


class Deliver(Action, tag="deliver"):
    """An outgoing message the phone queued "send via desktop" (no delivery logic yet)."""

    id: Seq
    message_id: Key
    sender: Address
    to: Annotated[list[Address], Meta(min_length=1, max_length=100)]
    raw: Raw


AnyAction = Destroyed | Restored | Deliver
ACTION_KINDS = ("destroy", "restore", "deliver")


# --------------------------------------------------------------------------- agent → server


class Hello(Frame, tag="hello"):
    protocol: Literal[1]
    agent: Annotated[str, Meta(min_length=1, max_length=64)]


class CaRequest(Frame, tag="ca"):
    pass


class Pair(Frame, tag="pair"):
    code: Annotated[str, Meta(min_length=1, max_length=200)]
    csr: Annotated[str, Meta(min_length=1, max_length=10000)]


class SnapshotRequest(Frame, tag="snapshot"):
    pass


class Ops(Frame, tag="ops"):
    ops: Annotated[list[OpItem], Meta(min_length=1, max_length=MAX_BATCH)]


class Fetch(Frame, tag="fetch"):
    key: Key


class AckActions(Frame, tag="ack_actions"):
    up_to: Seq


class Complete(Frame, tag="complete"):
    summary: dict[Annotated[str, Meta(max_length=64)], Any]

    def __post_init__(self) -> None:
        if len(msgspec.json.encode(self.summary)) > MAX_SUMMARY_BYTES:
            raise ValueError(f"summary: must be at most {MAX_SUMMARY_BYTES} bytes of JSON")


class Heartbeat(Frame, tag="heartbeat"):
    """Both ways: the agent's check that the server is there (answered with one), and the
    server's unsolicited sign of life on a quiet connection."""


# --------------------------------------------------------------------------- server → agent


class Welcome(Frame, tag="welcome"):
    user: User
    last_seq: Seq


class CaCert(Frame, tag="ca_cert"):
    pem: Pem


class Paired(Frame, tag="paired"):
    """The new agent's certificate and what it needs to judge trigger mails: the sync
    phrase, the token key (64 hex digits), and the user's own addresses (a trigger
    typed by hand counts only from those)."""

    user: User
    certificate: Pem
    window: Window
    sync_phrase: Annotated[str, Meta(min_length=8, max_length=200)]
    trigger_key: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    address: Address
    desktop_address: Address


class SnapshotMessage(Struct, forbid_unknown_fields=True):
    id: Seq
    key: Key
    message_id: MessageId
    folder: Folder
    seen: bool
    flagged: bool
    internaldate: Timestamp


class Snapshot(Frame, tag="snapshot"):
    window: Window
    messages: list[SnapshotMessage]
    actions: list[AnyAction]
    action_seq: Seq

    @property
    def destroyed(self) -> list[str]:
        """Keys the phone user destroyed (tombstones until acknowledged), oldest first."""
        return [a.key for a in self.actions if isinstance(a, Destroyed)]

    @property
    def restored(self) -> list[str]:
        """Keys the phone user restored since the last acknowledgement."""
        return [a.key for a in self.actions if isinstance(a, Restored)]


class Acked(Frame, tag="acked"):
    up_to: Seq


class Message(Frame, tag="message"):
    key: Key
    raw: Raw


class Ok(Frame, tag="ok"):
    pass


class Error(Frame, tag="error"):
    code: Annotated[str, Meta(min_length=1, max_length=64)]
    message: Annotated[str, Meta(max_length=2000)]


class Changed(Frame, tag="changed"):
    """Unsolicited: something changed on the phone side, a sync would carry it over."""

    reason: Literal["phone_action", "inbound_mail", "outgoing", "sync_request"]


ToServer = (
    Hello | CaRequest | Pair | SnapshotRequest | Ops | Fetch | AckActions | Complete | Heartbeat
)
ToAgent = Welcome | CaCert | Paired | Snapshot | Acked | Message | Ok | Error | Changed | Heartbeat
Notice = Changed | Heartbeat  # what the server sends unasked
TO_SERVER: tuple[type[Frame], ...] = ToServer.__args__
TO_AGENT: tuple[type[Frame], ...] = ToAgent.__args__

Direction = Literal["to_server", "to_agent"]
F = TypeVar("F", bound=Frame)


def frame_type(frame: Frame | type[Frame]) -> str:
    """The ``"type"`` tag of a frame (or frame class)."""
    cls = frame if isinstance(frame, type) else type(frame)
    return str(cls.__struct_config__.tag)


# --------------------------------------------------------------------------- codec

_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "to_server": msgspec.json.Decoder(ToServer),
    "to_agent": msgspec.json.Decoder(ToAgent),
}
_OP_DECODER = msgspec.json.Decoder(AnyOp)


class _Head(Struct):
    type: str


_HEAD = msgspec.json.Decoder(_Head)


def encode(frame: Frame) -> bytes:
    """The JSON body of one frame (UTF-8)."""
    return _ENCODER.encode(frame)


def decode(body: bytes | bytearray | memoryview, direction: Direction) -> Any:
    """One frame sent in ``direction`` from its JSON body; ProtocolError when invalid."""
    decoder = _DECODERS.get(direction)
    if decoder is None:
        raise ValueError(f"direction must be 'to_server' or 'to_agent', not {direction!r}")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(_explain(str(exc), body, direction)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(_malformed(str(exc))) from None
    except RecursionError:
        raise ProtocolError("frame is nested too deeply") from None


def decode_to_server(body: bytes | bytearray | memoryview) -> ToServer:
    frame: ToServer = decode(body, "to_server")
    return frame


def decode_to_agent(body: bytes | bytearray | memoryview) -> ToAgent:
    frame: ToAgent = decode(body, "to_agent")
    return frame


def op_from_journal(op: dict[str, Any], raw: bytes | None) -> AnyOp:
    """A typed op from its journaled JSON form (raw bytes travel beside it)."""
    fields = dict(op)
    if raw is not None:
        fields["raw"] = raw
    try:
        converted: AnyOp = msgspec.convert(fields, AnyOp)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"journaled op: {_field_problem(str(exc))}") from None
    return converted


def op_fields(op: AnyOp) -> dict[str, Any]:
    """An op as the store applies it: its fields plus ``kind`` (raw stays bytes, the
    internaldate a datetime)."""
    fields = msgspec.structs.asdict(op)
    fields["kind"] = op.__struct_config__.tag
    return fields


def to_builtins(frame: Frame) -> dict[str, Any]:
    """A frame as plain JSON-like values (bytes as base64, timestamps as text)."""
    value: dict[str, Any] = msgspec.to_builtins(frame)
    return value


# --------------------------------------------------------------------------- messages

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>.*)`)?$", re.DOTALL)
_TYPES = {
    "int": "an integer",
    "str": "a string",
    "str | null": "a string or null",
    "bool": "true or false",
    "bool | null": "true, false or null",
    "bytes": "a base64 string",
    "object": "an object",
    "array": "a list",
    "datetime": "an ISO 8601 timestamp with a UTC offset",
    "int | null": "an integer or null",
}
_ENUMS = {"folder": '"inbox" or "trash"', "protocol": str(PROTOCOL_VERSION), "reason": None}
_KINDS = {"kind": " or ".join(OP_KINDS + ACTION_KINDS)}


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field_problem(message: str) -> str:
    """``field 'PATH' PROBLEM`` from one msgspec ValidationError message."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any text
    msg, path = match["msg"], _short((match["path"] or "").lstrip("."), 120)
    if not path and (m := re.fullmatch(r"(\w+): (.*)", msg, re.DOTALL)):  # __post_init__
        return f"field {m[1]!r} {_short(m[2], 200)}"
    leaf = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
    if m := re.fullmatch(r"Object missing required field `(.*)`", msg, re.DOTALL):
        return f"field {_join(path, _short(m[1]))!r} is missing"
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", msg, re.DOTALL):
        return f"field {_join(path, _short(m[1]))!r} is not allowed (unknown field)"
    if m := re.fullmatch(r"Expected `(str|array)` of length ([<>]=) (\d+)", msg):
        kind, op, n = m[1], m[2], int(m[3])
        if kind == "str":
            if op == ">=":
                return f"field {path!r} must not be empty"
            return f"field {path!r} must be at most {n} characters"
        word = "at least" if op == ">=" else "at most"
        return f"field {path!r} must have {word} {n} item(s)"
    if m := re.fullmatch(r"Expected `int` ([<>]=) (\d+)", msg):
        bound = "at most" if m[1] == "<=" else "at least"
        return f"field {path!r} must be an integer of {bound} {m[2]}"
    if re.fullmatch(r"Expected `datetime`.*|Invalid RFC3339 encoded datetime", msg):
        return f"field {path!r} must be an ISO 8601 timestamp with a UTC offset"
    if msg == "Invalid base64 encoded string":
        return f"field {path!r} must be valid base64"
    if m := re.fullmatch(r"Expected `([^`]*)`(?:, got `[^`]*`)?", msg):
        return f"field {path!r} must be {_TYPES.get(m[1], m[1])}"
    if msg.startswith("Invalid enum value"):
        allowed = _ENUMS.get(leaf)
        return f"field {path!r} must be {allowed}" if allowed else f"field {path!r} is invalid"
    if msg.startswith("Invalid value") and leaf in _KINDS:
        return f"field {path!r} must be {_KINDS[leaf]}"
    return f"field {path!r} {_short(msg, 200)}"


def _explain(message: str, body: bytes | bytearray | memoryview, direction: Direction) -> str:
    match = _AT.match(message)
    assert match is not None
    msg, path = match["msg"], match["path"]
    where = direction.replace("_", " ")
    if path is None:
        if m := re.fullmatch(r"Expected `object`, got `(\w+)`", msg):
            return f"frame is a JSON {_JSON_KINDS.get(m[1], m[1])}, not an object"
        if msg == "Object missing required field `type`":
            return "frame has no 'type' string"
    elif path == ".type":
        if m := re.fullmatch(r"Invalid value '(.*)'", msg, re.DOTALL):
            return f"unknown frame type {_short(m[1])!r} ({where})"
        return "frame has no 'type' string"
    try:
        ftype = _short(_HEAD.decode(body).type)
    except (msgspec.MsgspecError, RecursionError):
        ftype = "?"
    return f"frame {ftype!r}: {_field_problem(message)}"


_JSON_KINDS = {"str": "string", "int": "number", "float": "number", "bool": "boolean"}


def _malformed(message: str) -> str:
    if "truncated" in message:
        return "frame is not valid JSON: it ends too early"
    if "utf-8" in message.lower() and "surrogate" not in message:
        return f"frame is not valid UTF-8: {_short(message, 200)}"
    return f"frame is not valid JSON: {_short(message.removeprefix('JSON is malformed: '), 200)}"
