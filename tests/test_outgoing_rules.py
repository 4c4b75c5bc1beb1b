"""The outgoing decisions (sync/outgoing.py) and the outgoing queue's store contract."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imapsync_bridge.server.outgoing_mail import bounce_notice, prepare_submitted
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.sync.outgoing import (
    RETRY_MAX,
    Limits,
    Next,
    Outcome,
    Step,
    classify,
    refusal,
    resume,
    retry_delay,
)


@pytest.mark.parametrize(
    ("code", "data_started", "outcome"),
    [
        (250, True, Outcome.ACCEPTED),
        (550, False, Outcome.PERMANENT),
        (554, True, Outcome.PERMANENT),
        (451, False, Outcome.TEMPORARY),
        (452, True, Outcome.TEMPORARY),  # a 4xx after the data: the server kept nothing
        (None, False, Outcome.TEMPORARY),  # no connection before DATA: safe to retry
        (None, True, Outcome.UNKNOWN),  # lost during DATA: RFC 1047, never retried
    ],
)
def test_classify(code: int | None, data_started: bool, outcome: Outcome) -> None:
    assert classify(code, data_started) is outcome


@pytest.mark.parametrize(
    ("step", "in_sent", "in_outbox", "action"),
    [
        (Step.CLAIMED, False, False, Next.APPEND),
        (Step.CLAIMED, False, True, Next.SEND),  # the APPEND happened, its answer was lost
        (Step.CLAIMED, True, False, Next.REPORT),  # sent before the state was lost
        (Step.OUTBOX, False, True, Next.SEND),
        (Step.OUTBOX, False, False, Next.APPEND),  # someone removed it: file it again
        (Step.SENDING, False, True, Next.FILE),  # outcome unknown: never sent twice
        (Step.SUBMITTED, False, True, Next.FILE),
        (Step.SUBMITTED, True, False, Next.REPORT),  # the MOVE happened
        (Step.SENT, True, False, Next.REPORT),
        (Step.FAILED, False, False, Next.REPORT),
        (Step.DEFERRED, False, False, Next.REPORT),
    ],
)
def test_resume_never_sends_what_may_have_been_sent(
    step: Step, in_sent: bool, in_outbox: bool, action: Next
) -> None:
    assert resume(step, in_sent, in_outbox) is action


def test_refusal_keeps_the_agent_from_being_an_open_relay() -> None:
    limits = Limits("Me@Corp.example", 1000, max_recipients=2)
    assert refusal("me@corp.example", ["a@x"], 10, limits) is None
    assert "not this desktop's address" in str(refusal("evil@x", ["a@x"], 10, limits))
    assert "at most 2" in str(refusal("me@corp.example", ["a@x"] * 3, 10, limits))
    assert "over the desktop's limit" in str(refusal("me@corp.example", ["a@x"], 1001, limits))
    assert "no [smtp] from_address" in str(refusal("me@x", ["a@x"], 1, Limits("", 1000)))


def test_retry_delay_grows_and_is_capped() -> None:
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == 30 and delays[-1] == RETRY_MAX


def test_prepare_submitted_adds_a_message_id_and_drops_internal_headers() -> None:
    raw = (
        b"From: a@corp.example\r\nTo: b@x.example\r\nBcc: hidden@x.example\r\n"
        b"X-Bridge-Via: desktop\r\nSubject: s\r\n\r\nbody\r\n"
    )
    prepared, message_id, sender, recipients = prepare_submitted(raw)
    assert sender == "a@corp.example"
    assert recipients == ["b@x.example", "hidden@x.example"]
    assert prepared.startswith(f"Message-ID: {message_id}\r\n".encode())
    assert b"Bcc" not in prepared and b"X-Bridge-Via" not in prepared
    assert prepared.endswith(b"\r\n\r\nbody\r\n")
    again, same_id, _s, _r = prepare_submitted(prepared)
    assert (again, same_id) == (prepared, message_id)  # stable: resubmitting keeps the key


@pytest.fixture
def store(tmp_path: Path) -> PhoneStore:
    s = PhoneStore(tmp_path / "phone.sqlite3")
    s.add_user("alice", "alice@phone.example", "a@corp.example", 6)
    return s


RAW = b"From: a@corp.example\r\nTo: b@x\r\nSubject: s\r\nMessage-ID: <m1@x>\r\n\r\nhi\r\n"


def test_queueing_a_message_id_twice_queues_it_once(store: PhoneStore) -> None:
    first, new = store.queue_outgoing("alice", "<m1@x>", True, "a@corp.example", ["b@x"], RAW)
    again, new_again = store.queue_outgoing("alice", "<m1@x>", True, "a@corp.example", ["b@x"], RAW)
    assert new and not new_again and first.id == again.id
    assert [m.id for m in store.list_outgoing("alice", sent=False)] == [first.id]


def test_outcomes_only_move_forward_and_a_failure_leaves_one_notice(store: PhoneStore) -> None:
    m, _ = store.queue_outgoing("alice", "<m1@x>", True, "a@corp.example", ["b@x"], RAW)
    (claimed,) = store.claim_deliveries("alice", 20, 10**6)
    assert claimed.state == "claimed"
    assert store.claim_deliveries("alice", 20, 10**6)[0].id == m.id  # offered again
    notice = bounce_notice(claimed, "alice@phone.example", "550 no")
    assert store.record_outcome("alice", m.id, "failed", "550 no", notice)
    assert not store.record_outcome("alice", m.id, "failed", "550 no", notice)  # a repeat
    assert not store.record_outcome("alice", m.id, "sent", "250")  # failed is final
    assert not store.record_outcome("alice", 999, "sent", "250")  # unknown id: no change
    inbox = store.list_folder("alice", "inbox")
    assert [x.subject for x in inbox] == ["Undelivered: s"]
    assert store.get_outgoing("alice", m.id).reason == "550 no"
    assert store.claim_deliveries("alice", 20, 10**6) == []


def test_a_deferred_message_waits_its_backoff(store: PhoneStore, tmp_path: Path) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    clocked = PhoneStore(tmp_path / "phone.sqlite3", clock=lambda: now[0])
    m, _ = clocked.queue_outgoing("alice", "<m1@x>", False, "alice@phone.example", ["b@x"], RAW)
    (taken,) = clocked.claim_for_relay()
    assert clocked.claim_for_relay() == []  # claimed: no second sender gets it
    assert clocked.record_outcome("alice", taken.id, "deferred", "451 later")
    assert clocked.claim_for_relay() == []
    now[0] += timedelta(seconds=31)
    assert [x.id for x in clocked.claim_for_relay()] == [m.id]


def test_a_relay_claim_left_by_a_crash_is_requeued_or_taken_as_sent(
    store: PhoneStore, tmp_path: Path
) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    clocked = PhoneStore(tmp_path / "phone.sqlite3", clock=lambda: now[0])
    raw2 = RAW.replace(b"<m1@x>", b"<m2@x>")
    a, _ = clocked.queue_outgoing("alice", "<m1@x>", False, "alice@phone.example", ["b@x"], RAW)
    b, _ = clocked.queue_outgoing("alice", "<m2@x>", False, "alice@phone.example", ["b@x"], raw2)
    clocked.claim_for_relay()
    clocked.relay_in_data(b.id)  # DATA had begun for b when the relay died
    now[0] += timedelta(minutes=11)
    assert clocked.recover_relay_claims(timedelta(minutes=10)) == (1, 1)
    assert clocked.get_outgoing("alice", a.id).state == "queued"
    assert clocked.get_outgoing("alice", b.id).state == "sent"
