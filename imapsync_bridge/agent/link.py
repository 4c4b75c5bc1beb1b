"""The agent's end of the sync protocol: one blocking TLS connection to the hosted server.

Actions go out in batches with a window of unacknowledged batches in flight (not the
patent's stop-and-wait, one round trip per action): the server commits each batch in
one transaction, so a first sync of 50 messages costs one fsync there, not 50.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imapsync_bridge.agent.state import PendingOp
from imapsync_bridge.errors import AuthError, PeerClosed, ProtocolError
from imapsync_bridge.protocol import framing, schema, tls

# What `agent pair` leaves in the state directory.
AGENT_KEY, AGENT_CRT, SERVER_CA = "agent.key", "agent.crt", "server-ca.crt"
OPS_PER_BATCH = 64  # ops per "ops" frame (the schema allows up to 256)
BATCH_BYTES = 8 * 1024 * 1024  # message bytes per batch, before base64
BATCHES_IN_FLIGHT = 4


class ServerLink:
    def __init__(self, sock: ssl.SSLSocket, max_frame: int = framing.MAX_FRAME) -> None:
        self._sock = sock
        self._max_frame = max_frame
        self.user = ""
        self.last_seq = 0

    @classmethod
    def open(cls, host: str, port: int, state_dir: Path, timeout: float = 60.0) -> ServerLink:
        context = tls.agent_context(
            state_dir / SERVER_CA, state_dir / AGENT_CRT, state_dir / AGENT_KEY
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
    def hello(self, agent_instance: str, with_snapshot: bool = False) -> dict[str, Any] | None:
        """Start the session; ``with_snapshot`` asks for the snapshot in the same round
        trip (when there is no journal to resend first) and returns it."""
        hello = {"type": "hello", "protocol": schema.PROTOCOL_VERSION, "agent": agent_instance}
        try:
            self.send(hello)
            if with_snapshot:
                self.send({"type": "snapshot"})
            welcome = self.receive("welcome")
        except PeerClosed:
            # Under TLS 1.3 the server checks our certificate after our side of the
            # handshake is done, and a refused client is dropped without an alert.
            raise AuthError(
                "the server closed the connection before answering hello: it most likely "
                "refused this agent's certificate (issued by another server, expired or "
                "revoked); pair the agent again"
            ) from None
        self.user, self.last_seq = welcome["user"], welcome["last_seq"]
        return self.receive("snapshot") if with_snapshot else None

    def send_ops(self, ops: Sequence[PendingOp], on_acked: Callable[[int], None]) -> None:
        """Send ops in batches, up to BATCHES_IN_FLIGHT of them unacknowledged.

        The server applies a batch in one transaction and acks it once committed;
        ``on_acked(seq)`` then retires every op up to ``seq``.
        """
        queue = deque(_batches(ops))
        in_flight: deque[int] = deque()
        while queue or in_flight:
            while queue and len(in_flight) < BATCHES_IN_FLIGHT:
                batch = queue.popleft()
                self.send({"type": "ops", "ops": [_wire(pending) for pending in batch]})
                in_flight.append(batch[-1].seq)
            frame = self.receive("acked")
            if frame["up_to"] != in_flight[0]:
                raise ProtocolError(
                    f"expected the ack of ops up to {in_flight[0]}, got {frame['up_to']}"
                )
            on_acked(in_flight.popleft())


def _wire(pending: PendingOp) -> dict[str, Any]:
    op = dict(pending.op)
    if pending.raw is not None:
        op["raw"] = framing.b64encode_bytes(pending.raw)
    return {"seq": pending.seq, "op": op}


def _batches(ops: Sequence[PendingOp]) -> list[list[PendingOp]]:
    """Consecutive ops, at most OPS_PER_BATCH and about BATCH_BYTES of messages each."""
    batches: list[list[PendingOp]] = []
    size = 0
    for pending in ops:
        raw = len(pending.raw or b"")
        if not batches or len(batches[-1]) >= OPS_PER_BATCH or size + raw > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(pending)
        size += raw
    return batches


def _server_error(frame: dict[str, Any]) -> Exception:
    message = f"server: {frame['message']} ({frame['code']})"
    if frame["code"] == "unauthenticated":
        return AuthError(message)
    return ProtocolError(message)
