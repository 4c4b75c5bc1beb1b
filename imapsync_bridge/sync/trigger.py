"""The trigger mail, the patent's "special synchronization e-mail" (EP 1 014 629, FIG. 11).

The phone asks for a sync by mail when the push connection is down: a mail whose
Subject carries the user's secret *sync phrase*. This module decides, without I/O, what
one such mail is worth; the agent's :mod:`imapsync_bridge.agent.trigger` finds the mails
and acts, the server's :mod:`imapsync_bridge.server.trigger_mail` sends them.

Two kinds of trigger count:

* **Sent by the hosted server** ("sync now" on the phone): it carries the header
  ``X-Bridge-Trigger: v1; nonce=<32 hex>; ts=<unix seconds>; mac=<hex>``, the MAC being
  HMAC-SHA256 under the key shared at pairing over ``v1|<user>|<nonce>|<ts>``. A token,
  when present, must verify, whoever the mail claims to be from.
* **Typed by hand** in any mail app: no token, so it counts only when sent From one of
  the user's own addresses (the phone address or the desktop address). A phrase without
  a token from anyone else is FORGED. The From line can be faked, but only by someone
  who knows the secret phrase, and all a trigger can do is start a sync.

Every trigger must be fresh (``Date`` and the token's ``ts`` within ``max_age`` seconds,
and not more than :data:`FUTURE_SKEW` seconds ahead: clocks differ) and is acted on once:
its *once-only key* (the token's nonce, else the Message-ID, else a digest of its header
block) must not have been used before. How often triggered syncs may run
(``min_interval``) is not judged here: the service loop merges and delays syncs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

TOKEN_HEADER = "X-Bridge-Trigger"
TOKEN_VERSION = "v1"
FUTURE_SKEW = 300  # seconds a Date or token time may lie ahead of our clock

_TOKEN = re.compile(
    r"\s*v1\s*;\s*nonce=(?P<nonce>[0-9a-f]{32})\s*;\s*ts=(?P<ts>[0-9]{1,10})"
    r"\s*;\s*mac=(?P<mac>[0-9a-f]{64})\s*;?\s*",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015]+")  # spaces, hyphens, dashes autocorrect makes


class Verdict(StrEnum):
    NOT_A_TRIGGER = "not_a_trigger"  # the subject does not carry the phrase
    ACCEPT = "accept"
    STALE = "stale"
    FORGED = "forged"
    BAD_TOKEN = "bad_token"
    REPLAYED = "replayed"


@dataclass(frozen=True)
class Token:
    nonce: str  # 32 lower-case hex digits
    ts: int  # unix seconds
    mac: str  # 64 lower-case hex digits


@dataclass(frozen=True)
class TriggerMail:
    """The few headers of one inbox mail a judgement needs (already decoded)."""

    uid: int
    subject: str  # RFC 2047 words decoded
    sender: str  # the From addr-spec, lower case ("" when there is none)
    date: datetime | None  # the Date header, timezone-aware; None when missing/unreadable
    token: str | None  # the X-Bridge-Trigger value, None when absent
    message_id: str | None
    header_digest: str  # hex digest of its raw header fields as fetched (copies agree)


@dataclass(frozen=True)
class TriggerSecret:
    """What pairing gave both sides for one user."""

    phrase: str
    key: bytes
    user: str
    own_addresses: frozenset[str]  # lower case: the phone address, the desktop address


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str  # one line for the log; never the phrase or the key
    once_key: str  # the trigger's once-only key (record it when ACCEPTed)

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT


def _squeeze(text: str) -> str:
    return _SEPARATORS.sub("", text).casefold()


def carries_phrase(subject: str, phrase: str) -> bool:
    """Whether the (decoded) subject carries the phrase anywhere ("Re: ..." still does).

    Case, spaces and hyphens do not matter: "SYNC 7kq2 mx4p..." typed on a phone
    keyboard matches "sync-7KQ2-MX4P-...". An empty phrase matches nothing.
    """
    needle = _squeeze(phrase)
    return bool(needle) and needle in _squeeze(subject)


def token_mac(key: bytes, user: str, nonce: str, ts: int) -> str:
    message = f"{TOKEN_VERSION}|{user}|{nonce}|{ts}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def make_token(key: bytes, user: str, nonce: str, ts: int) -> str:
    """The X-Bridge-Trigger header value for this nonce (32 hex digits) and time."""
    if not re.fullmatch(r"[0-9a-f]{32}", nonce):
        raise ValueError("nonce must be 32 lower-case hex digits")
    if ts < 0:
        raise ValueError("ts must not be negative")
    return f"{TOKEN_VERSION}; nonce={nonce}; ts={ts}; mac={token_mac(key, user, nonce, ts)}"


def parse_token(value: str) -> Token | None:
    """The token in a header value, None when it is not one (bounded, strict syntax)."""
    if len(value) > 400:
        return None
    found = _TOKEN.fullmatch(value)
    if found is None:
        return None
    return Token(found["nonce"].lower(), int(found["ts"]), found["mac"].lower())


def once_key(mail: TriggerMail) -> str:
    """What makes a trigger once-only: token nonce, else Message-ID, else header digest."""
    token = parse_token(mail.token) if mail.token is not None else None
    if token is not None:
        return f"nonce:{token.nonce}"
    if mail.message_id:
        return f"mid:{mail.message_id}"
    return f"hdr:{mail.header_digest}"


def _age_problem(label: str, moment: float, now: float, max_age: int) -> str | None:
    age = now - moment
    if age > max_age:
        return f"{label} is {int(age)} s old (max_age {max_age} s)"
    if -age > FUTURE_SKEW:
        return f"{label} is {int(-age)} s in the future"
    return None


def judge(
    mail: TriggerMail, secret: TriggerSecret, now: datetime, max_age: int, used: Container[str]
) -> Judgement:
    """What one inbox mail is worth as a trigger (see the module docstring).

    Order: phrase, then authenticity (token or own From), then freshness, then once-only;
    a mail without a Date and without a token cannot show it is fresh (STALE).
    """
    key = once_key(mail)
    if not carries_phrase(mail.subject, secret.phrase):
        return Judgement(Verdict.NOT_A_TRIGGER, "subject does not carry the sync phrase", key)
    times: list[tuple[str, float]] = []  # (what, unix seconds)
    if mail.token is not None:
        token = parse_token(mail.token)
        if token is None:
            return Judgement(Verdict.BAD_TOKEN, f"{TOKEN_HEADER} header is malformed", key)
        expected = token_mac(secret.key, secret.user, token.nonce, token.ts)
        if not hmac.compare_digest(expected, token.mac):
            return Judgement(
                Verdict.BAD_TOKEN, "token does not verify (wrong key, user or contents)", key
            )
        times.append(("token time", float(token.ts)))
    elif mail.sender.lower() not in secret.own_addresses:
        who = mail.sender or "no From address"
        return Judgement(
            Verdict.FORGED, f"no token and From {who} is not one of the user's addresses", key
        )
    if mail.date is not None:
        times.append(("Date", mail.date.timestamp()))
    elif mail.token is None:
        return Judgement(Verdict.STALE, "no token and no readable Date: freshness unknown", key)
    for label, moment in times:
        problem = _age_problem(label, moment, now.timestamp(), max_age)
        if problem is not None:
            return Judgement(Verdict.STALE, problem, key)
    if key in used:
        return Judgement(Verdict.REPLAYED, "this trigger was acted on before", key)
    how = "token verified" if mail.token is not None else f"typed by hand From {mail.sender}"
    return Judgement(Verdict.ACCEPT, how, key)


def keep_used_for(max_age: int) -> timedelta:
    """How long once-only keys must be remembered: a week, and always past the time a
    trigger stays fresh (a replay after that is STALE anyway)."""
    return max(timedelta(days=7), timedelta(seconds=max_age + FUTURE_SKEW))
