"""A TCP proxy on loopback for fault tests: it sits between a client and a real server
and lets a test act on what the client sends (kill a process, rewrite a command)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time


class Proxy:
    """A TCP proxy on loopback; subclasses watch what the client sends upstream."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.fired = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the target is down: refuse, as a dead host would
                client.close()
                continue
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._upstream, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(
        source: socket.socket, sink: socket.socket, bytes_per_second: float | None = None
    ) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if bytes_per_second:
                    time.sleep(len(data) / bytes_per_second)
        except OSError:
            pass
        finally:
            sink.close()

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        self._pump(client, upstream)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()


class RewritingProxy(Proxy):
    """Rewrites client lines matching ``pattern`` with ``replacement`` (while armed), so
    the real server answers a command the client did not mean: a real refusal."""

    def __init__(self, target_port: int, pattern: bytes, replacement: bytes) -> None:
        super().__init__(target_port)
        self.pattern = re.compile(pattern)
        self.replacement = replacement
        self.armed = True
        self.rewritten = 0

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while line := reader.readline():
                if self.armed and self.pattern.search(line):
                    line = self.pattern.sub(self.replacement, line)
                    self.rewritten += 1
                upstream.sendall(line)
        except OSError:
            pass
        finally:
            upstream.close()


class SlowProxy(Proxy):
    """Passes the server's bytes to the client at about ``bytes_per_second``: a slow
    VPN or a far-away server (what the client sends goes at full speed)."""

    def __init__(self, target_port: int, bytes_per_second: int) -> None:
        super().__init__(target_port)
        self.bytes_per_second = bytes_per_second

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:  # type: ignore[override]
        Proxy._pump(source, sink, self.bytes_per_second)

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        Proxy._pump(client, upstream)


class StallingProxy(Proxy):
    """The first connection goes silent (nothing forwarded, nothing closed) once the
    client has sent ``after_bytes``: a network that stops answering."""

    def __init__(self, target_port: int, after_bytes: int) -> None:
        super().__init__(target_port)
        self.after_bytes = after_bytes
        self.connections = 0

    def _upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        self.connections += 1
        if self.connections > 1:
            self._pump(client, upstream)
            return
        sent = 0
        try:
            while data := client.recv(4096):
                if self.fired.is_set():
                    continue  # swallowed
                upstream.sendall(data)
                sent += len(data)
                if sent >= self.after_bytes:
                    self.fired.set()
        except OSError:
            pass


class BlackholeProxy(Proxy):
    """:meth:`blackhole` makes every connection open now, and every one made until
    :meth:`restore`, stop forwarding in both directions without closing anything: bytes
    are still read (the kernel keeps ACKing, as a stuck middlebox or a NAT box that forgot
    the flow would) and dropped. After :meth:`restore` new connections work again; the
    blackholed ones stay dead (their streams lost bytes). :attr:`connections` counts the
    connections the proxy accepted and passed on."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._holed = threading.Event()
        self._lock = threading.Lock()
        # A connection is the pair of its sockets (held, so no key is ever reused).
        self._live: set[frozenset[socket.socket]] = set()
        self._dead: set[frozenset[socket.socket]] = set()
        self.connections = 0

    def blackhole(self) -> None:
        with self._lock:
            self._holed.set()
            self._dead |= self._live

    def restore(self) -> None:
        self._holed.clear()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:  # type: ignore[override]
        key = frozenset((source, sink))  # the same for both directions
        with self._lock:
            if key not in self._live:
                self._live.add(key)
                self.connections += 1
        try:
            while data := source.recv(65536):
                with self._lock:
                    if self._holed.is_set():
                        self._dead.add(key)
                    dead = key in self._dead
                if not dead:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()
            with self._lock:
                self._live.discard(key)
