"""The hosted server's sync listener: asyncio, TLS 1.3, one session object per connection.

A connection without a client certificate may only fetch the CA certificate and pair.
Every other frame needs a certificate this server issued and has not revoked; the
certificate alone decides whose mailbox the session touches. Bad frames end the session
with an ``error`` frame and a log line; nothing is stored from them.

Frames are typed (:mod:`imapsync_bridge.protocol.schema`); ``SyncSessionHandler`` has one
``on_<type>`` method per frame the agent may send. Store calls block (SQLite, fsync), so
each frame is handled in a worker thread, never on the event loop; a connection's frames
are still handled one at a time, in order.

The listener keeps a registry of greeted connections by user, so the server can send a
user's agent frames it did not ask for (:meth:`SyncListener.push`: a ``changed``
notice); a quiet connection gets a ``heartbeat`` every ``heartbeat_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from imapsync_bridge.errors import AuthError, BridgeError, ConnectionLost, ProtocolError, StoreError
from imapsync_bridge.protocol import framing, pki, schema, tls
from imapsync_bridge.server.store_api import ListenerStore
from imapsync_bridge.server.trigger_mail import new_sync_phrase, new_trigger_key

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent between frames
# ... and one whose agent sends heartbeats (`agent run`'s push link beats every 20 s):
# then a dead agent is noticed within a minute and no longer counts as connected.
BEATING_TIMEOUT = 60.0
CLOSE_TIMEOUT = 5.0  # seconds to wait for a peer to acknowledge the end of a session
HEARTBEAT_INTERVAL = 30.0  # seconds of quiet after which the server sends a heartbeat
UNAUTHENTICATED_FRAMES = (schema.CaRequest, schema.Pair)
Reply = schema.Frame | None


class SyncSessionHandler:
    """Per-connection state; one ``on_<type>`` method per frame type (blocking: it runs
    in a worker thread)."""

    def __init__(self, store: ListenerStore, data_dir: Path, user: str | None, peer: str):
        self.store = store
        self.data_dir = data_dir
        self.user = user
        self.peer = peer
        self.greeted = False

    def handle(self, frame: schema.ToServer) -> Reply:
        if not isinstance(frame, UNAUTHENTICATED_FRAMES):
            if self.user is None:
                raise AuthError("a client certificate issued by this server is required")
            if not isinstance(frame, schema.Hello) and not self.greeted:
                raise ProtocolError("the session must start with 'hello'")
        handler: Callable[[schema.ToServer], Reply] = getattr(
            self, f"on_{schema.frame_type(frame)}"
        )
        return handler(frame)

    def on_ca(self, frame: schema.CaRequest) -> Reply:
        return schema.CaCert(pem=(self.data_dir / pki.CA_CRT).read_text())

    def on_pair(self, frame: schema.Pair) -> Reply:
        token, _fingerprint = pki.parse_pairing_code(frame.code)
        user = self.store.consume_pairing_code(pki.token_hash(token))
        if user is None:
            raise AuthError("pairing code is wrong, used or expired")
        ca_key, ca_cert = pki.load_ca(self.data_dir)
        cert_pem, serial, not_after = pki.issue_client_cert(
            ca_key, ca_cert, frame.csr.encode(), user
        )
        self.store.register_certificate(user, serial, not_after)
        # Each pairing makes a new trigger secret: a revoked agent's phrase stops working.
        phrase, key = new_sync_phrase(), new_trigger_key()
        self.store.set_trigger_secret(user, phrase, key)
        log.info("paired a new agent for %s (certificate %x); older ones revoked", user, serial)
        account = self.store.get_user(user)
        return schema.Paired(
            user=user,
            certificate=cert_pem,
            window=account.window,
            sync_phrase=phrase,
            trigger_key=key.hex(),
            address=account.address,
            desktop_address=account.desktop_address,
        )

    def on_hello(self, frame: schema.Hello) -> Reply:
        assert self.user is not None
        self.greeted = True
        log.info("%s: session for %s from %s", self.user, frame.agent, self.peer)
        # The window travels in the snapshot, which the session plans from.
        return schema.Welcome(user=self.user, last_seq=self.store.last_seq(self.user))

    def on_snapshot(self, frame: schema.SnapshotRequest) -> Reply:
        assert self.user is not None
        snap = self.store.snapshot(self.user)
        actions: list[schema.AnyAction] = [schema.Destroyed(key=k) for k in snap.destroyed]
        actions += [schema.Restored(key=k) for k in snap.restored]
        messages = [
            schema.SnapshotMessage(
                id=m.id,
                key=m.key,
                message_id=m.message_id,
                folder=m.folder,  # type: ignore[arg-type]  # the store checks it
                seen=m.seen,
                flagged=m.flagged,
                internaldate=datetime.fromisoformat(m.internaldate),
            )
            for m in snap.messages
        ]
        return schema.Snapshot(
            window=snap.window, messages=messages, actions=actions, action_seq=snap.action_seq
        )

    def on_ops(self, frame: schema.Ops) -> Reply:
        """A batch: one transaction (one fsync) for all of it, acked once committed."""
        assert self.user is not None
        batch = [(item.seq, schema.op_fields(item.op)) for item in frame.ops]
        self.store.apply_ops(self.user, batch)
        return schema.Acked(up_to=batch[-1][0])

    def on_fetch(self, frame: schema.Fetch) -> Reply:
        assert self.user is not None
        raw = self.store.raw_message(self.user, frame.key)
        if raw is None:
            raise ProtocolError(f"no phone message {frame.key}")
        return schema.Message(key=frame.key, raw=raw)

    def on_ack_actions(self, frame: schema.AckActions) -> Reply:
        assert self.user is not None
        self.store.ack_actions(self.user, frame.up_to)
        return schema.Ok()

    def on_complete(self, frame: schema.Complete) -> Reply:
        assert self.user is not None
        self.store.record_sync(self.user, frame.summary)
        log.info("%s: sync complete %s", self.user, frame.summary)
        return schema.Ok()

    def on_heartbeat(self, frame: schema.Heartbeat) -> Reply:
        return schema.Heartbeat()


def _error_frame(exc: BridgeError) -> schema.Error:
    code = {
        AuthError: "unauthenticated",
        ProtocolError: "protocol",
        StoreError: "store",
    }
    message = " ".join(str(exc).split())[:2000]
    for cls, name in code.items():
        if isinstance(exc, cls):
            return schema.Error(code=name, message=message)
    return schema.Error(code="internal", message=message)


class AgentConnection:
    """One open connection: its writer (writes are serialized) and whose it is."""

    def __init__(self, writer: asyncio.StreamWriter, max_frame: int) -> None:
        self.writer = writer
        self.max_frame = max_frame
        self.user: str | None = None
        self.last_write = time.monotonic()
        self._lock = asyncio.Lock()

    async def send(self, frame: schema.Frame) -> bool:
        """Write one frame; False when the connection is gone."""
        async with self._lock:
            try:
                await framing.write_payload_async(self.writer, schema.encode(frame), self.max_frame)
            except (ConnectionLost, ConnectionError, ssl.SSLError):
                return False
            self.last_write = time.monotonic()
            return True


class SyncListener:
    """The sync listener. ``handler_class`` makes the per-connection handler; a test may
    set a subclass of :class:`SyncSessionHandler` on the listener to watch frames."""

    handler_class: type[SyncSessionHandler] = SyncSessionHandler
    heartbeat_interval: float = HEARTBEAT_INTERVAL

    def __init__(self, store: ListenerStore, data_dir: Path, max_frame: int) -> None:
        self.store = store
        self.data_dir = data_dir
        self.max_frame = max_frame
        self.context = tls.server_context(
            data_dir / pki.CA_CRT, data_dir / pki.SERVER_CRT, data_dir / pki.SERVER_KEY
        )
        self._sessions: set[asyncio.Task[None]] = set()
        self._agents: dict[str, set[AgentConnection]] = {}
        self._server: asyncio.Server | None = None

    # -- the Listener interface of server.app ---------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self.context)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        """Stop listening and end every open session: each stops between two frames at
        the latest, and every store change is a transaction of its own, so none is torn."""
        if self._server is not None:
            self._server.close()
        await self.close_sessions()
        if self._server is not None:
            await self._server.wait_closed()

    async def close_sessions(self) -> None:
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    # -- push --------------------------------------------------------------------------
    def connected(self, user: str) -> int:
        """How many greeted connections ``user``'s agents hold open."""
        return len(self._agents.get(user, ()))

    def connected_users(self) -> frozenset[str]:
        """The users with at least one greeted connection open."""
        return frozenset(self._agents)

    async def push(self, user: str, frame: schema.Frame) -> int:
        """Send an unsolicited frame to each connection of ``user``; returns how many got
        it (0: no agent connected; the trigger mail or the next periodic sync carries it)."""
        sent = 0
        for connection in list(self._agents.get(user, ())):
            sent += await connection.send(frame)
        return sent

    def _register(self, connection: AgentConnection, user: str) -> None:
        connection.user = user
        self._agents.setdefault(user, set()).add(connection)

    def _unregister(self, connection: AgentConnection) -> None:
        if connection.user is None:
            return
        mine = self._agents.get(connection.user)
        if mine is not None:
            mine.discard(connection)
            if not mine:
                del self._agents[connection.user]

    # -- one connection ----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        connection = AgentConnection(writer, self.max_frame)
        heartbeat: asyncio.Task[None] | None = None
        user: str | None = None
        try:
            ssl_object: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
            serial = tls.peer_certificate_serial(ssl_object) if ssl_object else None
            if serial is not None:
                user = await asyncio.to_thread(self.store.user_for_certificate, serial)
                if user is None:
                    log.warning("%s: refused certificate %x (unknown or revoked)", peer, serial)
            handler = self.handler_class(self.store, self.data_dir, user, peer)
            timeout = IDLE_TIMEOUT
            while True:
                try:
                    body = await framing.read_payload_async(reader, self.max_frame, timeout)
                except ConnectionLost:  # the peer left, or stayed silent too long
                    return
                try:
                    frame = schema.decode_to_server(body)
                    if isinstance(frame, schema.Heartbeat):
                        timeout = BEATING_TIMEOUT
                    reply = await asyncio.to_thread(handler.handle, frame)
                except BridgeError as exc:
                    log.warning("%s (%s): %s", peer, user or "no certificate", exc)
                    await connection.send(_error_frame(exc))
                    return
                if reply is not None:
                    await connection.send(reply)
                if handler.greeted and heartbeat is None and user is not None:
                    self._register(connection, user)
                    heartbeat = asyncio.create_task(self._heartbeat(connection))
        except BridgeError as exc:  # e.g. an oversized frame
            log.warning("%s (%s): %s", peer, user or "no certificate", exc)
            await connection.send(_error_frame(exc))
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("%s: connection ended: %s", peer, exc)
        except asyncio.CancelledError:
            # Shutdown: end quietly (a handler task that ends cancelled makes asyncio's
            # stream callback log a spurious error).
            log.info("%s: session closed by shutdown", peer)
        finally:
            self._unregister(connection)
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            writer.close()
            # A peer that no longer answers must not hold up shutdown (TLS close_notify).
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)

    async def _heartbeat(self, connection: AgentConnection) -> None:
        """A heartbeat whenever the connection was quiet for ``heartbeat_interval``."""
        interval = self.heartbeat_interval
        while True:
            quiet = time.monotonic() - connection.last_write
            if quiet < interval:
                await asyncio.sleep(interval - quiet)
                continue
            if not await connection.send(schema.Heartbeat()):
                return
