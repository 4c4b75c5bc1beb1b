"""The trigger mail's judgement (patent FIG. 11), pure: table-driven and property-based."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapsync_bridge.server.trigger_mail import PHRASE_ALPHABET, new_sync_phrase
from imapsync_bridge.sync.trigger import (
    FUTURE_SKEW,
    TriggerMail,
    TriggerSecret,
    Verdict,
    carries_phrase,
    judge,
    keep_used_for,
    make_token,
    once_key,
    parse_token,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MAX_AGE = 900
PHRASE = "sync-7KQ2-MX4P-9RTA-XW3H"
KEY = bytes(range(32))
SECRET = TriggerSecret(
    phrase=PHRASE,
    key=KEY,
    user="alice",
    own_addresses=frozenset({"alice@phone.example", "alice@corp.example"}),
)
NONCE = "0123456789abcdef" * 2


def token(ts: datetime = NOW, key: bytes = KEY, user: str = "alice", nonce: str = NONCE) -> str:
    return make_token(key, user, nonce, int(ts.timestamp()))


def mail(**fields: object) -> TriggerMail:
    base = TriggerMail(
        uid=7,
        subject=PHRASE,
        sender="alice@phone.example",
        date=NOW - timedelta(seconds=30),
        token=token(NOW - timedelta(seconds=30)),
        message_id="<t1@phone.example>",
        header_digest="ab" * 32,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def flip_mac_bit(value: str, bit: int) -> str:
    head, mac = value.rsplit("mac=", 1)
    number = int(mac, 16) ^ (1 << bit)
    return f"{head}mac={number:064x}"


@pytest.mark.parametrize(
    ("name", "changes", "verdict"),
    [
        ("server trigger", {}, Verdict.ACCEPT),
        ("server trigger from a stranger's From", {"sender": "x@evil.example"}, Verdict.ACCEPT),
        ("hand-typed from the phone", {"token": None}, Verdict.ACCEPT),
        ("hand-typed from the desktop", {"token": None, "sender": "alice@corp.example"},
         Verdict.ACCEPT),
        ("hand-typed, no Message-ID", {"token": None, "message_id": None}, Verdict.ACCEPT),
        ("reply prefix", {"subject": f"Re: Fwd: {PHRASE}"}, Verdict.ACCEPT),
        ("typed loosely", {"subject": "SYNC 7kq2 mx4p 9rta  xw3h", "token": None},
         Verdict.ACCEPT),
        ("no phrase", {"subject": "Lunch?"}, Verdict.NOT_A_TRIGGER),
        ("look-alike", {"subject": "sync-7KQ2-MX4P-9RTA-XW3"}, Verdict.NOT_A_TRIGGER),
        ("other user's phrase", {"subject": "sync-7KQ2-MX4P-9RTA-XW3J"}, Verdict.NOT_A_TRIGGER),
        ("forged: stranger, no token", {"token": None, "sender": "x@evil.example"},
         Verdict.FORGED),
        ("forged: no From", {"token": None, "sender": ""}, Verdict.FORGED),
        ("token malformed", {"token": "v1; nonce=xyz"}, Verdict.BAD_TOKEN),
        ("token for another user", {"token": token(user="bob")}, Verdict.BAD_TOKEN),
        ("token with another key", {"token": token(key=b"k" * 32)}, Verdict.BAD_TOKEN),
        ("Date too old", {"date": NOW - timedelta(seconds=MAX_AGE + 1)}, Verdict.STALE),
        ("token too old", {"token": token(NOW - timedelta(seconds=MAX_AGE + 1))}, Verdict.STALE),
        ("Date far ahead", {"date": NOW + timedelta(seconds=FUTURE_SKEW + 1)}, Verdict.STALE),
        ("token far ahead", {"token": token(NOW + timedelta(seconds=FUTURE_SKEW + 1))},
         Verdict.STALE),
        ("Date slightly ahead", {"date": NOW + timedelta(seconds=FUTURE_SKEW)}, Verdict.ACCEPT),
        ("token, no Date", {"date": None}, Verdict.ACCEPT),
        ("hand-typed, no Date", {"token": None, "date": None}, Verdict.STALE),
    ],
)  # fmt: skip
def test_judgement_table(name: str, changes: dict[str, object], verdict: Verdict) -> None:
    judgement = judge(mail(**changes), SECRET, NOW, MAX_AGE, used=set())
    assert judgement.verdict is verdict, (name, judgement.reason)
    assert PHRASE not in judgement.reason and KEY.hex() not in judgement.reason


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({}, f"nonce:{NONCE}"),
        ({"token": None}, "mid:<t1@phone.example>"),
        ({"token": None, "message_id": None}, "hdr:" + "ab" * 32),
    ],
)
def test_once_only_key_is_nonce_else_message_id_else_header_digest(
    changes: dict[str, object], key: str
) -> None:
    assert once_key(mail(**changes)) == key
    assert judge(mail(**changes), SECRET, NOW, MAX_AGE, used={key}).verdict is Verdict.REPLAYED


def test_freshness_boundaries_are_inclusive() -> None:
    at_limit = NOW - timedelta(seconds=MAX_AGE)
    fresh = mail(date=at_limit, token=token(at_limit))
    assert judge(fresh, SECRET, NOW, MAX_AGE, set()).verdict is Verdict.ACCEPT
    assert judge(fresh, SECRET, NOW + timedelta(seconds=1), MAX_AGE, set()).verdict is (
        Verdict.STALE
    )


def test_token_round_trip_and_strict_syntax() -> None:
    value = token()
    parsed = parse_token(value)
    assert parsed is not None and parsed.nonce == NONCE and parsed.ts == int(NOW.timestamp())
    assert parse_token(value.upper().replace("V1", "v1")) == parsed  # hex case does not matter
    for bad in ("", "v2" + value[2:], value + "; extra=1", value.replace("ts=", "ts=-"),
                "v1; nonce=00; ts=1; mac=00", value + "x" * 400):  # fmt: skip
        assert parse_token(bad) is None, bad
    with pytest.raises(ValueError):
        make_token(KEY, "alice", "not hex", 1)


def test_used_keys_are_remembered_longer_than_a_trigger_stays_fresh() -> None:
    assert keep_used_for(900) == timedelta(days=7)
    assert keep_used_for(30 * 86400) > timedelta(days=30)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=255))
def test_any_mac_bit_flip_is_a_bad_token(bit: int) -> None:
    forged = mail(token=flip_mac_bit(mail().token or "", bit))
    assert judge(forged, SECRET, NOW, MAX_AGE, set()).verdict is Verdict.BAD_TOKEN


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.integers(min_value=-MAX_AGE, max_value=0))
def test_an_accepted_key_is_never_accepted_twice(nonce: bytes, offset: int) -> None:
    moment = NOW + timedelta(seconds=offset)
    trigger = mail(token=token(moment, nonce=nonce.hex()), date=moment)
    used: set[str] = set()
    first = judge(trigger, SECRET, NOW, MAX_AGE, used)
    assert first.accepted
    used.add(first.once_key)
    again = judge(trigger, SECRET, NOW + timedelta(seconds=1), MAX_AGE, used)
    assert again.verdict in (Verdict.REPLAYED, Verdict.STALE)


@pytest.mark.parametrize(
    ("subject", "carries"),
    [
        (PHRASE, True),
        (f"Re: {PHRASE.lower()}", True),
        ("SYNC 7KQ2 MX4P 9RTA XW3H please", True),
        ("sync-7KQ2-MX4P-9RTA", False),
        ("", False),
    ],
)
def test_carries_phrase(subject: str, carries: bool) -> None:
    assert carries_phrase(subject, PHRASE) is carries
    assert not carries_phrase(subject, "")


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=20),
    st.text(max_size=20),
    st.lists(st.sampled_from(["", " ", "  ", "\t", "-", "\u2013"]), min_size=19, max_size=19),
    st.lists(st.booleans(), min_size=20, max_size=20),
)
def test_phrase_matches_whatever_case_spacing_and_surroundings(
    before: str, after: str, separators: list[str], upper: list[bool]
) -> None:
    phrase = new_sync_phrase()
    letters = phrase.replace("-", "")
    chars = [c.upper() if u else c.lower() for c, u in zip(letters, upper, strict=True)]
    typed = chars[0] + "".join(s + c for s, c in zip(separators, chars[1:], strict=True))
    assert carries_phrase(f"{before}{typed}{after}", phrase)
    assert not carries_phrase(f"{before}{typed[:-1]}", phrase)


def test_new_phrases_are_unambiguous_and_distinct() -> None:
    phrases = {new_sync_phrase() for _ in range(200)}
    assert len(phrases) == 200
    for phrase in phrases:
        word, *groups = phrase.split("-")
        assert word == "sync" and [len(g) for g in groups] == [4, 4, 4, 4]
        assert set("".join(groups)) <= set(PHRASE_ALPHABET)
    assert not set("01IOL") & set(PHRASE_ALPHABET)
    assert not carries_phrase("anything", "")
