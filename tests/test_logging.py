"""What the command prints about itself: log lines (time, level, --quiet, --verbose, the
journal), the progress line on a terminal only, --version, and each subcommand's --help
(its purpose and an example the parser accepts). `agent sync` runs as a real process
against the test Dovecot and the hosted server."""

from __future__ import annotations

import os
import pty
import re
import shlex
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from bridge import REPO, Bridge, run_cli
from dovecot import Dovecot

from imapsync_bridge import cli

TIMED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")
JOURNAL = re.compile(r"^<[3-7]>(DEBUG|INFO|WARNING|ERROR) \S+: ")


def agent_sync(
    bridge: Bridge, *options: str, env: dict[str, str] | None = None, stderr: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "imapsync_bridge.cli", *options, "agent", "sync"]
    return subprocess.run(
        [*argv, "--config", str(bridge.agent_ini)],
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        timeout=60,
    )


def test_log_lines_levels_journal_and_progress(dovecot: Dovecot, tmp_path: Path) -> None:
    bridge = Bridge(dovecot, tmp_path, window=60).start()
    try:
        bridge.pair()
        for n in range(1, 61):
            bridge.deliver(n)
        # a first sync on a terminal: the progress line, rewritten in place
        controller, terminal = pty.openpty()
        try:
            done = agent_sync(bridge, stderr=terminal)
            os.close(terminal)
            shown = b""
            while chunk := _read(controller):
                shown += chunk
        finally:
            os.close(controller)
        assert done.returncode == 0, shown
        fetched = re.findall(rb"\rfetching from the desktop: (\d+)/(\d+)", shown)
        assert fetched == [(b"50", b"60"), (b"60", b"60")], shown  # one per batch
        progress = re.findall(rb"\rsending to the phone: (\d+)/(\d+)", shown)
        assert progress and progress[-1][0] == progress[-1][1] and int(progress[-1][1]) >= 60

        bridge.deliver(61)  # something to do: the session logs what it did
        default = agent_sync(bridge)
        lines = default.stderr.decode().splitlines()
        assert default.returncode == 0 and lines, default.stderr
        assert all(TIMED.match(line) for line in lines), lines
        assert [
            line for line in lines if " INFO imapsync_bridge." in line and "sync complete" in line
        ]
        assert b"sending to the phone" not in default.stderr  # not a terminal: no progress
        assert b"fetching from the desktop" not in default.stderr

        quiet = agent_sync(bridge, "--quiet")
        assert (quiet.returncode, quiet.stderr) == (0, b"")
        assert b"pulled=" in quiet.stdout  # the summary still goes to stdout

        verbose = agent_sync(bridge, "--verbose")
        assert verbose.returncode == 0
        assert [line for line in verbose.stderr.decode().splitlines() if " DEBUG " in line]

        # stderr is the journal: no time of our own, the syslog priority first
        log = tmp_path / "journal.log"
        with log.open("wb") as journal:
            info = os.fstat(journal.fileno())
            stream = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
            assert agent_sync(bridge, env=stream, stderr=journal.fileno()).returncode == 0
        lines = log.read_text().splitlines()
        assert lines and all(JOURNAL.match(line) for line in lines), lines
        assert [line for line in lines if line.startswith("<6>INFO ")]
        # JOURNAL_STREAM naming another stream (a child of a journald service writing to a
        # file) keeps the time
        other = agent_sync(bridge, env={"JOURNAL_STREAM": "1:2"})
        assert all(TIMED.match(line) for line in other.stderr.decode().splitlines())
    finally:
        bridge.stop()


def test_agent_run_on_a_terminal_shows_the_first_syncs_progress(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    bridge = Bridge(dovecot, tmp_path, window=60).start()
    try:
        bridge.write_agent_config(bridge.agent_ini, idle="false")
        bridge.pair()
        for n in range(1, 61):
            bridge.deliver(n)
        controller, terminal = pty.openpty()
        try:
            agent = subprocess.Popen(
                [sys.executable, "-m", "imapsync_bridge.cli", "agent", "run",
                 "--config", str(bridge.agent_ini)],
                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=terminal, stderr=terminal,
            )  # fmt: skip
            os.close(terminal)
            shown = b""
            while b"sync (" not in shown and (chunk := _read(controller)):
                shown += chunk
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(15) == 0
        finally:
            os.close(controller)
        assert re.search(rb"\rfetching from the desktop: 60/60\r?\n", shown), shown
        assert re.search(rb"\rsending to the phone: 60/60\r?\n", shown), shown
    finally:
        bridge.stop()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other end is closed
        return b""


def test_version() -> None:
    rc, out, _err = run_cli("--version")
    assert (rc, out) == (0, f"imapsync-bridge {version('imapsync-bridge')}\n")


def test_verbose_and_quiet_together_is_a_usage_error() -> None:
    rc, _out, err = run_cli("--verbose", "--quiet", "agent", "status", "--config", "x.ini")
    assert rc == 2 and "not allowed with argument" in err


COMMANDS = [
    ["server"], ["server", "init"], ["server", "add-user"], ["server", "pair-code"],
    ["server", "set-password"], ["server", "run"],
    ["agent"], ["agent", "pair"], ["agent", "sync"], ["agent", "run"], ["agent", "status"],
    ["agent", "check"], ["set-password"],
    *[["phone", "--config", "s.ini", "--user", "u", verb] for verb in (
        "list", "show", "delete", "restore", "destroy", "read", "unread", "flag", "unflag",
        "request-sync", "compose",
    )],
]  # fmt: skip


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_subcommand_help_has_a_purpose_and_a_working_example(path: list[str]) -> None:
    rc, out, _err = run_cli(*path, "--help")
    assert rc == 0
    paragraphs = out.split("\n\n")
    purpose = paragraphs[1].strip()
    assert purpose.endswith(".") and "\n" not in purpose.replace("\n ", " "), purpose
    assert paragraphs[-1].startswith("example:\n  imapsync-bridge ")
    example = shlex.split(paragraphs[-1].splitlines()[1])
    words = iter(example[1:])  # the example runs this very command
    assert all(word in words for word in path if word not in ("s.ini", "u")), example
    cli.build_parser().parse_args(example[1:])  # a bad example would exit here
