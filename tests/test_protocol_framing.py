"""Frames over real sockets: blocking (socketpair) and asyncio (a server on port 0)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

from imapsync_bridge.errors import ConnectionLost, FrameTooLarge, ProtocolError
from imapsync_bridge.protocol import framing


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


SAMPLE = {"type": "op", "seq": 7, "op": {"kind": "evict", "key": "<ä@example.com>"}, "n": None}


def test_encode_decode_round_trip():
    data = framing.encode_frame(SAMPLE)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert framing.decode_payload(data[4:]) == SAMPLE


def test_blocking_round_trip(pair):
    a, b = pair
    framing.write_frame(a, SAMPLE)
    framing.write_frame(a, {"type": "ok"})
    assert framing.read_frame(b) == SAMPLE
    assert framing.read_frame(b, max_size=100) == {"type": "ok"}


def test_large_frame_round_trip(pair):
    a, b = pair
    raw = bytes(range(256)) * 8192  # 2 MiB, more than any socket buffer
    frame = {"type": "message", "key": "k", "raw": framing.b64encode_bytes(raw)}
    writer = threading.Thread(target=framing.write_frame, args=(a, frame))
    writer.start()
    got = framing.read_frame(b)
    writer.join()
    assert framing.b64decode_field(got["raw"]) == raw


def test_oversized_length_rejected_before_reading_body(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 1000))  # header only: a body read would block, then time out
    b.settimeout(2)
    with pytest.raises(FrameTooLarge, match="1000 bytes"):
        framing.read_frame(b, max_size=100)


def test_default_limit_is_64_mib(pair):
    a, b = pair
    assert framing.MAX_FRAME == 64 * 1024 * 1024
    a.sendall(struct.pack(">I", framing.MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge):
        framing.read_frame(b)


def test_writer_refuses_oversized_frame(pair):
    a, _ = pair
    with pytest.raises(FrameTooLarge):
        framing.write_frame(a, {"type": "x", "pad": "y" * 200}, max_size=100)


def test_truncated_body_is_connection_lost(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 50) + b'{"type":')
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        framing.read_frame(b)


def test_truncated_header_is_connection_lost(pair):
    a, b = pair
    a.sendall(b"\x00\x00")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        framing.read_frame(b)


def test_clean_eof_is_connection_lost(pair):
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="closed by the peer"):
        framing.read_frame(b)


def test_timeout_is_connection_lost(pair):
    _, b = pair
    b.settimeout(0.2)
    with pytest.raises(ConnectionLost, match="timed out"):
        framing.read_frame(b)


def test_write_to_closed_peer_is_connection_lost(pair):
    a, b = pair
    b.close()
    with pytest.raises(ConnectionLost):
        for _ in range(100):
            framing.write_frame(a, {"type": "x", "pad": "y" * 100_000})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "array, not an object"),
        (b'"text"', "string, not an object"),
        (b"42", "number, not an object"),
        (b'{"type": "ok", "type": "error"}', "duplicate key"),
        (b'{"n": NaN}', "non-JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
    ],
)
def test_garbage_payload_is_protocol_error(pair, body, match):
    a, b = pair
    a.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match=match):
        framing.read_frame(b)


def test_protocol_error_leaves_stream_in_step(pair):
    a, b = pair
    a.sendall(struct.pack(">I", 3) + b"bad")
    framing.write_frame(a, {"type": "ok"})
    with pytest.raises(ProtocolError):
        framing.read_frame(b)
    assert framing.read_frame(b) == {"type": "ok"}


def test_unencodable_frame_is_refused():
    with pytest.raises(ProtocolError):
        framing.encode_frame({"x": float("nan")})
    with pytest.raises(ProtocolError):
        framing.encode_frame({"x": "\ud800"})


def test_b64_helpers():
    raw = b"\x00\xffFrom: a\r\n\r\nbody"
    text = framing.b64encode_bytes(raw)
    assert isinstance(text, str)
    assert framing.b64decode_field(text) == raw
    for bad in ("abc", "ab!=", "é===", 12, None, "YWJj\n"):
        with pytest.raises(ProtocolError, match="'raw'"):
            framing.b64decode_field(bad)
    with pytest.raises(ProtocolError, match="'body'"):
        framing.b64decode_field("***", field="body")


# --------------------------------------------------------------------------- asyncio


async def _with_server(handler, client):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await client(reader, writer)
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_async_round_trip():
    async def echo(reader, writer):
        while True:
            try:
                frame = await framing.read_frame_async(reader)
            except ConnectionLost:
                break
            await framing.write_frame_async(writer, {"type": "echo", "got": frame})
        writer.close()

    async def client(reader, writer):
        await framing.write_frame_async(writer, SAMPLE)
        await framing.write_frame_async(writer, {"type": "ok"})
        first = await framing.read_frame_async(reader, max_size=1000)
        second = await framing.read_frame_async(reader, max_size=1000)
        return first, second

    first, second = asyncio.run(_with_server(echo, client))
    assert first == {"type": "echo", "got": SAMPLE}
    assert second == {"type": "echo", "got": {"type": "ok"}}


def _server_result(send: bytes, max_size: int = 100, close: bool = True, timeout=None):
    """Run a server that reads one frame of what the client sends; return what it got."""
    result: dict = {}

    async def handler(reader, writer):
        try:
            result["frame"] = await framing.read_frame_async(reader, max_size, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc
        writer.close()
        result["done"].set()

    async def client(reader, writer):
        result["done"] = asyncio.Event()
        writer.write(send)
        await writer.drain()
        if close:
            writer.write_eof()
        await asyncio.wait_for(result["done"].wait(), 5)

    asyncio.run(_with_server(handler, client))
    return result


def test_async_oversized_rejected_before_body():
    got = _server_result(struct.pack(">I", 10_000), close=False)
    assert isinstance(got["error"], FrameTooLarge)


def test_async_truncated_is_connection_lost():
    got = _server_result(struct.pack(">I", 20) + b'{"ty')
    assert isinstance(got["error"], ConnectionLost)
    assert "middle of a frame" in str(got["error"])


def test_async_clean_eof_is_connection_lost():
    got = _server_result(b"")
    assert isinstance(got["error"], ConnectionLost)


def test_async_garbage_is_protocol_error():
    got = _server_result(struct.pack(">I", 5) + b"nope!")
    assert isinstance(got["error"], ProtocolError)


def test_async_timeout_is_connection_lost():
    got = _server_result(b"\x00", close=False, timeout=0.2)
    assert isinstance(got["error"], ConnectionLost)
    assert "timed out" in str(got["error"])


# --------------------------------------------------------------------------- payloads


def test_payload_round_trip_and_limit(pair):
    a, b = pair
    framing.write_payload(a, b'{"type":"ok"}')
    assert framing.read_payload(b) == b'{"type":"ok"}'
    with pytest.raises(FrameTooLarge):
        framing.write_payload(a, b"x" * 101, max_size=100)
    a.sendall(struct.pack(">I", 1000))
    with pytest.raises(FrameTooLarge, match="1000 bytes"):
        framing.read_payload(b, max_size=100)


def test_waiting_for_a_frame_that_does_not_come_keeps_the_stream_in_step(pair):
    a, b = pair
    assert framing.read_payload_within(b, 0.1) is None
    assert b.gettimeout() == 5  # the socket's own timeout is back
    framing.write_payload(a, b"late")
    assert framing.read_payload_within(b, 5) == b"late"
