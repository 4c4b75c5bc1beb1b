"""The phone's display summary of a mail: RFC 2047 words decoded by email.header, never raising.

The hostile-header table the store relies on is in test_server_store.py; these cases check
that one broken word is shown as it came while the words around it are still decoded.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapsync_bridge.server.store_schema import parse_summary


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        (b"=?no-such-charset?q?abc?= and =?utf-8?q?caf=C3=A9?=", "abc and caf\u00e9"),
        (b"=?utf-8?b?w6k=?= =?iso-8859-1?q?=E9?=", "\u00e9\u00e9"),  # space between: dropped
        (b"=?utf-8?b?w6?= ok", "\u00c3 ok"),  # truncated UTF-8: cp1252, not an exception
        (b"=?utf-8*en?q?hi?=", "hi"),  # RFC 2231 language suffix
        (b"=?utf-8?b?abcde?= =?utf-8?q?x?=", "=?utf-8?b?abcde?=x"),  # bad base64: kept
        (b"=?utf-8?x?abc?=", "=?utf-8?x?abc?="),  # not an encoded word
        (b"=?UTF-8?Q?a_b?= c", "a b c"),
    ],
)
def test_one_broken_encoded_word_does_not_spoil_the_others(subject: bytes, shown: str) -> None:
    assert parse_summary(b"Subject: " + subject + b"\r\n\r\n") == (shown, "")


PIECES = [b"=?", b"?=", b"?b?", b"?Q?", b"utf-8", b"x", b"=C3", b"w6k", b"!", b" ", b"\r\n ",
          b"\xff", b"_", b"*", b"="]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30))
def test_parse_summary_never_raises(pieces: list[bytes]) -> None:
    raw = b"Subject: " + b"".join(pieces) + b"\r\nFrom: a@b\r\n\r\n"
    subject, sender = parse_summary(raw)
    assert isinstance(subject, str) and "\n" not in subject and sender == "a@b"
