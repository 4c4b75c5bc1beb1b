"""The frame decoder under fuzzing (a few thousand inputs; ``python -m tests.fuzz_frames``
runs a million): every input ends in a ProtocolError or a valid frame."""

from __future__ import annotations

import json
import random

import fuzz_frames as fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DIRECTIONS = st.sampled_from(["to_server", "to_agent"])
FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=256), DIRECTIONS)
def test_random_bytes(body, direction):
    fuzz.check(body, direction)


@FAST
@given(st.integers(0, 2**32), st.sampled_from(fuzz.SEED_BODIES))
def test_mutated_valid_frames(seed, seeded):
    direction, body = seeded
    fuzz.check(fuzz.mutate(random.Random(seed), body), direction)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@FAST
@given(
    st.sampled_from(fuzz.SEEDS),
    st.text(max_size=20),
    JSON,
)
def test_valid_frames_with_a_field_replaced_or_added(seeded, name, value):
    direction, frame = seeded
    changed = dict(frame)
    key = name if name and name != "type" and not frame.keys() - {"type"} else None
    key = key or next(iter(frame.keys() - {"type"}), name or "x")
    changed[key] = value
    fuzz.check(json.dumps(changed).encode(), direction)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32))
def test_deep_and_huge_json(seed):
    rng = random.Random(seed)
    fuzz.check(fuzz.deep(rng), "to_server")
    fuzz.check(fuzz.huge(rng), rng.choice(["to_server", "to_agent"]))


def test_the_fuzz_entry_point_runs():
    result = fuzz.run(2000, seed=7, report=lambda line: None)
    assert result["count"] == 2000 and result["valid"] > 0
