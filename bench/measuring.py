"""Measurement records and the counting TCP proxy every tool's IMAP connection goes through.

- :class:`Run` (one sync by one tool) and :class:`Measurement` (all runs of one tool in
  one scenario, shown as the median run);
- :class:`CountingProxy`: 127.0.0.1:port -> Dovecot, counting IMAP turns (round trips),
  commands and bytes from the server;
- :func:`run_measured` (wall time and peak RSS of a whole child process) and
  :func:`peak_rss_self` (the running agent's own peak).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- measurements ------------------------------------------------------------------------
@dataclass
class Run:
    """One sync by one tool."""

    wall: float
    turns: int | None = None
    commands: int | None = None
    bytes_read: int | None = None
    peak_rss_kb: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    """All runs of one tool in one scenario; the table shows the median run."""

    scenario: str
    tool: str
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        ordered = sorted(self.runs, key=lambda r: r.wall)
        return ordered[(len(ordered) - 1) // 2]

    def walls(self) -> list[float]:
        return [r.wall for r in self.runs]


@dataclass
class Counts:
    turns: int = 0
    commands: int = 0
    bytes_read: int = 0

    def minus(self, other: Counts) -> Counts:
        return Counts(
            self.turns - other.turns,
            self.commands - other.commands,
            self.bytes_read - other.bytes_read,
        )


# -- a counting TCP proxy in front of Dovecot -------------------------------------------
class CommandCounter:
    """Counts IMAP commands in the client's byte stream (skipping literals)."""

    _LITERAL = re.compile(rb"\{(\d+)\+?\}$")

    def __init__(self) -> None:
        self.buffer = b""
        self.skip = 0
        self.at_start = True
        self.commands = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.skip:
                taken = min(self.skip, len(self.buffer))
                self.buffer = self.buffer[taken:]
                self.skip -= taken
                if self.skip:
                    return
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if self.at_start and line.strip():
                self.commands += 1
            literal = self._LITERAL.search(line)
            if literal:
                self.skip = int(literal.group(1))
                self.at_start = False
            else:
                self.at_start = True


class CountingProxy:
    """127.0.0.1:port -> Dovecot (or any TCP server). Counts, over all its connections:
    turns (the client speaking again after the server spoke: one network round trip,
    pipelining included), commands (IMAP only), and bytes sent by the server.

    ``one_way_delay`` seconds > 0 make it a delaying proxy: every chunk is forwarded that
    long after it arrived, in order, in both directions (a link with twice that added
    round-trip time and no bandwidth limit)."""

    def __init__(self, target_port: int, one_way_delay: float = 0.0) -> None:
        self.target_port = target_port
        self.one_way_delay = one_way_delay
        self._lock = threading.Lock()
        self._counts = Counts()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> Counts:
        with self._lock:
            return Counts(self._counts.turns, self._counts.commands, self._counts.bytes_read)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            state = {"last": "s", "parser": CommandCounter()}
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                args = (src, dst, state, upstream)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        send: Callable[[bytes], None] = dst.sendall
        finish: Callable[[], None] = lambda: None  # noqa: E731
        if self.one_way_delay > 0:
            send, finish = _delayed(dst, self.one_way_delay)
        try:
            while data := src.recv(262144):
                with self._lock:
                    if upstream:
                        if state["last"] != "c":
                            self._counts.turns += 1
                        state["last"] = "c"
                        parser: CommandCounter = state["parser"]
                        before = parser.commands
                        parser.feed(data)
                        self._counts.commands += parser.commands - before
                    else:
                        state["last"] = "s"
                        self._counts.bytes_read += len(data)
                send(data)
        except OSError:
            pass
        finally:
            finish()
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()


def _delayed(
    dst: socket.socket, delay: float
) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """(send, finish): send(data) forwards *data* to *dst* *delay* seconds from now, in
    order; finish() waits until everything queued went out."""
    pending: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

    def forward() -> None:
        with contextlib.suppress(OSError):
            while (item := pending.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)

    sender = threading.Thread(target=forward, daemon=True)
    sender.start()

    def finish() -> None:
        pending.put(None)
        sender.join(10)

    return (lambda data: pending.put((time.monotonic() + delay, data))), finish


# -- child processes: wall time and peak RSS ----------------------------------------
GNU_TIME = "/usr/bin/time"


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, str]:
    """Run a process to its end: (exit code, wall seconds, peak RSS in KB, output).

    Linux counts the pre-exec memory of a forked child (a copy of this big Python
    process) in its ``ru_maxrss``, so the peak RSS comes from GNU time (a small
    parent, ~2 MB) when it is installed; else from ``os.wait4`` (then an upper bound).
    """
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss_file:
        timed = os.access(GNU_TIME, os.X_OK)
        if timed:
            argv = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        rss = usage.ru_maxrss
        if timed:
            lines = rss_file.read().split()
            rss = int(lines[-1]) if lines and lines[-1].isdigit() else rss
    return proc.returncode, wall, rss, text


def peak_rss_self() -> int:
    """This process's own peak RSS in KB (VmHWM: unlike ru_maxrss, not inherited)."""
    return proc_memory_kb("self")["VmHWM"] or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def proc_memory_kb(pid: int | str) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of a running process, in KB (0 where not shown)."""
    found = {"VmHWM": 0, "VmRSS": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in found:
            found[name] = int(value.split()[0])
    return found


def proc_cpu_seconds(pid: int) -> float:
    """CPU time a running process used so far, all its threads: utime + stime."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
