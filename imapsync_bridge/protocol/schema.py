"""The frames of the sync protocol, and their validation.

A session, agent → server (``to_server``) and server → agent (``to_agent``)::

    pairing (a connection without a client certificate; only these two are allowed):
      ca                                  → ca_cert   (agent checks it against the code)
      pair {code, csr}                    → paired {user, certificate, window}
                                            | error

    sync (mutual TLS, the client certificate names the user):
      hello {protocol: 1, agent}          → welcome {user, window, last_seq}
      snapshot                            → snapshot {window, messages, destroyed,
                                                      action_seq}
      ops {ops: [{seq, op}, ...]} ...     → acked {up_to}, one per batch, in order: the
        (pipelined batches)                 server applies a batch in one transaction
                                            and acks it after the commit; the agent drops
                                            an op from its action list only once acked
      fetch {key}                         → message {key, raw} | error
      ack_actions {up_to}                 → ok   (the server drops its actions <= up_to)
      complete {summary}                  → ok   (both sides commit; the server closes)

    any request may be answered by error {code, message}; the session may then go on
    (per-request errors) or the server closes the connection.

Ops (the agent's actions, ``op.kind``): ``put`` (a message the phone should hold, its raw
bytes in base64), ``flags`` (set or clear single flags, unless the phone user changed that
flag after the snapshot the plan came from), ``move`` (inbox <-> trash), ``evict`` (drop
from the phone window, not a delete) and ``destroy`` (permanent). Sequence numbers are the agent's,
increasing; ``welcome.last_seq`` is the highest one the server has applied, so a retry
after a lost connection resends only what is newer and an op is applied once.

Every frame is checked by :func:`validate` against the table :data:`TO_SERVER` /
:data:`TO_AGENT` below: unknown frame types, missing fields, fields of the wrong type,
strings over their bound and unknown extra fields are all refused with a one-line
:class:`ProtocolError` naming the field. Validation does not decode base64 payloads; it
checks their alphabet and padding (decode with :func:`framing.b64decode_field`).
Timestamps (``internaldate``) are ISO 8601 with a UTC offset (naive ones are refused).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from imapsync_bridge.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_INT = 2**63 - 1  # what SQLite stores


class _Invalid(Exception):
    """A field is wrong: path + what it must be (turned into a ProtocolError)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------- field specs


class Spec:
    """One field's expected type. ``check`` raises _Invalid(path, problem)."""

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Spec):
    max_len: int
    min_len: int = 0

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _Invalid(path, "must be a string")
        _check_text(value, path, self.min_len, self.max_len)


def _check_text(value: str, path: str, min_len: int, max_len: int) -> None:
    if len(value) > max_len:
        raise _Invalid(path, f"must be at most {max_len} characters (got {len(value)})")
    if len(value) < min_len:
        raise _Invalid(path, "must not be empty" if min_len == 1 else f"must be >= {min_len}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(path, "must be valid Unicode text (lone surrogate)") from None


@dataclass(frozen=True)
class OptStr(Spec):
    """A string or null."""

    max_len: int
    min_len: int = 0

    def check(self, value: Any, path: str) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise _Invalid(path, "must be a string or null")
        _check_text(value, path, self.min_len, self.max_len)


@dataclass(frozen=True)
class Int(Spec):
    """A non-negative integer (a JSON boolean is not an integer)."""

    maximum: int = MAX_INT

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, "must be an integer")
        if value < 0 or value > self.maximum:
            raise _Invalid(path, f"must be an integer from 0 to {self.maximum}")


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _Invalid(path, "must be true or false")


@dataclass(frozen=True)
class OptBool(Spec):
    """true, false or null (null: leave as it is)."""

    def check(self, value: Any, path: str) -> None:
        if value is not None and not isinstance(value, bool):
            raise _Invalid(path, "must be true, false or null")


