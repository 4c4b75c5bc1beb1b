"""Frames of the sync protocol: a 4-byte big-endian length, then one UTF-8 JSON object.

Two layers: ``*_payload`` functions move frame bodies (bytes) and are what the agent and
the server use, with the typed frames of :mod:`imapsync_bridge.protocol.schema` as the
codec; ``*_frame`` functions add a generic JSON-object codec on top (tests, raw peers).

Both ends bound what they accept: a reader refuses a length over ``max_size`` *before*
reading (or allocating) the body, so a hostile or broken peer cannot make us buffer more
than the limit. Writers refuse to send a frame the peer would refuse anyway.

Errors are translated at this edge (see :mod:`imapsync_bridge.errors`):

- a malformed body (invalid UTF-8, invalid JSON, duplicate keys, not an object)
  → :class:`ProtocolError`; a length over the limit → :class:`FrameTooLarge`;
- end of stream, reset, timeout → :class:`ConnectionLost`;
- a TLS alert saying the peer refused our certificate → :class:`AuthError` (with TLS 1.3
  the server checks the client certificate after the client has finished its handshake,
  so the agent learns about a refused certificate on its first read).

Frame contents are checked by the typed decoders of :mod:`imapsync_bridge.protocol.schema`.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any

from imapsync_bridge.errors import (
    AuthError,
    ConnectionLost,
    FrameTooLarge,
    PeerClosed,
    ProtocolError,
)

if TYPE_CHECKING:
    import asyncio

MAX_FRAME = 64 * 1024 * 1024
"""Default limit of one frame body, in bytes (the 4-byte header not counted)."""

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

# TLS alerts that mean "your certificate was refused", not "the network failed".
_CERT_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")


# --------------------------------------------------------------------------- encoding


def encode_payload(payload: bytes, max_size: int = MAX_FRAME) -> bytes:
    """Header + body. FrameTooLarge when the body exceeds ``max_size``."""
    if len(payload) > max_size:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the limit of {max_size}")
    return _HEADER.pack(len(payload)) + payload


def encode_frame(obj: dict[str, Any], max_size: int = MAX_FRAME) -> bytes:
    """Header + body of one frame. FrameTooLarge when the body exceeds ``max_size``."""
    if not isinstance(obj, dict):
        raise TypeError(f"a frame is a dict, not {type(obj).__name__}")
    try:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        payload = body.encode("utf-8")
    except (TypeError, ValueError) as exc:  # includes UnicodeEncodeError (lone surrogates)
        raise ProtocolError(f"frame cannot be encoded as JSON: {exc}") from None
    return encode_payload(payload, max_size)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError(f"frame has a duplicate key {_short(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"frame contains the non-JSON number {name}")


def decode_payload(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON object of a frame body; ProtocolError when it is not one."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"frame is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ProtocolError("frame is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {_json_kind(obj)}, not an object")
    return obj


def _json_kind(obj: Any) -> str:
    if isinstance(obj, list):
        return "array"
    if isinstance(obj, str):
        return "string"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    return "number"


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_length(length: int, max_size: int) -> None:
    if length > max_size:
        raise FrameTooLarge(f"peer announced a frame of {length} bytes, the limit is {max_size}")


# --------------------------------------------------------------------------- base64


def b64encode_bytes(data: bytes) -> str:
    """Raw bytes (a message) as a base64 string for a JSON field."""
    return base64.b64encode(data).decode("ascii")


def b64decode_field(value: Any, field: str = "raw") -> bytes:
    """The bytes of a base64 JSON field; ProtocolError naming ``field`` when it is bad."""
    if not isinstance(value, str):
        raise ProtocolError(f"field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ProtocolError(f"field {field!r} is not valid base64") from None


# --------------------------------------------------------------------------- blocking I/O


def _translate_ssl(exc: ssl.SSLError, doing: str) -> Exception:
    reason = (getattr(exc, "reason", None) or "").upper()
    if "ALERT" in reason and any(word in reason for word in _CERT_ALERTS):
        return AuthError(f"the peer refused our certificate ({exc.reason})")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return PeerClosed(f"connection closed by the peer while {doing}")
    return ConnectionLost(f"TLS error while {doing}: {exc.reason or exc}")


class _Idle(Exception):
    """No byte of a frame arrived in time (only with ``idle_ok``)."""


def _recv_exactly(
    sock: socket.socket, size: int, doing: str, started: bool, idle_ok: bool = False
) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    try:
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                if got == 0 and not started:
                    raise PeerClosed(f"connection closed by the peer while {doing}")
                raise ConnectionLost(
                    f"connection closed by the peer in the middle of a frame "
                    f"({got} of {size} bytes of the {doing.removeprefix('reading ')})"
                )
            got += n
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        if idle_ok and got == 0:
            raise _Idle from None
        raise ConnectionLost(f"timed out while {doing}") from None
    except ssl.SSLError as exc:
        raise _translate_ssl(exc, doing) from None
    except OSError as exc:
        raise ConnectionLost(f"connection error while {doing}: {exc}") from None
    finally:
        view.release()
    return buf


def read_payload(sock: socket.socket, max_size: int = MAX_FRAME) -> bytearray:
    """Read one frame body from a blocking (TLS) socket; the length is checked against
    ``max_size`` before the body is read. See the module doc for the errors."""
    header = _recv_exactly(sock, HEADER_SIZE, "reading the frame header", started=False)
    (length,) = _HEADER.unpack(header)
    _check_length(length, max_size)
    return _recv_exactly(sock, length, "reading the frame body", started=True)


def read_payload_within(
    sock: socket.socket, timeout: float, max_size: int = MAX_FRAME
) -> bytearray | None:
    """Like :func:`read_payload`, but None when no frame starts within ``timeout``
    seconds (the stream stays in step); once a frame has started, the socket's own
    timeout applies to the rest of it."""
    saved = sock.gettimeout()
    sock.settimeout(max(timeout, 0.001))
    try:
        header = _recv_exactly(sock, HEADER_SIZE, "reading the frame header", False, idle_ok=True)
    except _Idle:
        return None
    finally:
        sock.settimeout(saved)
    (length,) = _HEADER.unpack(header)
    _check_length(length, max_size)
    return _recv_exactly(sock, length, "reading the frame body", started=True)


def read_frame(sock: socket.socket, max_size: int = MAX_FRAME) -> dict[str, Any]:
    """Read one frame from a blocking (TLS) socket as a JSON object."""
    return decode_payload(read_payload(sock, max_size))


def write_frame(sock: socket.socket, obj: dict[str, Any], max_size: int = MAX_FRAME) -> None:
    """Write one frame (a JSON object) to a blocking (TLS) socket."""
    write_payload(sock, encode_frame(obj, max_size)[HEADER_SIZE:], max_size)


def write_payload(sock: socket.socket, payload: bytes, max_size: int = MAX_FRAME) -> None:
    """Write one frame body (with its header) to a blocking (TLS) socket."""
    data = encode_payload(payload, max_size)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise ConnectionLost("timed out while writing a frame") from None
    except ssl.SSLError as exc:
        raise _translate_ssl(exc, "writing a frame") from None
    except OSError as exc:
        raise ConnectionLost(f"connection error while writing a frame: {exc}") from None


# --------------------------------------------------------------------------- asyncio


async def _readexactly(reader: asyncio.StreamReader, size: int, doing: str) -> bytes:
    import asyncio  # here, not at the top: the agent's link is blocking (~40 ms of imports)

    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial and doing.endswith("header"):
            raise PeerClosed(f"connection closed by the peer while {doing}") from None
        raise ConnectionLost(
            f"connection closed by the peer in the middle of a frame "
            f"({len(exc.partial)} of {size} bytes of the {doing.removeprefix('reading ')})"
        ) from None
    except ssl.SSLError as exc:
        raise _translate_ssl(exc, doing) from None
    except OSError as exc:
        raise ConnectionLost(f"connection error while {doing}: {exc}") from None


async def read_frame_async(
    reader: asyncio.StreamReader, max_size: int = MAX_FRAME, timeout: float | None = None
) -> dict[str, Any]:
    """Read one frame from an asyncio stream as a JSON object."""
    return decode_payload(await read_payload_async(reader, max_size, timeout))


async def read_payload_async(
    reader: asyncio.StreamReader, max_size: int = MAX_FRAME, timeout: float | None = None
) -> bytes:
    """Read one frame body from an asyncio stream (length checked before the body).

    ``timeout`` (seconds, for the whole frame) turns a silent peer into ConnectionLost;
    without it the caller bounds the wait itself.
    """
    import asyncio

    try:
        async with asyncio.timeout(timeout):
            header = await _readexactly(reader, HEADER_SIZE, "reading the frame header")
            (length,) = _HEADER.unpack(header)
            _check_length(length, max_size)
            body = await _readexactly(reader, length, "reading the frame body")
    except TimeoutError:
        raise ConnectionLost(f"timed out after {timeout} s while reading a frame") from None
    return body


async def write_frame_async(
    writer: asyncio.StreamWriter, obj: dict[str, Any], max_size: int = MAX_FRAME
) -> None:
    """Write one frame (a JSON object) to an asyncio stream and wait until it is flushed."""
    await write_payload_async(writer, encode_frame(obj, max_size)[HEADER_SIZE:], max_size)


async def write_payload_async(
    writer: asyncio.StreamWriter, payload: bytes, max_size: int = MAX_FRAME
) -> None:
    """Write one frame body to an asyncio stream and wait until it is flushed
    (back-pressure). The header and body go to the transport in one write, so frames
    written by concurrent tasks never interleave."""
    data = encode_payload(payload, max_size)
    try:
        writer.write(data)
        await writer.drain()
    except ssl.SSLError as exc:
        raise _translate_ssl(exc, "writing a frame") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: write on a closed transport
        raise ConnectionLost(f"connection error while writing a frame: {exc}") from None
