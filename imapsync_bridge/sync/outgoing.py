"""Outgoing mail (patent FIG. 12): the decisions, pure, no I/O.

Both senders use these: the hosted server's relay (send now) and the agent (send via the
desktop). They record a step durably *before* they take it, so after a crash the step
recorded says how far a message got, and :func:`resume` says what to do next.

The agent's steps of one message, keyed by its Message-ID (docs/mail-flow.md, "Outgoing")::

    claimed ─APPEND to Outbox─▶ outbox ─MAIL/RCPT ok─▶ sending ─250─▶ submitted
        ─MOVE Outbox→Sent─▶ sent ─reported, acked─▶ (forgotten)

``sending`` is recorded after the server took MAIL FROM and every RCPT TO, right before
DATA: failures before it are safe to retry (RFC 5321: nothing was accepted), failures
after it are not (RFC 1047: the server may have accepted the message while its 250 never
arrived). A message found in ``sending`` after a crash is therefore never sent again: it
is treated as submitted, unless its Message-ID shows it elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_RECIPIENTS = 100  # per message (RFC 5321 4.5.3.1.8: a server must take 100)
MAX_PER_SYNC = 20  # messages the agent sends in one session; the rest wait for the next
RETRY_FIRST = 30.0  # seconds before the first retry of a deferred message
RETRY_MAX = 3600.0  # ... and at most this between retries


class Step(StrEnum):
    """How far one message got on the sender's side (recorded before the next step)."""

    CLAIMED = "claimed"  # taken over; not yet in the desktop Outbox
    OUTBOX = "outbox"  # in the desktop Outbox; no SMTP transaction has reached DATA
    SENDING = "sending"  # MAIL and RCPT accepted, DATA about to start: outcome unknown
    SUBMITTED = "submitted"  # the SMTP server answered 250 to the data
    SENT = "sent"  # in the desktop Sent folder (\\Seen); to be reported
    FAILED = "failed"  # refused for good (5xx, or refused by the agent); to be reported
    DEFERRED = "deferred"  # refused for now (4xx, connection); to be reported, sent later


class Outcome(StrEnum):
    """What one SMTP attempt came to."""

    ACCEPTED = "accepted"  # 250 after the data
    PERMANENT = "permanent"  # 5xx anywhere: failed, never retried
    TEMPORARY = "temporary"  # 4xx, or the connection failed before DATA: retry later
    UNKNOWN = "unknown"  # the connection failed after DATA began: never retry


def classify(code: int | None, data_started: bool) -> Outcome:
    """An SMTP attempt's outcome from the last reply code (None: no reply, the
    connection failed) and whether the DATA command had been sent."""
    if code is None:
        return Outcome.UNKNOWN if data_started else Outcome.TEMPORARY
    if 200 <= code < 300:
        return Outcome.ACCEPTED
    if 500 <= code < 600:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY  # 4xx, and anything odd (a 1xx/3xx where none belongs)


class Next(StrEnum):
    """What to do next with a message at a recorded step (:func:`resume`)."""

    APPEND = "append"  # APPEND it to the Outbox, then send
    SEND = "send"  # it is in the Outbox: send it
    FILE = "file"  # it was sent: MOVE it from the Outbox to Sent
    REPORT = "report"  # done here: tell the server


def resume(step: Step, in_sent: bool, in_outbox: bool) -> Next:
    """The next action for a message found at ``step``, given where its Message-ID is on
    the desktop now. The rule that makes it exactly once: a message seen in Sent, or
    recorded at ``sending`` or later, is never sent again."""
    if step in (Step.SENT, Step.FAILED, Step.DEFERRED):
        return Next.REPORT
    if in_sent:
        return Next.REPORT  # sent (filed by us, or by a server that files sent mail)
    if step in (Step.SENDING, Step.SUBMITTED):
        return Next.FILE
    return Next.SEND if in_outbox else Next.APPEND


@dataclass(frozen=True)
class Limits:
    from_address: str
    max_message_size: int
    max_recipients: int = MAX_RECIPIENTS
    max_per_sync: int = MAX_PER_SYNC


def refusal(sender: str, recipients: list[str], size: int, limits: Limits) -> str | None:
    """Why the agent will not send a message handed to it (None: it will). The agent is
    no open relay: only its user's own address, within size and recipient limits."""
    if not limits.from_address:
        return "the desktop agent has no [smtp] from_address configured"
    if sender.strip().lower() != limits.from_address.strip().lower():
        return f"sender {sender!r} is not this desktop's address {limits.from_address!r}"
    if not recipients:
        return "no recipients"
    if len(recipients) > limits.max_recipients:
        return f"{len(recipients)} recipients: at most {limits.max_recipients} per message"
    if size > limits.max_message_size:
        return f"{size} bytes: over the desktop's limit of {limits.max_message_size} bytes"
    return None


def over_sync_limit(nth_this_sync: int, limits: Limits) -> bool:
    """Whether a message waits for a later sync (a rate limit, not a refusal);
    ``nth_this_sync`` counts from 1."""
    return nth_this_sync > limits.max_per_sync


def retry_delay(attempts: int) -> float:
    """Seconds before a deferred message is offered again after ``attempts`` failed
    attempts: exponential from :data:`RETRY_FIRST`, capped at :data:`RETRY_MAX`."""
    return min(RETRY_FIRST * 2 ** max(attempts - 1, 0), RETRY_MAX)


def bounce_subject(subject: str) -> str:
    """The subject of the phone's notice for a message that was refused for good."""
    return f"Undelivered: {subject}" if subject else "Undelivered: (no subject)"