@dataclass(frozen=True)
class OneOf(Spec):
    """One of a few fixed values (JSON strings or numbers)."""

    values: tuple[Any, ...]

    def check(self, value: Any, path: str) -> None:
        ok = any(value == v and type(value) is type(v) for v in self.values)
        if not ok:
            allowed = " or ".join(json.dumps(v) for v in self.values)
            raise _Invalid(path, f"must be {allowed}")


_ISO_SHAPE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})"
)


@dataclass(frozen=True)
class Timestamp(Spec):
    """An ISO 8601 date-time with a UTC offset, e.g. ``2024-05-01T09:30:00+00:00``."""

    def check(self, value: Any, path: str) -> None:
        problem = "must be an ISO 8601 timestamp with a UTC offset"
        if not isinstance(value, str) or len(value) > 40 or not _ISO_SHAPE.fullmatch(value):
            raise _Invalid(path, problem)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid(path, problem) from None
        if parsed.tzinfo is None:
            raise _Invalid(path, problem)


_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class B64(Spec):
    """Standard base64 (with padding) of raw bytes; checked, not decoded."""

    max_len: int | None = None  # in base64 characters; None = bounded by the frame size

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _Invalid(path, "must be a base64 string")
        if self.max_len is not None and len(value) > self.max_len:
            raise _Invalid(path, f"must be at most {self.max_len} characters")
        if len(value) % 4 or not _B64.fullmatch(value):
            raise _Invalid(path, "must be valid base64")


@dataclass(frozen=True)
class Obj(Spec):
    """A nested object with its own fields (all required unless listed in optional)."""

    fields: Mapping[str, Spec]
    optional: frozenset[str] = frozenset()

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, "must be an object")
        check_fields(value, self.fields, self.optional, path)


@dataclass(frozen=True)
class Tagged(Spec):
    """An object whose shape depends on its ``tag`` field (a discriminated union)."""

    tag: str
    variants: Mapping[str, Mapping[str, Spec]]
    optional: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, "must be an object")
        kind = value.get(self.tag)
        tag_path = _join(path, self.tag)
        if self.tag not in value:
            raise _Invalid(tag_path, "is missing")
        OneOf(tuple(self.variants)).check(kind, tag_path)
        rest = {k: v for k, v in value.items() if k != self.tag}
        check_fields(
            rest, self.variants[str(kind)], self.optional.get(str(kind), frozenset()), path
        )


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    max_items: int | None = None  # None = bounded by the frame size
    min_items: int = 0

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(path, "must be a list")
        if len(value) < self.min_items:
            raise _Invalid(path, f"must have at least {self.min_items} item(s)")
        if self.max_items is not None and len(value) > self.max_items:
            raise _Invalid(path, f"must have at most {self.max_items} items")
        for index, item in enumerate(value):
            self.item.check(item, f"{path}[{index}]")


@dataclass(frozen=True)
class AnyObj(Spec):
    """Any JSON object whose encoding is at most ``max_bytes`` (e.g. a summary)."""

    max_bytes: int = 64 * 1024

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, "must be an object")
        try:
            size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
        except (TypeError, ValueError):
            raise _Invalid(path, "must be plain JSON text") from None
        if size > self.max_bytes:
            raise _Invalid(path, f"must be at most {self.max_bytes} bytes of JSON")


def check_fields(
    value: Mapping[str, Any], fields: Mapping[str, Spec], optional: frozenset[str], path: str
) -> None:
    for name, spec in fields.items():
        if name not in value:
            if name in optional:
                continue
            raise _Invalid(_join(path, name), "is missing")
        spec.check(value[name], _join(path, name))
    for name in value:
        if name not in fields:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise _Invalid(_join(path, shown), "is not allowed (unknown field)")


# --------------------------------------------------------------------------- the protocol

KEY = Str(1000, min_len=1)  # a message key: its Message-ID, or sha256:<hash>
MESSAGE_ID = OptStr(1000, min_len=1)
FOLDER = OneOf(("inbox", "trash"))
SEQ = Int()
USER = Str(200, min_len=1)
PEM = Str(20000, min_len=1)
WINDOW = Int(maximum=1_000_000)
MAX_BATCH = 256  # ops in one "ops" frame

