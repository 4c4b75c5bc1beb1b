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
from typing import TypeVar

from imapsync_bridge.agent.state import PendingOp
from imapsync_bridge.errors import AuthError, PeerClosed, ProtocolError
from imapsync_bridge.protocol import framing, schema, tls

# What `agent pair` leaves in the state directory.
AGENT_KEY, AGENT_CRT, SERVER_CA = "agent.key", "agent.crt", "server-ca.crt"
OPS_PER_BATCH = 64  # ops per "ops" frame (the schema allows up to 256)
BATCH_BYTES = 8 * 1024 * 1024  # message bytes per batch, before base64
BATCHES_IN_FLIGHT = 4
R = TypeVar("R", bound=schema.Frame)


class ServerLink:
    """Typed frames over one blocking TLS socket.

    The server may send notices nobody asked for (:data:`schema.Notice`: ``changed``,
    ``heartbeat``) at any time after ``welcome``. While a request waits for its reply,
    heartbeats are skipped and ``changed`` notices are queued; :meth:`wait_notice` hands
    them out (or waits for the next one).
    """

    def __init__(self, sock: ssl.SSLSocket, max_frame: int = framing.MAX_FRAME) -> None:
        self._sock = sock
        self._max_frame = max_frame
        self._notices: deque[schema.Changed] = deque()
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
    def send(self, frame: schema.Frame) -> None:
        framing.write_payload(self._sock, schema.encode(frame), self._max_frame)

    def _read(self) -> schema.ToAgent:
        return schema.decode_to_agent(framing.read_payload(self._sock, self._max_frame))

    def receive(self, expected: type[R]) -> R:
        """The next reply, which must be an ``expected`` frame (an ``error`` frame is
        raised); notices arriving meanwhile are skipped or queued."""
        while True:
            frame = self._read()
            if isinstance(frame, expected):
                return frame
            if isinstance(frame, schema.Error):
                raise _server_error(frame)
            if isinstance(frame, schema.Heartbeat):
                continue
            if isinstance(frame, schema.Changed):
                self._notices.append(frame)
                continue
            raise ProtocolError(
                f"expected a '{schema.frame_type(expected)}' frame, "
                f"got '{schema.frame_type(frame)}'"
            )

    def request(self, frame: schema.Frame, expected: type[R]) -> R:
        self.send(frame)
        return self.receive(expected)

    def wait_notice(self, timeout: float) -> schema.Notice | None:
        """The next unsolicited frame (a queued ``changed`` first), or None when none
        came within ``timeout`` seconds. A reply nobody asked for is a ProtocolError."""
        if self._notices:
            return self._notices.popleft()
        body = framing.read_payload_within(self._sock, timeout, self._max_frame)
        if body is None:
            return None
        frame = schema.decode_to_agent(body)
        if isinstance(frame, schema.Changed | schema.Heartbeat):
            return frame
        if isinstance(frame, schema.Error):
            raise _server_error(frame)
        raise ProtocolError(f"unexpected '{schema.frame_type(frame)}' frame from the server")

    def fileno(self) -> int:
        """The socket, for ``select`` in the service loop."""
        return self._sock.fileno()

    def has_buffered(self) -> bool:
        """A notice is queued, or TLS holds decrypted bytes ``select`` cannot see."""
        return bool(self._notices) or self._sock.pending() > 0

    def heartbeat(self) -> None:
        """Check the server is there: send a heartbeat, wait for one back (within the
        socket's timeout, else ConnectionLost)."""
        self.request(schema.Heartbeat(), schema.Heartbeat)

    # -- session steps -----------------------------------------------------------------
    def hello(self, agent_instance: str, with_snapshot: bool = False) -> schema.Snapshot | None:
        """Start the session; ``with_snapshot`` asks for the snapshot in the same round
        trip (when there is no journal to resend first) and returns it."""
        try:
            self.send(schema.Hello(protocol=schema.PROTOCOL_VERSION, agent=agent_instance))
            if with_snapshot:
                self.send(schema.SnapshotRequest())
            welcome = self.receive(schema.Welcome)
        except PeerClosed:
            # Under TLS 1.3 the server checks our certificate after our side of the
            # handshake is done, and a refused client is dropped without an alert.
            raise AuthError(
                "the server closed the connection before answering hello: it most likely "
                "refused this agent's certificate (issued by another server, expired or "
                "revoked); pair the agent again"
            ) from None
        self.user, self.last_seq = welcome.user, welcome.last_seq
        return self.receive(schema.Snapshot) if with_snapshot else None

    def snapshot(self) -> schema.Snapshot:
        return self.request(schema.SnapshotRequest(), schema.Snapshot)

    def fetch(self, key: str) -> bytes:
        return self.request(schema.Fetch(key=key), schema.Message).raw

    def ack_actions(self, up_to: int) -> None:
        self.request(schema.AckActions(up_to=up_to), schema.Ok)

    def complete(self, summary: dict[str, object]) -> None:
        self.request(schema.Complete(summary=summary), schema.Ok)

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
                self.send(schema.Ops(ops=[_wire(pending) for pending in batch]))
                in_flight.append(batch[-1].seq)
            frame = self.receive(schema.Acked)
            if frame.up_to != in_flight[0]:
                raise ProtocolError(
                    f"expected the ack of ops up to {in_flight[0]}, got {frame.up_to}"
                )
            on_acked(in_flight.popleft())


def _wire(pending: PendingOp) -> schema.OpItem:
    return schema.OpItem(seq=pending.seq, op=schema.op_from_journal(pending.op, pending.raw))


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


def _server_error(frame: schema.Error) -> Exception:
    message = f"server: {frame.message} ({frame.code})"
    if frame.code == "unauthenticated":
        return AuthError(message)
    return ProtocolError(message)
