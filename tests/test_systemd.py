"""systemd: the notify protocol over a real unix datagram socket, `agent run` and `server
run` as real processes saying READY=1 and pinging the watchdog, and the shipped units as
`make install-systemd` installs them, checked by systemd's own tools."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import REPO, Bridge
from dovecot import Dovecot
from proxy import SlowProxy

from imapsync_bridge import cli
from imapsync_bridge.sdnotify import Notifier
from imapsync_bridge.server.app import init_server

UNITS = ("imapsync-bridge-agent.service", "imapsync-bridge-server.service")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on: a unix datagram socket ($NOTIFY_SOCKET)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(10)
        yield sock


def messages(sock: socket.socket, until: str, limit: float = 10.0) -> list[str]:
    """Datagrams received until one contains ``until`` (within ``limit`` seconds)."""
    got: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} within {limit} s; got {got}")


def test_notifier_sends_datagrams_and_paces_the_watchdog(notify_socket: socket.socket) -> None:
    address = notify_socket.getsockname()
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    assert notifier.ping_every == pytest.approx(0.1)
    notifier.ready("listening")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=listening"
    notifier.ping()  # too soon after READY: nothing
    time.sleep(0.12)
    notifier.ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert 0.0 < (notifier.seconds_to_ping() or 0) <= 0.1
    time.sleep(0.12)
    notifier.update("sending to the phone", 64, 500)  # a long session's step pings too
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket_and_watchdog_pid() -> None:
    name = f"imapsync-bridge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).notify(STATUS="x")
        assert sock.recv(100) == b"STATUS=x"
    # the watchdog is another process's (WATCHDOG_PID): ours stays off
    other = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environment(other).ping_every is None
    assert Notifier.from_environment({}).ping_every is None


def test_an_unreachable_socket_is_one_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"), 100_000)
    with caplog.at_level(logging.WARNING):
        notifier.ready("x")
        notifier.stopping()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot notify systemd at $NOTIFY_SOCKET: No such file or directory"
    ]


def run_notified(
    argv: list[str], sock: socket.socket, log: Path, watchdog_usec: int = 600_000
) -> subprocess.Popen[bytes]:
    """*argv* as systemd runs it; the default WatchdogSec=0.6 s: a ping every 0.3 s."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        NOTIFY_SOCKET=sock.getsockname(),
        WATCHDOG_USEC=str(watchdog_usec),
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", *argv], env=env, stdout=out, stderr=out
        )


def assert_ready_pings_and_stops(process: subprocess.Popen[bytes], sock: socket.socket) -> None:
    try:
        first = messages(sock, "READY=1")
        assert not [m for m in first if "WATCHDOG" in m], "pinged before it was ready"
        started = time.monotonic()
        for _ in range(3):
            assert messages(sock, "WATCHDOG=1", limit=1.0)[-1] == "WATCHDOG=1"
        assert time.monotonic() - started < 2.0  # about every 0.3 s, never 0.6 s apart
        process.send_signal(signal.SIGTERM)
        messages(sock, "STOPPING=1")
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_agent_run_says_ready_and_pings_the_watchdog(
    dovecot: Dovecot, tmp_path: Path, notify_socket: socket.socket
) -> None:
    bridge = Bridge(dovecot, tmp_path).start()
    try:
        bridge.pair()
        process = run_notified(
            ["agent", "run", "--config", str(bridge.agent_ini)], notify_socket, tmp_path / "log"
        )
        assert_ready_pings_and_stops(process, notify_socket)
    finally:
        bridge.stop()


def test_a_long_first_sync_keeps_pinging_the_watchdog(
    dovecot: Dovecot, tmp_path: Path, notify_socket: socket.socket
) -> None:
    """A first sync whose desktop fetch takes longer than WatchdogSec (a slow line):
    the session pings as each batch arrives, so systemd never sees a silence that long."""
    watchdog = 2.5  # WatchdogSec, seconds
    bridge = Bridge(dovecot, tmp_path, window=200).start()
    proxy = SlowProxy(dovecot.port, bytes_per_second=200_000)  # 200 x 4 kB: about 4 s
    try:
        for n in range(1, 201):
            bridge.deliver(n, body="x" * 4000)
        bridge.write_agent_config(bridge.agent_ini, imap_port=proxy.port, idle="false")
        bridge.pair()
        process = run_notified(
            ["agent", "run", "--config", str(bridge.agent_ini)],
            notify_socket, tmp_path / "log", int(watchdog * 1e6),
        )  # fmt: skip
        try:
            messages(notify_socket, "READY=1")
            heard = [time.monotonic()]
            notify_socket.settimeout(0.1)
            deadline = heard[0] + 40
            while "sync (" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if notify_socket.recv(4096) == b"WATCHDOG=1":
                        heard.append(time.monotonic())
            heard.append(time.monotonic())
            log = (tmp_path / "log").read_text()
            took = re.search(r"sync \(\S+\): .* in ([\d.]+) s", log)
            assert took, log
            assert float(took[1]) > watchdog, "the session was not longer than the watchdog"
            gaps = [b - a for a, b in itertools.pairwise(heard)]
            assert max(gaps) < watchdog, f"watchdog starved: {gaps}"
            assert len(bridge.phone_inbox_ids()) == 200
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
    finally:
        proxy.close()
        bridge.stop()


def test_server_run_says_ready_and_pings_the_watchdog(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    ini = init_server(tmp_path / "srv", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0)
    ini.write_text(re.sub(r"web_listen = .*", "web_listen =", ini.read_text()))
    process = run_notified(["server", "run", "--config", str(ini)], notify_socket, tmp_path / "log")
    assert_ready_pings_and_stops(process, notify_socket)


# -- the unit files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as `make install-systemd` writes them, ExecStart at this venv's command."""
    target = tmp_path_factory.mktemp("systemd")
    bindir = Path(sys.executable).parent
    done = subprocess.run(
        ["make", "-s", "install-systemd", f"BINDIR={bindir}", f"SYSTEMD_DIR={target}",
         "SYSTEMCTL=true", "SUDO="],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(UNITS)
    return target


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(installed: Path, unit: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(installed / unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_security_rates_the_unit_ok(installed: Path, unit: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed / unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    found = re.search(rf"Overall exposure level for {unit}: ([\d.]+) (\w+)", done.stdout)
    assert found is not None, done.stdout + done.stderr
    assert found.group(2) in ("OK", "SAFE") and float(found.group(1)) <= 2.0


@pytest.mark.parametrize(
    ("unit", "command"), [(UNITS[0], cli.cmd_agent_run), (UNITS[1], cli.cmd_server_run)]
)
def test_exec_start_runs_an_existing_command_the_cli_accepts(
    installed: Path, unit: str, command: object
) -> None:
    text = (installed / unit).read_text()
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert os.access(argv[0], os.X_OK) and Path(argv[0]).name == "imapsync-bridge"
    args = cli.build_parser().parse_args(argv[1:])  # a usage error would exit here
    assert args.func is command
    assert args.config.startswith(("/etc/imapsync-bridge/", "/var/lib/imapsync-bridge-server/"))
    for keyword in ("Type=notify", "WatchdogSec=", "DynamicUser=yes", "StateDirectory=",
                    "LoadCredential=", "Restart=on-failure", "RestartSec=",
                    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "RestrictAddressFamilies=",
                    "SystemCallFilter=@system-service"):  # fmt: skip
        assert f"\n{keyword}" in text, keyword