OP_KINDS: dict[str, dict[str, Spec]] = {
    "put": {
        "key": KEY,
        "message_id": MESSAGE_ID,
        "raw": B64(),
        "internaldate": Timestamp(),
        "seen": Bool(),
        "flagged": Bool(),
        "folder": FOLDER,
    },
    # only the flags that change (null: leave alone); "since" is the snapshot's
    # action_seq the plan was made from: a flag the phone user changed later is kept
    "flags": {"key": KEY, "seen": OptBool(), "flagged": OptBool(), "since": SEQ},
    "move": {"key": KEY, "folder": FOLDER},
    # "since" (optional): kept on the phone when its user changed it after that snapshot
    "evict": {"key": KEY, "since": SEQ},
    "destroy": {"key": KEY},
}

OP_OPTIONAL = {"evict": frozenset({"since"})}
OP = Tagged("kind", OP_KINDS, OP_OPTIONAL)

TO_SERVER: dict[str, dict[str, Spec]] = {
    "hello": {"protocol": OneOf((PROTOCOL_VERSION,)), "agent": Str(64, min_len=1)},
    "ca": {},
    "pair": {"code": Str(200, min_len=1), "csr": Str(10000, min_len=1)},
    "snapshot": {},
    "ops": {"ops": ListOf(Obj({"seq": SEQ, "op": OP}), MAX_BATCH, min_items=1)},
    "fetch": {"key": KEY},
    "ack_actions": {"up_to": SEQ},
    "complete": {"summary": AnyObj()},
}

SNAPSHOT_MESSAGE: dict[str, Spec] = {
    "id": Int(),
    "key": KEY,
    "message_id": MESSAGE_ID,
    "folder": FOLDER,
    "seen": Bool(),
    "flagged": Bool(),
    "internaldate": Timestamp(),
}

TO_AGENT: dict[str, dict[str, Spec]] = {
    "welcome": {"user": USER, "window": WINDOW, "last_seq": SEQ},
    "ca_cert": {"pem": PEM},
    "paired": {"user": USER, "certificate": PEM, "window": WINDOW},
    "snapshot": {
        "window": WINDOW,
        "messages": ListOf(Obj(SNAPSHOT_MESSAGE)),
        "destroyed": ListOf(KEY),
        "restored": ListOf(KEY),
        "action_seq": SEQ,
    },
    "acked": {"up_to": SEQ},
    "message": {"key": KEY, "raw": B64()},
    "ok": {},
    "error": {"code": Str(64, min_len=1), "message": Str(2000)},
}

TABLES: dict[str, dict[str, dict[str, Spec]]] = {"to_server": TO_SERVER, "to_agent": TO_AGENT}

Direction = Literal["to_server", "to_agent"]


def validate(frame: Any, direction: Direction) -> dict[str, Any]:
    """Check one decoded frame sent in ``direction``; return it unchanged when valid."""
    table = TABLES.get(direction)
    if table is None:
        raise ValueError(f"direction must be 'to_server' or 'to_agent', not {direction!r}")
    if not isinstance(frame, dict):
        raise ProtocolError("frame must be a JSON object")
    ftype = frame.get("type")
    if not isinstance(ftype, str):
        raise ProtocolError("frame has no 'type' string")
    fields = table.get(ftype)
    if fields is None:
        shown = ftype if len(ftype) <= 40 else ftype[:40] + "..."
        raise ProtocolError(f"unknown frame type {shown!r} ({direction.replace('_', ' ')})")
    body = {k: v for k, v in frame.items() if k != "type"}
    try:
        check_fields(body, fields, frozenset(), "")
    except _Invalid as exc:
        raise ProtocolError(f"frame {ftype!r}: field {exc.path!r} {exc.problem}") from None
    return frame
