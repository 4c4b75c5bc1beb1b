"""The hosted server's sync listener: asyncio, TLS 1.3, one session object per connection.

A connection without a client certificate may only fetch the CA certificate and pair.
Every other frame needs a certificate this server issued and has not revoked; the
certificate alone decides whose mailbox the session touches. Bad frames end the session
with an ``error`` frame and a log line; nothing is stored from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imapsync_bridge.errors import AuthError, BridgeError, ConnectionLost, ProtocolError, StoreError
from imapsync_bridge.protocol import framing, pki, schema, tls
from imapsync_bridge.server.store import PhoneStore

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent between frames
CLOSE_TIMEOUT = 5.0  # seconds to wait for a peer to acknowledge the end of a session
UNAUTHENTICATED_FRAMES = {"ca", "pair"}
Reply = dict[str, Any] | None
# Called with (user, frame) before each frame is handled: logging, metrics, fault tests.
FrameObserver = Callable[[str | None, dict[str, Any]], None]


class SyncSessionHandler:
    """Per-connection state; one ``on_<type>`` method per frame type."""

    def __init__(self, store: PhoneStore, data_dir: Path, user: str | None, peer: str):
        self.store = store
        self.data_dir = data_dir
        self.user = user
        self.peer = peer
        self.greeted = False

    def handle(self, frame: dict[str, Any]) -> Reply:
        kind = frame["type"]
        if kind not in UNAUTHENTICATED_FRAMES:
            if self.user is None:
                raise AuthError("a client certificate issued by this server is required")
            if kind != "hello" and not self.greeted:
                raise ProtocolError("the session must start with 'hello'")
        handler: Callable[[dict[str, Any]], Reply] = getattr(self, f"on_{kind}")
        return handler(frame)

    def on_ca(self, frame: dict[str, Any]) -> Reply:
        return {"type": "ca_cert", "pem": (self.data_dir / pki.CA_CRT).read_text()}

    def on_pair(self, frame: dict[str, Any]) -> Reply:
        token, _fingerprint = pki.parse_pairing_code(frame["code"])
        user = self.store.consume_pairing_code(pki.token_hash(token))
        if user is None:
            raise AuthError("pairing code is wrong, used or expired")
        ca_key, ca_cert = pki.load_ca(self.data_dir)
        cert_pem, serial, not_after = pki.issue_client_cert(
            ca_key, ca_cert, frame["csr"].encode(), user
        )
        self.store.register_certificate(user, serial, not_after)
        log.info("paired a new agent for %s (certificate %x); older ones revoked", user, serial)
        return {
            "type": "paired",
            "user": user,
            "certificate": cert_pem,
            "window": self.store.get_user(user).window,
        }

    def on_hello(self, frame: dict[str, Any]) -> Reply:
        assert self.user is not None
        self.greeted = True
        user = self.store.get_user(self.user)
        log.info("%s: session for %s from %s", self.user, frame["agent"], self.peer)
        return {
            "type": "welcome",
            "user": self.user,
            "window": user.window,
            "last_seq": self.store.last_seq(self.user),
        }

    def on_snapshot(self, frame: dict[str, Any]) -> Reply:
        assert self.user is not None
        snap = self.store.snapshot(self.user)
        # SnapshotMessage has exactly the fields of the protocol's snapshot message.
        return {"type": "snapshot", **dataclasses.asdict(snap)}

    def on_ops(self, frame: dict[str, Any]) -> Reply:
        """A batch: one transaction (one fsync) for all of it, acked once committed."""
        assert self.user is not None
        batch = []
        for item in frame["ops"]:
            op = dict(item["op"])
            if "raw" in op:
                op["raw"] = framing.b64decode_field(op["raw"], "raw")
            batch.append((item["seq"], op))
        self.store.apply_ops(self.user, batch)
        return {"type": "acked", "up_to": batch[-1][0]}

    def on_fetch(self, frame: dict[str, Any]) -> Reply:
        assert self.user is not None
        raw = self.store.raw_message(self.user, frame["key"])
        if raw is None:
            raise ProtocolError(f"no phone message {frame['key']}")
        return {"type": "message", "key": frame["key"], "raw": framing.b64encode_bytes(raw)}

    def on_ack_actions(self, frame: dict[str, Any]) -> Reply:
        assert self.user is not None
        self.store.ack_actions(self.user, frame["up_to"])
        return {"type": "ok"}

    def on_complete(self, frame: dict[str, Any]) -> Reply:
        assert self.user is not None
        self.store.record_sync(self.user, frame["summary"])
        log.info("%s: sync complete %s", self.user, frame["summary"])
        return {"type": "ok"}


def _error_frame(exc: BridgeError) -> dict[str, Any]:
    code = {
        AuthError: "unauthenticated",
        ProtocolError: "protocol",
        StoreError: "store",
    }
    for cls, name in code.items():
        if isinstance(exc, cls):
            return {"type": "error", "code": name, "message": str(exc)}
    return {"type": "error", "code": "internal", "message": str(exc)}


class SyncListener:
    def __init__(
        self,
        store: PhoneStore,
        data_dir: Path,
        max_frame: int,
        observer: FrameObserver | None = None,
    ) -> None:
        self.store = store
        self.observer = observer
        self.data_dir = data_dir
        self.max_frame = max_frame
        self.context = tls.server_context(
            data_dir / pki.CA_CRT, data_dir / pki.SERVER_CRT, data_dir / pki.SERVER_KEY
        )
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, ssl=self.context)

    async def close_sessions(self) -> None:
        """End every open session (on shutdown): each stops between two frames at the
        latest, and every store change is a transaction of its own, so none is torn."""
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        ssl_object: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
        serial = tls.peer_certificate_serial(ssl_object) if ssl_object else None
        user = self.store.user_for_certificate(serial) if serial is not None else None
        if serial is not None and user is None:
            log.warning("%s: refused certificate %x (unknown or revoked)", peer, serial)
        handler = SyncSessionHandler(self.store, self.data_dir, user, peer)
        try:
            while True:
                try:
                    frame = await framing.read_frame_async(reader, self.max_frame, IDLE_TIMEOUT)
                except ConnectionLost:  # the peer left, or stayed silent too long
                    return
                if self.observer is not None:
                    self.observer(user, frame)
                try:
                    reply = handler.handle(schema.validate(frame, "to_server"))
                except BridgeError as exc:
                    log.warning("%s (%s): %s", peer, user or "no certificate", exc)
                    await _send(writer, _error_frame(exc))
                    return
                if reply is not None:
                    await _send(writer, reply)
        except BridgeError as exc:  # e.g. an oversized or undecodable frame
            log.warning("%s (%s): %s", peer, user or "no certificate", exc)
            await _send(writer, _error_frame(exc))
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("%s: connection ended: %s", peer, exc)
        except asyncio.CancelledError:
            # Shutdown: end quietly (a handler task that ends cancelled makes asyncio's
            # stream callback log a spurious error).
            log.info("%s: session closed by shutdown", peer)
        finally:
            writer.close()
            # A peer that no longer answers must not hold up shutdown (TLS close_notify).
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


async def _send(writer: asyncio.StreamWriter, frame: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await framing.write_frame_async(writer, frame)
