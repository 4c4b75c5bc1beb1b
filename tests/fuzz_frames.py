"""Fuzz the frame decoder: any input ends in a ProtocolError or a valid frame.

Never another exception, a hang or unbounded memory. The generators make random bytes,
mutations of valid frames (bit flips, cuts, splices, swapped values) and deep or huge
JSON. ``tests/test_protocol_fuzz.py`` runs a few thousand through hypothesis in ``make
test``; this entry point runs as many as asked, fast::

    python -m tests.fuzz_frames --count 1000000 [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator

from imapsync_bridge.errors import ProtocolError
from imapsync_bridge.protocol import framing, schema

RAW = framing.b64encode_bytes(b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n")
DATE = "2024-05-01T09:30:00+00:00"
PUT = {"kind": "put", "key": "<1@x>", "message_id": "<1@x>", "raw": RAW,
       "internaldate": DATE, "seen": False, "flagged": True, "folder": "inbox"}  # fmt: skip
SEEDS: list[tuple[schema.Direction, dict]] = [
    ("to_server", {"type": "hello", "protocol": 1, "agent": "desk-1"}),
    ("to_server", {"type": "ca"}),
    ("to_server", {"type": "pair", "code": "abc.def", "csr": "-----BEGIN CSR-----"}),
    ("to_server", {"type": "snapshot"}),
    (
        "to_server",
        {
            "type": "ops",
            "ops": [
                {"seq": 1, "op": PUT},
                {
                    "seq": 2,
                    "op": {"kind": "flags", "key": "k", "seen": None, "flagged": True, "since": 4},
                },
                {"seq": 3, "op": {"kind": "move", "key": "k", "folder": "trash"}},
                {"seq": 4, "op": {"kind": "evict", "key": "k", "since": 2}},
                {"seq": 5, "op": {"kind": "destroy", "key": "k"}},
            ],
        },
    ),  # fmt: skip
    ("to_server", {"type": "fetch", "key": "<1@x>"}),
    ("to_server", {"type": "ack_actions", "up_to": 12}),
    ("to_server", {"type": "complete", "summary": {"pulled": 3, "fast_path": False}}),
    ("to_server", {"type": "heartbeat"}),
    ("to_agent", {"type": "welcome", "user": "alice", "last_seq": 0}),
    (
        "to_agent",
        {
            "type": "snapshot",
            "window": 6,
            "action_seq": 4,
            "messages": [
                {
                    "id": 1,
                    "key": "<1@x>",
                    "message_id": None,
                    "folder": "inbox",
                    "seen": True,
                    "flagged": False,
                    "internaldate": DATE,
                }
            ],
            "actions": [
                {"kind": "destroy", "key": "<g@x>"},
                {"kind": "restore", "key": "<r@x>"},
                {
                    "kind": "deliver",
                    "id": 1,
                    "message_id": "<o@x>",
                    "sender": "a@x",
                    "to": ["b@x"],
                    "raw": RAW,
                },
            ],
        },
    ),  # fmt: skip
    (
        "to_agent",
        {
            "type": "paired",
            "user": "alice",
            "certificate": "-----BEGIN...",
            "window": 6,
            "sync_phrase": "sync-7KQ2-MX4P-9RTA-XW3H",
            "trigger_key": "ab" * 32,
            "address": "a@phone.x",
            "desktop_address": "a@x",
        },
    ),
    ("to_agent", {"type": "acked", "up_to": 3}),
    ("to_agent", {"type": "message", "key": "<1@x>", "raw": RAW}),
    ("to_agent", {"type": "error", "code": "protocol", "message": "no"}),
    ("to_agent", {"type": "changed", "reason": "inbound_mail"}),
]
SEED_BODIES = [(d, json.dumps(f).encode()) for d, f in SEEDS]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"true", b"-1", b"1e999",
          b'"\\ud800"', b"\xff", b"\x00", b'"type"', b'"kind"', b"18446744073709551616",
          b'"2024-13-01T00:00:00"', b'"===="', b"NaN", b" "]  # fmt: skip
MAX_BODY = 1 << 20  # the fuzz's own frame limit: huge inputs are made up to this size


def check(body: bytes, direction: schema.Direction) -> bool:
    """Decode one body; True for a valid frame, False for a ProtocolError. Any other
    exception propagates (a bug); so does a message that is not one bounded line."""
    try:
        frame = schema.decode(body, direction)
    except ProtocolError as exc:
        message = str(exc)
        if "\n" in message or len(message) > 400:
            raise AssertionError(f"bad error message {message[:500]!r}") from None
        return False
    # A valid frame encodes again, and that decodes to the same frame.
    assert schema.decode(schema.encode(frame), direction) == frame
    return True


def mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if choice == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif choice == 1:  # cut
            data = data[:pos]
        elif choice == 2:  # insert a token
            data[pos:pos] = rng.choice(TOKENS)
        elif choice == 3 and data:  # delete a span
            del data[pos : pos + rng.randint(1, 8)]
        elif choice == 4:  # splice another frame in
            other = rng.choice(SEED_BODIES)[1]
            start = rng.randrange(len(other))
            data[pos:pos] = other[start : start + rng.randint(1, 40)]
        elif choice == 5 and data:  # replace a byte by a random one
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # duplicate a span
            data[pos:pos] = data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


def deep(rng: random.Random) -> bytes:
    depth = rng.choice([10, 100, 1000, 10_000, 100_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    if rng.random() < 0.5:
        return b'{"type":"complete","summary":{"x":' + inner + b"}}"
    return inner


def huge(rng: random.Random) -> bytes:
    size = rng.choice([1000, 100_000, MAX_BODY // 2])
    kind = rng.randrange(3)
    if kind == 0:
        return b'{"type":"fetch","key":"' + b"k" * size + b'"}'
    if kind == 1:
        items = b",".join([b'{"seq":1,"op":{"kind":"destroy","key":"k"}}'] * (size // 40))
        return b'{"type":"ops","ops":[' + items + b"]}"
    return b'{"type":"message","key":"k","raw":"' + b"QUFB" * (size // 4) + b'"}'


def inputs(rng: random.Random) -> Iterator[tuple[schema.Direction, bytes]]:
    """An endless mix: mostly mutations, some random bytes, a few deep or huge ones."""
    while True:
        roll = rng.random()
        direction, seed = rng.choice(SEED_BODIES)
        if rng.random() < 0.1:
            direction = "to_agent" if direction == "to_server" else "to_server"
        if roll < 0.80:
            yield direction, mutate(rng, seed)
        elif roll < 0.95:
            yield direction, rng.randbytes(rng.randint(0, 64))
        elif roll < 0.999:
            yield direction, seed
        elif roll < 0.9995:
            yield direction, deep(rng)
        else:
            yield direction, huge(rng)


def run(count: int, seed: int, report: Callable[[str], None] = print) -> dict[str, float]:
    rng = random.Random(seed)
    valid = slowest = 0.0
    started = time.perf_counter()
    source = inputs(rng)
    for n in range(1, count + 1):
        direction, body = next(source)
        t0 = time.perf_counter()
        valid += check(body, direction)
        slowest = max(slowest, time.perf_counter() - t0)
        if n % 200_000 == 0:
            report(f"{n} frames, {n / (time.perf_counter() - started):,.0f}/s")
    seconds = time.perf_counter() - started
    return {
        "count": count,
        "valid": valid,
        "seconds": seconds,
        "per_second": count / seconds,
        "slowest_ms": slowest * 1000,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    result = run(args.count, args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
