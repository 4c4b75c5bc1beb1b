"""Step 1: the seeded inbox: N realistic 2-5 KB mails written straight into the Maildir.

The files go into ``cur/`` of the user's INBOX Maildir (``Dovecot.maildir``), then
Dovecot indexes them and its cache is warmed once before any timing.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from typing import Any

from measuring import log

BASE_DATE = dt.datetime(2019, 1, 1, 8, 0, tzinfo=dt.UTC)
STEP = dt.timedelta(minutes=7)
UNREAD_NEWEST = 20  # the newest messages are unread, the rest read (no flagged mail)

_TEXT = (
    "the quarterly report meeting budget review project schedule please find attached "
    "thanks regards update customer release planning next week deadline invoice team "
    "office travel approval draft comments feedback minutes agenda call tomorrow status "
    "server migration ticket incident resolved pending contract proposal sales numbers"
)
_WORDS = _TEXT.split()


def make_mail(n: int, date: dt.datetime, rng: random.Random) -> bytes:
    """A realistic 2-5 KB message (CRLF line ends) with a distinct Message-ID."""
    sender = f"colleague{rng.randrange(200)}@corp.example.com"
    subject = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8))).capitalize()
    stamp = date.strftime("%a, %d %b %Y %H:%M:%S +0000")
    header = [
        "Return-Path: <" + sender + ">",
        f"Received: from mx{n % 7}.corp.example.com (mx{n % 7}.corp.example.com [10.0.{n % 250}.{n % 200}])",  # noqa: E501
        f"\tby imap.corp.example.com with ESMTPS id {n:08x}; {stamp}",
        f"From: Colleague <{sender}>",
        "To: Bench User <bench@corp.example.com>",
        f"Subject: {subject} #{n}",
        f"Date: {stamp}",
        f"Message-ID: <bench.{n}.{rng.getrandbits(48):012x}@corp.example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
    ]
    head = "\r\n".join(header) + "\r\n"
    target = rng.randint(2048, 5120) - len(head)
    lines: list[str] = []
    size = 0
    while size < target:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(6, 12)))
        lines.append(line)
        size += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n").encode()


def mail_date(n: int) -> dt.datetime:
    return BASE_DATE + n * STEP


def seed_inbox(dovecot: Any, user: str, count: int) -> float:
    """Write *count* mails into the user's Maildir cur/, then let Dovecot index them."""
    started = time.perf_counter()
    maildir = dovecot.maildir(user)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240601)
    host = "bench"
    for n in range(1, count + 1):
        date = mail_date(n)
        raw = make_mail(n, date, rng)
        flags = "" if n > count - UNREAD_NEWEST else "S"
        stamp = int(date.timestamp())
        name = f"{stamp}.M{n}P{os.getpid()}.{host},S={len(raw)},W={len(raw)}:2,{flags}"
        path = maildir / "cur" / name
        path.write_bytes(raw)
        os.utime(path, (stamp, stamp))
        if n % 10000 == 0 or n == count:
            log(f"seeding: {n}/{count} files written")
    dovecot._chown_tree(maildir)  # the fixture's helper: Dovecot's mail user owns it all
    written = time.perf_counter() - started
    log(f"seeding: files written and chowned in {written:.1f} s; Dovecot indexing ...")
    with dovecot.client(user) as client:
        info = client.select_folder("INBOX")
        # Warm Dovecot's cache the way years of mail-client use would have: dates, sizes
        # and flags of every message are cached before either tool runs.
        client._imap.uid("FETCH", "1:*", "(FLAGS INTERNALDATE RFC822.SIZE)")
        client.normalise_times = False
        ends = client.fetch([1, count], ["INTERNALDATE"])
    if info[b"EXISTS"] != count:
        raise RuntimeError(f"Dovecot sees {info[b'EXISTS']} messages, expected {count}")
    if ends[1][b"INTERNALDATE"] >= ends[count][b"INTERNALDATE"]:
        raise RuntimeError("UIDs do not follow the arrival dates")
    seconds = time.perf_counter() - started
    log(f"seeding: {count} messages indexed in {seconds:.1f} s")
    return seconds
