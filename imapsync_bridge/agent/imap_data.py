"""IMAP response data, without I/O: UID sets, FETCH items, dates.

The parsing half of the adapter in :mod:`imapsync_bridge.agent.imap`, kept apart so it
reads (and is tested) on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from imapclient.response_parser import parse_fetch_response

from imapsync_bridge import model
from imapsync_bridge.errors import MessageError

#: UIDs per command where a request is split (keeps command lines and replies bounded).
CHUNK = 5000
#: The answer of ``UID SORT RETURN (PARTIAL ...)``: ``... PARTIAL (1:58 3,7,5)``.
PARTIAL = re.compile(rb"PARTIAL \(\S+ (NIL|[0-9,:]+)\)")


def msgset(uids: Iterable[int]) -> str:
    """IMAP sequence set for *uids*, consecutive runs compressed (``1:3,7``)."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev > start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev > start else str(start))
    return ",".join(parts)


def expand_set(text: bytes) -> list[int]:
    """The UIDs of a (numeric, ordered as written) IMAP sequence set like ``4:6,9``."""
    out: list[int] = []
    for part in text.split(b","):
        if b":" in part:
            a, b = (int(x) for x in part.split(b":"))
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        else:
            out.append(int(part))
    return out


def raw_or_error(
    uid: int, d: dict[bytes, Any] | None, max_size: int, mailbox: str | None
) -> bytes | MessageError:
    if d is None or b"RFC822.SIZE" not in d:
        return MessageError(f"UID {uid} in {mailbox} no longer exists")
    size = int(d[b"RFC822.SIZE"])
    if size > max_size:
        return MessageError(f"UID {uid} is {size} bytes, larger than the limit {max_size}")
    body = fetch_item(d, b"BODY[]")
    if body is None:
        return MessageError(f"UID {uid}: server returned no body")
    return body


def size_batches(
    uids: Sequence[int], sizes: Mapping[int, int], most: int, most_bytes: int
) -> Iterator[list[int]]:
    """*uids* in order, in batches of at most *most* messages and *most_bytes* (a
    message larger than that alone makes a batch)."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= most or total + size > most_bytes):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def chunks(items: Sequence[int], size: int = CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def flags_of(raw: Iterable[bytes]) -> model.Flags:
    names = {f.lower() if isinstance(f, bytes) else f.encode().lower() for f in raw}
    return model.Flags(seen=b"\\seen" in names, flagged=b"\\flagged" in names)


def modseq_of(data: dict[bytes, Any]) -> int | None:
    """The MODSEQ of one FETCH response (``MODSEQ (12)``), or None when absent."""
    value = data.get(b"MODSEQ")
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fetch_item(data: dict[bytes, Any], prefix: bytes) -> bytes | None:
    """The value of the first FETCH item whose name starts with *prefix*."""
    for name, value in data.items():
        if name.upper().startswith(prefix):
            return value if isinstance(value, bytes) else (value or b"")
    return None


def by_uid(data: list) -> dict[int, dict[bytes, Any]]:
    """Parsed FETCH responses keyed by UID; responses without a UID (unsolicited
    flag updates for other messages) are dropped."""
    parsed = parse_fetch_response(data, False, False)
    out: dict[int, dict[bytes, Any]] = {}
    for d in parsed.values():
        if b"UID" in d:
            out.setdefault(int(d[b"UID"]), {}).update(d)
    return out


def utc(value: datetime) -> datetime:
    if value.tzinfo is None:  # never expected with normalise_times=False
        raise ValueError("naive INTERNALDATE")
    return value.astimezone(UTC)
