"""Where the command's log goes and how it looks; the progress line of long work.

One line per event on stderr: ``time LEVEL logger: message``. When stderr is the
journal (systemd sets ``$JOURNAL_STREAM`` to its device and inode), the time is left to
journald and each line starts with its syslog priority (``<4>`` for a warning), so
``journalctl -p warning`` filters by level.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Protocol, TextIO

QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether *stream* is the journal: ``$JOURNAL_STREAM`` names its device:inode."""
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):  # not a real file (a test's StringIO)
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<priority>LEVEL logger: message``, no time: journald adds its own."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return f"<{priority}>{super().format(record)}"


def configure(level: int, stream: TextIO = sys.stderr) -> None:
    """Set up the root logger once per process (a caller that configured logging
    already, such as a test runner, keeps its own)."""
    handler = logging.StreamHandler(stream)
    if to_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class ProgressSink(Protocol):
    """Told of each step of long work: a terminal's progress line, a service's watchdog."""

    def update(self, what: str, done: int, total: int) -> None: ...


class ProgressFanout:
    """Tells several sinks at once: `agent run`'s watchdog and, on a terminal, the line."""

    def __init__(self, *sinks: ProgressSink) -> None:
        self._sinks = sinks

    def update(self, what: str, done: int, total: int) -> None:
        for sink in self._sinks:
            sink.update(what, done, total)


# Work of at least this many steps (a first sync, a large pull) shows a progress line.
PROGRESS_MIN_TOTAL = 50


class Progress:
    """One line rewritten in place on a terminal (``what: done/total``) for work of
    PROGRESS_MIN_TOTAL steps or more; nothing when the stream is not a terminal (a
    service, a pipe, a log file)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()

    def update(self, what: str, done: int, total: int) -> None:
        if not self.enabled or total < PROGRESS_MIN_TOTAL:
            return
        end = "\n" if done >= total else ""
        self._stream.write(f"\r{what}: {done}/{total}{end}")
        self._stream.flush()
