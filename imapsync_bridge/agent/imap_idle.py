"""The IMAP commands of watching a mailbox (IDLE, RFC 2177), for :mod:`.idle`.

On imaplib's primitives: imapclient 4.1's idle() fails on an untagged line before
"+ idling", and idle_check() polls the socket only, so it misses lines already in
imaplib's buffer and cannot tell a closed connection from a quiet one.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from imapsync_bridge.agent.imap_session import ImapSession
from imapsync_bridge.errors import ConnectionLost, ImapError
from imapsync_bridge.model import Flags

#: One untagged FETCH's UID and flags (QRESYNC makes the server name the UID).
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")


@dataclass(frozen=True)
class FlagNotice:
    """What one untagged FETCH told about a message; ``uid``/``flags`` are None when
    the line did not carry them (no QRESYNC: sequence numbers only)."""

    uid: int | None
    flags: Flags | None


def flag_notice(data: bytes) -> FlagNotice:
    """Parses one FETCH response's data, e.g. ``b"5 (UID 9 MODSEQ (7) FLAGS (\\Seen))"``."""
    uid, flags = _FETCH_UID.search(data), _FETCH_FLAGS.search(data)
    names = flags.group(1).lower().split() if flags else []  # flags ignore case
    return FlagNotice(
        int(uid.group(1)) if uid else None,
        Flags(b"\\seen" in names, b"\\flagged" in names) if flags else None,
    )


class ImapWatching(ImapSession):
    """EXAMINE, IDLE start/wait/DONE with reply deadlines, TCP keepalive, abort."""

    _idle_tag: bytes | None = None
    #: the FETCHes heard since the last :meth:`take_flag_notices`
    _flag_notices: tuple[FlagNotice, ...] = ()

    def examine(self, mailbox: str) -> int:
        """EXAMINE *mailbox* (read-only, for a session that only watches); its size.
        Where the server offers QRESYNC it is enabled first, so that a flag notice
        names its UID (RFC 7162 §3.2.4) and can be told apart from our own writes."""
        with self._guard(f"EXAMINE {mailbox}"):
            self._selected = None
            self._flag_notices = ()
            if self.has("QRESYNC"):
                self._client.enable("QRESYNC")
            self._client._imap.untagged_responses.clear()
            self._exists = int(self._client.select_folder(mailbox, readonly=True)[b"EXISTS"])
            self._selected = mailbox
        return self._exists

    def keepalive(self, idle: int, interval: int, count: int) -> None:
        """TCP keepalive: first probe after *idle* s of silence, then every *interval* s,
        dead after *count* (the timing where the platform lets us set it)."""
        with self._guard("keepalive"):
            sock = self._client.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            if hasattr(socket, "TCP_KEEPCNT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)

    @property
    def idling(self) -> bool:
        """An IDLE is running (False also when the server ended it by itself)."""
        return self._idle_tag is not None

    def idle_start(self, reply_timeout: float) -> set[str]:
        """IDLE on the selected mailbox, "+ idling" within *reply_timeout* s; returns the
        untagged response types (``EXISTS``, ``FETCH``...) sent before it."""
        self._require_selected()
        with self._guard("IDLE"), self._within("IDLE", reply_timeout) as imap:
            tag = imap._command("IDLE")
            while imap._get_response() is not None:  # None: the continuation
                if imap.tagged_commands.get(tag):
                    raise ImapError(f"IDLE refused: {imap.tagged_commands.pop(tag)}")
            self._idle_tag = tag
            return self._untagged(imap)

    def idle_wait(self, timeout: float, wake_fd: int | None, reply_timeout: float) -> set[str]:
        """Untagged response types sent during IDLE, waiting up to *timeout* s for the
        first (less when *wake_fd* becomes readable); a started line must end within
        *reply_timeout* s. ConnectionLost when the server closed or said BYE."""
        with self._guard("IDLE"):
            sock = self._client.socket()
            if not self._available(sock):
                fds = [sock.fileno()] + ([wake_fd] if wake_fd is not None else [])
                if sock.fileno() not in select.select(fds, [], [], max(timeout, 0.0))[0]:
                    return set()
                if not self._available(sock):  # readable, no bytes: EOF (or a TLS record)
                    if _peer_closed(sock):
                        raise OSError("the server closed the connection")
                    return set()
            with self._within("IDLE", reply_timeout) as imap:
                while self._idle_tag is not None and self._available(sock):
                    imap._get_response()
                    if imap.tagged_commands.get(self._idle_tag):  # the server ended IDLE
                        del imap.tagged_commands[self._idle_tag]
                        self._idle_tag = None
                imap._check_bye()
                return self._untagged(imap)

    def idle_end(self, reply_timeout: float) -> set[str]:
        """DONE, and its tagged OK within *reply_timeout* s (the liveness probe); returns
        the untagged response types that came before the OK."""
        tag, self._idle_tag = self._idle_tag, None
        with self._guard("IDLE DONE"), self._within("IDLE DONE", reply_timeout) as imap:
            if tag is not None:
                imap.send(b"DONE\r\n")
                typ, data = imap._command_complete("IDLE", tag)
                if typ != "OK":
                    raise ImapError(f"IDLE ended with {typ} {data}")
            return self._untagged(imap)

    def noop(self, reply_timeout: float) -> None:
        """NOOP, its OK within *reply_timeout* s (ConnectionLost if not): the server
        brings the selected mailbox's view up to date."""
        with self._guard("NOOP"), self._within("NOOP", reply_timeout):
            self._client.noop()

    def abort(self) -> None:
        """Cut the connection now, from any thread: a read blocked on it fails at once."""
        client, self._broken = self._client, self._broken or "aborted"
        if client is not None:
            with contextlib.suppress(OSError):
                client.socket().shutdown(socket.SHUT_RDWR)

    def take_flag_notices(self) -> list[FlagNotice]:
        """The FETCHes heard since the last call (the untagged ``FETCH`` kind)."""
        notices, self._flag_notices = self._flag_notices, ()
        return list(notices)

    def _untagged(self, imap: Any) -> set[str]:
        responses = imap.untagged_responses
        self._flag_notices += tuple(
            # a tuple holds a literal inside a FETCH: not a flag update we can read
            flag_notice(data) if isinstance(data, bytes) else FlagNotice(None, None)
            for data in responses.get("FETCH", ())
        )
        kinds = {str(k).upper() for k in responses}
        responses.clear()  # nobody else reads these: let none pile up
        return kinds

    def _available(self, sock: Any) -> bool:
        """Bytes are waiting in imaplib's buffer or on the socket (non-blocking peek)."""
        before = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return bool(self._client._imap.file.peek(1))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        finally:
            sock.settimeout(before)

    @contextlib.contextmanager
    def _within(self, what: str, seconds: float) -> Iterator[Any]:
        sock = self._client.socket()
        before = sock.gettimeout()
        sock.settimeout(seconds)
        try:
            yield self._client._imap
        except TimeoutError as exc:
            self._broken = f"no answer within {seconds:g} s"
            raise ConnectionLost(f"{what}: no answer from {self._host} in {seconds:g} s") from exc
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(before)


def _peer_closed(sock: socket.socket) -> bool:
    """The TCP stream under *sock* (also under TLS) is at EOF or failed: a peek at a
    duplicate of its descriptor, which leaves the original's mode alone."""
    probe = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()
