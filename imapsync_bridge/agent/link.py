"""The agent's end of the sync protocol: one blocking TLS connection to the hosted server.

Actions go out as a window of unacknowledged frames (not the patent's stop-and-wait):
up to ``window`` ops are in flight, each ack retires one, and the caller's ``on_ack``
commits the retirement before the next ones are sent.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imapsync_bridge.agent.state import PendingOp
from imapsync_bridge.errors import AuthError, PeerClosed, ProtocolError
from imapsync_bridge.protocol import framing, schema, tls

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
OPS_IN_FLIGHT = 32
ACK_BATCH = 64


class ServerLink:
    def __init__(self, sock: ssl.SSLSocket, max_frame: int = framing.MAX_FRAME) -> None:
        self._sock = sock
        self._max_frame = max_frame
        self.user = ""
        self.window = 0
        self.last_seq = 0

    @classmethod
    def open(cls, host: str, port: int, state_dir: Path, timeout: float = 60.0) -> ServerLink:
        context = tls.agent_context(
            state_dir / "server-ca.crt", state_dir / "agent.crt", state_dir / "agent.key"
        )
        return cls(tls.connect(host, port, context, timeout))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ServerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames ----------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        framing.write_frame(self._sock, frame)

    def receive(self, expected: str) -> dict[str, Any]:
        frame = schema.validate(framing.read_frame(self._sock, self._max_frame), "to_agent")
        if frame["type"] == "error":
            raise _server_error(frame)
        if frame["type"] != expected:
            raise ProtocolError(f"expected a '{expected}' frame, got '{frame['type']}'")
        return frame

    def request(self, frame: dict[str, Any], expected: str) -> dict[str, Any]:
        self.send(frame)
        return self.receive(expected)

    # -- session steps -----------------------------------------------------------------
    def hello(self, agent_instance: str) -> None:
        hello = {"type": "hello", "protocol": PROTOCOL_VERSION, "agent": agent_instance}
        try:
            welcome = self.request(hello, "welcome")
        except PeerClosed:
            # Under TLS 1.3 the server checks our certificate after our side of the
            # handshake is done, and a refused client is dropped without an alert.
            raise AuthError(
                "the server closed the connection before answering hello: it most likely "
                "refused this agent's certificate (issued by another server, expired or "
                "revoked); pair the agent again"
            ) from None
        self.user, self.window, self.last_seq = (
            welcome["user"],
            welcome["window"],
            welcome["last_seq"],
        )

    def send_ops(self, ops: Sequence[PendingOp], on_acked: Callable[[int], None]) -> None:
        """Send ops with up to OPS_IN_FLIGHT unacknowledged.

        ``on_acked(seq)`` retires every op up to ``seq``; it is called every ACK_BATCH acks
        and once at the end (also when the session breaks), not once per ack: the server
        remembers the highest op it applied, so a retirement lost in a crash only makes
        the next session skip those ops after ``hello``.
        """
        in_flight: deque[int] = deque()
        queue = deque(ops)
        acked = retired = 0
        try:
            while queue or in_flight:
                while queue and len(in_flight) < OPS_IN_FLIGHT:
                    pending = queue.popleft()
                    op = dict(pending.op)
                    if pending.raw is not None:
                        op["raw"] = framing.b64encode_bytes(pending.raw)
                    self.send({"type": "op", "seq": pending.seq, "op": op})
                    in_flight.append(pending.seq)
                frame = schema.validate(framing.read_frame(self._sock, self._max_frame), "to_agent")
                if frame["type"] == "error":
                    raise _server_error(frame)
                if frame["type"] not in ("ack", "nack") or frame["seq"] != in_flight[0]:
                    raise ProtocolError(f"expected the ack of op {in_flight[0]}, got {frame}")
                in_flight.popleft()
                if frame["type"] == "nack":
                    log.warning("server refused op %d: %s", frame["seq"], frame["error"])
                acked = frame["seq"]
                if acked - retired >= ACK_BATCH:
                    on_acked(acked)
                    retired = acked
        finally:
            if acked > retired:
                on_acked(acked)


def _server_error(frame: dict[str, Any]) -> Exception:
    message = f"server: {frame['message']} ({frame['code']})"
    if frame["code"] in ("unauthenticated", "revoked", "pairing"):
        return AuthError(message)
    return ProtocolError(message)
