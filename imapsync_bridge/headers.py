"""Header values of hostile mail as clean one-line text: RFC 2047 words decoded, never raising.

Shared by the server store (the phone's display summary of each mail) and the agent (the
trigger mail's Subject and From must be read the way a mail app shows them, so a phrase
sent as encoded words still counts). Pure: :mod:`email` only, no I/O.
"""

from __future__ import annotations

import binascii
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from email.message import Message

MAX_HEADER_BLOCK = 256 * 1024
MAX_TEXT = 998
# An RFC 2047 encoded word: email.header's own pattern (``ecre``, undocumented) without
# whitespace inside a word, as RFC 2047 requires; groups: charset, encoding, payload.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_CONTROL = re.compile(r"[\x01-\x1f\x7f]+")
_SPACES = re.compile(r"\s+")


def parse_summary(raw: bytes) -> tuple[str, str]:
    """(subject, from) of a raw message, decoded for display; ('', '') at worst.

    Tolerates 8-bit headers (UTF-8 tried, then cp1252), broken or unknown-charset RFC 2047
    words (left as they are), NUL and control bytes (dropped), a missing header.
    """
    try:
        found = raw_fields(raw)
        return display_text(found.get("subject", "")), display_text(found.get("from", ""))
    except Exception:  # a display summary must never stop a store
        return "", ""


def parse_headers(raw: bytes) -> Message:
    """A header block parsed with ``compat32`` (8-bit bytes as surrogate escapes).

    The email package is imported here, when a header is first parsed: a one-shot
    `agent sync` that finds nothing changed never needs it (~15 ms of imports)."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    return BytesHeaderParser(policy=compat32).parsebytes(raw)


def raw_fields(raw: bytes) -> dict[str, str]:
    """The first value of each header field (lower-case name) of a message or header
    block, raw: 8-bit bytes kept as surrogate escapes, never a ``Header`` object (which
    ``compat32``'s ``get`` returns for 8-bit values)."""
    msg = parse_headers(bytes(raw[:MAX_HEADER_BLOCK]))
    found: dict[str, str] = {}
    for name, value in msg.raw_items():
        found.setdefault(name.lower(), value)
    return found


def display_text(value: str) -> str:
    """One raw header value (8-bit bytes as surrogate escapes, as :mod:`email` parsers
    with ``compat32`` give them) as clean one-line text; '' at worst."""
    try:
        text = _decode_words(_bytes_text(value.encode("ascii", "surrogateescape"), None))
        text = text.replace("\x00", "")
        text = _CONTROL.sub(" ", text)
        return _SPACES.sub(" ", text).strip()[:MAX_TEXT]
    except Exception:
        return ""


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded by :mod:`email.header`, one word at a time.

    ``decode_header`` over the whole value would let one bad word spoil the rest (an
    unknown charset or a truncated UTF-8 sequence raises for all of it) and silently drops
    a B word that is not base64 at all; so the value is split into encoded words, each
    is decoded by ``decode_header``, and a word it cannot decode is shown as it came.
    Whitespace between two words is dropped (RFC 2047 6.2).
    """
    parts = _ENCODED_WORD.split(text)  # [text, charset, encoding, payload, text, ...]
    out = [parts[0]]
    for i in range(1, len(parts) - 1, 4):
        charset, encoding, payload, between = parts[i : i + 4]
        out.append(_decode_word(f"=?{charset}?{encoding}?{payload}?=", encoding, payload))
        followed_by_word = i + 4 < len(parts)
        out.append("" if followed_by_word and not between.strip() else between)
    return "".join(out)


def _decode_word(word: str, encoding: str, payload: str) -> str:
    if encoding in "bB":
        try:  # decode_header ignores characters outside the alphabet: "!!!" would be ""
            binascii.a2b_base64(payload + "=" * (-len(payload) % 4), strict_mode=True)
        except binascii.Error:
            return word
    import email.errors
    import email.header

    try:
        decoded = email.header.decode_header(word)
    except email.errors.HeaderParseError:
        return word
    return "".join(
        _bytes_text(data, charset) if isinstance(data, bytes) else data for data, charset in decoded
    )


def _bytes_text(data: bytes, charset: str | None) -> str:
    if charset and charset.lower() not in ("unknown-8bit", "x-unknown"):
        try:
            return data.decode(charset.split("*", 1)[0])  # RFC 2231 language suffix
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")
