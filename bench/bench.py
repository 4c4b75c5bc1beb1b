"""`make bench`: the bridge and mbsync side by side on one large Dovecot inbox.

Steps (one function each below):

1. a throwaway Dovecot (tests/dovecot.py) with N realistic 2-5 KB mails written straight
   into the Maildir's ``cur/``, then indexed and warmed once before any timing;
2. the hosted server as a subprocess and two paired agents (two phone users on the same
   IMAP inbox): one run as a one-shot ``agent sync`` process per scenario, one as a
   long-running worker process that keeps its IMAP and server connections open
   (``python bench/bench.py --worker INI``, driven over a pipe);
3. mbsync (Debian ``isync``) with ``MaxMessages W`` into a temp Maildir;
4. scenarios: first sync, no change, one ``\\Seen`` change, one new message. Every
   tool's IMAP connection goes through its own counting TCP proxy (IMAP turns, commands,
   bytes from the server), so the figures are comparable across tools;
5. one table on stdout, also written to docs/benchmark.md.

Everything (Dovecot, server, worker, proxies, temp dirs) is cleaned up on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PASSWORD_FILE = "imap.pass"
BASE_DATE = dt.datetime(2019, 1, 1, 8, 0, tzinfo=dt.UTC)
STEP = dt.timedelta(minutes=7)
UNREAD_NEWEST = 20  # the newest messages are unread, the rest read (no flagged mail)
DIRTY_SYNC_PAUSE = 2.0  # stock Dovecot re-scans cur/ on every SELECT for ~1.5 s after a change
SCENARIOS = ["first sync", "no change", "one flag", "one new message"]
CHANGES = SCENARIOS[2:]
RUNNING = "bridge running agent"
RUNNING_NOOP = "bridge running agent, NOOP first"
TOOLS = ["bridge one-shot", RUNNING, RUNNING_NOOP, "mbsync"]
DOCS_MARKER = "<!-- bench.py keeps everything below this line -->"


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
    """127.0.0.1:port -> Dovecot. Counts, over all its connections: turns (the client
    speaking again after the server spoke: one network round trip, pipelining included),
    commands, and bytes sent by the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
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
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()


# -- child processes ------------------------------------------------------------------
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
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


#: Bytecode cache for the product's child processes (set by run_bench): an installed
#: package has its .pyc files; PYTHONDONTWRITEBYTECODE (set here) would make every
#: one-shot run compile the product's modules from source.
PYCACHE: Path | None = None


def python_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))
    if PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


def cli(*argv: str) -> str:
    """The product's command line as a subprocess; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", *argv],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"imapsync-bridge {' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- step 1: Dovecot and the seeded inbox -----------------------------------------------
_TEXT = (
    "the quarterly report meeting budget review project schedule please find attached "
    "thanks regards update customer release planning next week deadline invoice team "
    "office travel approval draft comments feedback minutes agenda call tomorrow status "
    "server migration ticket incident resolved pending contract proposal sales numbers"
)
_WORDS = _TEXT.split()


def make_mail(n: int, date: dt.datetime, rng: random.Random) -> bytes:
    """A realistic 2-5 KB message (CRLF line ends) with a distinct Message-ID."""
    sender = f"colleague{rng.randrange(200)}@corp.example.com"
    subject = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8))).capitalize()
    stamp = date.strftime("%a, %d %b %Y %H:%M:%S +0000")
    header = [
        "Return-Path: <" + sender + ">",
        f"Received: from mx{n % 7}.corp.example.com (mx{n % 7}.corp.example.com [10.0.{n % 250}.{n % 200}])",  # noqa: E501
        f"\tby imap.corp.example.com with ESMTPS id {n:08x}; {stamp}",
        f"From: Colleague <{sender}>",
        "To: Bench User <bench@corp.example.com>",
        f"Subject: {subject} #{n}",
        f"Date: {stamp}",
        f"Message-ID: <bench.{n}.{rng.getrandbits(48):012x}@corp.example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
    ]
    head = "\r\n".join(header) + "\r\n"
    target = rng.randint(2048, 5120) - len(head)
    lines: list[str] = []
    size = 0
    while size < target:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(6, 12)))
        lines.append(line)
        size += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n").encode()


def mail_date(n: int) -> dt.datetime:
    return BASE_DATE + n * STEP


def seed_inbox(dovecot: Any, user: str, count: int) -> float:
    """Write *count* mails into the user's Maildir cur/, then let Dovecot index them."""
    started = time.perf_counter()
    maildir = dovecot.maildir(user)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240601)
    host = "bench"
    for n in range(1, count + 1):
        date = mail_date(n)
        raw = make_mail(n, date, rng)
        flags = "" if n > count - UNREAD_NEWEST else "S"
        stamp = int(date.timestamp())
        name = f"{stamp}.M{n}P{os.getpid()}.{host},S={len(raw)},W={len(raw)}:2,{flags}"
        path = maildir / "cur" / name
        path.write_bytes(raw)
        os.utime(path, (stamp, stamp))
        if n % 10000 == 0 or n == count:
            log(f"seeding: {n}/{count} files written")
    dovecot._chown_tree(maildir)  # the fixture's helper: Dovecot's mail user owns it all
    written = time.perf_counter() - started
    log(f"seeding: files written and chowned in {written:.1f} s; Dovecot indexing ...")
    with dovecot.client(user) as client:
        info = client.select_folder("INBOX")
        # Warm Dovecot's cache the way years of mail-client use would have: dates, sizes
        # and flags of every message are cached before either tool runs.
        client._imap.uid("FETCH", "1:*", "(FLAGS INTERNALDATE RFC822.SIZE)")
        client.normalise_times = False
        ends = client.fetch([1, count], ["INTERNALDATE"])
    if info[b"EXISTS"] != count:
        raise RuntimeError(f"Dovecot sees {info[b'EXISTS']} messages, expected {count}")
    if ends[1][b"INTERNALDATE"] >= ends[count][b"INTERNALDATE"]:
        raise RuntimeError("UIDs do not follow the arrival dates")
    seconds = time.perf_counter() - started
    log(f"seeding: {count} messages indexed in {seconds:.1f} s")
    return seconds


# -- step 2: the hosted server and the agents ------------------------------------------
@dataclass
class Product:
    root: Path
    server_ini: Path
    oneshot_ini: Path
    running_ini: Path
    server: subprocess.Popen


def start_product(
    root: Path, imap_user: str, password: str, window: int, ports: dict[str, int]
) -> Product:
    """server init / add-user / run (a subprocess) / agent pair, two agents."""
    sync_port = free_port()
    cli("server", "init", "--data-dir", str(root / "server"), "--hostname", "127.0.0.1",
        "--sync-port", str(sync_port))  # fmt: skip
    server_ini = root / "server" / "server.ini"
    log_file = open(root / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config",
         str(server_ini)],
        env=python_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log_file.close()
    product = Product(root, server_ini, root / "oneshot" / "agent.ini",
                      root / "running" / "agent.ini", server)  # fmt: skip
    try:
        wait_for_port(sync_port, server, "server run")
        for name, ini in (("oneshot", product.oneshot_ini), ("running", product.running_ini)):
            out = cli("server", "add-user", "--config", str(server_ini), name,
                      "--address", f"{name}@phone.example", "--desktop-address",
                      f"{imap_user}@corp.example", "--window", str(window))  # fmt: skip
            code = out.strip().splitlines()[-1]
            write_agent_ini(ini, sync_port, ports[name], imap_user, password)
            cli("agent", "pair", "--config", str(ini), "--code", code)
    except BaseException:
        stop_process(server)
        raise
    return product


def write_agent_ini(ini: Path, sync_port: int, imap_port: int, user: str, password: str) -> None:
    ini.parent.mkdir(parents=True, exist_ok=True)
    secret = ini.parent / PASSWORD_FILE
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    ini.write_text(
        "[agent]\nstate_dir = state\n"
        f"server = 127.0.0.1:{sync_port}\n"
        "[imap]\nhost = 127.0.0.1\n"
        f"port = {imap_port}\nsecurity = none\nusername = {user}\n"
        f"password_file = {PASSWORD_FILE}\n"
    )


def oneshot_sync(ini: Path, proxy: CountingProxy, profile: Path | None) -> Run:
    """`agent sync` as its own process: wall time, peak RSS, IMAP traffic."""
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "imapsync_bridge.cli", "agent", "sync", "--config", str(ini)]
    before = proxy.counts()
    rc, wall, rss, output = run_measured(argv, python_env())
    if rc != 0:
        raise RuntimeError(f"agent sync failed ({rc}):\n{output}")
    traffic = proxy.counts().minus(before)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return Run(wall, traffic.turns, traffic.commands, traffic.bytes_read, rss,
               {"summary": summary})  # fmt: skip


class RunningAgent:
    """The worker process (see :func:`worker_main`), driven one JSON line at a time."""

    def __init__(self, ini: Path, proxy: CountingProxy, profile_dir: Path | None) -> None:
        self.proxy = proxy
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(ini)]
        if profile_dir is not None:
            argv += ["--profile", str(profile_dir)]
        self.proc = subprocess.Popen(
            argv, env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"running agent worker exited ({self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"running agent: {reply['error']}")
        return reply

    def sync(self, label: str, noop_first: bool = False) -> Run:
        """One session; *noop_first*: a NOOP (inside the timing) refreshes the
        connection's view of the selected mailbox before the session starts."""
        assert self.proc.stdin is not None
        before = self.proxy.counts()
        request = {"cmd": "sync", "label": label, "noop": noop_first}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        r = self._reply()
        traffic = self.proxy.counts().minus(before)
        return Run(r["wall"], traffic.turns, traffic.commands, traffic.bytes_read,
                   r["maxrss_kb"], r)  # fmt: skip

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        stop_process(self.proc)


class _Timer:
    """Accumulates the time spent inside wrapped callables (instance attributes only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, obj: Any, name: str) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - started

        setattr(obj, name, timed)


def worker_main(ini: Path, profile_dir: Path | None) -> int:
    """A running agent: connections opened once, then one SyncSession per request."""
    from imapsync_bridge.agent import runner
    from imapsync_bridge.agent.session import SyncSession
    from imapsync_bridge.config import load_agent_config

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    started = time.perf_counter()
    config = load_agent_config(ini)
    state = runner.open_state(config)
    imap = runner.connect_imap(config)
    desktop = runner.open_desktop(config, imap)
    link = runner.open_link(config)
    options = runner.session_options(config, False)
    # IMAP time = time inside imaplib's command send + wait/read for the tagged reply.
    imap_timer, link_timer = _Timer(), _Timer()
    imaplib_obj = imap._client._imap
    for name in ("_command", "_command_complete"):
        imap_timer.wrap(imaplib_obj, name)

    def wrap_link(current: Any) -> None:
        for name in ("request", "send_ops", "hello"):
            link_timer.wrap(current, name)

    wrap_link(link)
    reply({"ready": True, "connect_s": time.perf_counter() - started})
    for sessions, line in enumerate(sys.stdin):
        request = json.loads(line)
        if request["cmd"] != "sync":
            break
        counters = (imap.round_trips, imap.bytes_read, imap_timer.seconds, link_timer.seconds)
        profiler = cProfile.Profile() if profile_dir is not None else None
        reconnected = False
        started = time.perf_counter()
        try:
            if profiler:
                profiler.enable()
            if request.get("noop"):
                imap._client.noop()
            try:
                report = SyncSession(state, desktop, link, options).run()
            except Exception as exc:  # noqa: BLE001 - e.g. the server ended the connection
                if sessions == 0:
                    raise
                log(f"running agent: session on the open link failed ({exc!r}); reconnecting")
                link.close()
                link = runner.open_link(config)
                wrap_link(link)
                reconnected = True
                report = SyncSession(state, desktop, link, options).run()
            wall = time.perf_counter() - started
            if profiler:
                profiler.disable()
                name = f"running{'-noop' if request.get('noop') else ''}-{request['label']}"
                profiler.dump_stats(str(profile_dir / f"{name}.prof"))
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            reply({"error": repr(exc)})
            return 1
        reply(
            {
                "wall": wall,
                "imap_s": imap_timer.seconds - counters[2],
                "link_s": link_timer.seconds - counters[3],
                "adapter_cmds": imap.round_trips - counters[0],
                "adapter_bytes": imap.bytes_read - counters[1],
                "maxrss_kb": peak_rss_self(),
                "summary": report.summary(),
                "reconnected": reconnected,
            }
        )
    link.close()
    imap.close()
    state.close()
    return 0


# -- step 3: mbsync -----------------------------------------------------------------------
def write_mbsync_config(root: Path, port: int, user: str, password: str, window: int) -> Path:
    maildir = root / "maildir"
    maildir.mkdir(parents=True)
    cfg = root / "mbsyncrc"
    cfg.write_text(
        f"""IMAPAccount bench
Host 127.0.0.1
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore far
Account bench

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel inbox
Far :far:
Near :near:
Patterns INBOX
Create Near
Sync All
MaxMessages {window}
ExpireUnread yes
SyncState *
"""
    )
    return cfg


def mbsync_sync(cfg: Path, proxy: CountingProxy) -> Run:
    before = proxy.counts()
    rc, wall, rss, output = run_measured(["mbsync", "-c", str(cfg), "-a"])
    if rc != 0:
        raise RuntimeError(f"mbsync failed ({rc}):\n{output}")
    traffic = proxy.counts().minus(before)
    return Run(wall, traffic.turns, traffic.commands, traffic.bytes_read, rss)


def count_maildir(root: Path) -> int:
    inbox = root / "maildir" / "INBOX"
    return sum(
        1
        for sub in ("cur", "new")
        if (inbox / sub).is_dir()
        for name in os.listdir(inbox / sub)
        if not re.search(r":2,[A-Z]*T", name)  # expired copies are marked trashed
    )


# -- step 4: the scenarios ------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    dovecot: Any
    user: str
    product: Product
    proxies: dict[str, CountingProxy]
    running: RunningAgent
    mbsync_cfg: Path
    profile_dir: Path | None
    results: list[Measurement] = field(default_factory=list)
    count: int = 0
    unread: list[int] = field(default_factory=list)

    def record(self, scenario: str, tool: str, run: Run) -> None:
        for m in self.results:
            if m.scenario == scenario and m.tool == tool:
                m.runs.append(run)
                break
        else:
            self.results.append(Measurement(scenario, tool, [run]))
        extra = f" ({run.detail['summary']})" if run.detail.get("summary") else ""
        log(f"  {scenario:<15} {tool:<22} {run.wall * 1000:9.1f} ms  "
            f"{run.turns} turns  {run.bytes_read} B  {run.peak_rss_kb} KB{extra}")  # fmt: skip

    def all_tools(self, scenario: str, label: str) -> None:
        prof = self.profile_dir / f"oneshot-{label}.prof" if self.profile_dir else None
        self.record(scenario, "bridge one-shot", oneshot_sync(
            self.product.oneshot_ini, self.proxies["oneshot"], prof))  # fmt: skip
        run = self.running.sync(label)
        missed = scenario in CHANGES and run.detail["summary"]["fast_path"]
        run.detail["missed"] = missed
        self.record(scenario, RUNNING, run)
        if missed:
            log("  the running agent took the fast path: it MISSED the change")
        if missed or scenario == "no change":
            self.record(scenario, RUNNING_NOOP, self.running.sync(label, noop_first=True))
        self.record(scenario, "mbsync", mbsync_sync(self.mbsync_cfg, self.proxies["mbsync"]))

    def first_sync(self) -> None:
        log("scenario: first sync")
        self.all_tools("first sync", "first")
        near = count_maildir(self.mbsync_cfg.parent)
        log(f"  mbsync copied {near} messages into its Maildir (window {self.args.window})")

    def no_change(self) -> None:
        log("scenario: no change")
        time.sleep(DIRTY_SYNC_PAUSE)
        for r in range(self.args.repeat):
            self.all_tools("no change", f"nochange{r}")

    def one_flag(self) -> None:
        log("scenario: one \\Seen flag change (imapclient)")
        for r in range(self.args.repeat):
            uid = self.unread.pop()  # the newest unread message: inside the window
            with self.dovecot.client(self.user) as client:
                client.select_folder("INBOX")
                client.add_flags([uid], [b"\\Seen"])
            time.sleep(DIRTY_SYNC_PAUSE)
            self.all_tools("one flag", f"flag{r}")

    def one_new(self) -> None:
        log("scenario: one new message (APPEND)")
        rng = random.Random(7)
        for r in range(self.args.repeat):
            self.count += 1
            date = mail_date(self.count)
            self.dovecot.append(self.user, make_mail(self.count, date, rng), date)
            time.sleep(DIRTY_SYNC_PAUSE)
            self.all_tools("one new message", f"new{r}")


# -- step 5: the table ---------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _num(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MB"


def results_table(results: list[Measurement]) -> str:
    by = {(m.scenario, m.tool): m.median() for m in results}
    runs = {(m.scenario, m.tool): len(m.runs) for m in results}
    lines = [
        "| scenario | tool | wall | IMAP turns | IMAP commands | bytes read | peak RSS "
        "| bridge/mbsync: wall | turns | bytes | RSS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        base = by.get((scenario, "mbsync"))
        for tool in TOOLS:
            run = by.get((scenario, tool))
            if run is None:
                continue
            if tool == "mbsync" or base is None:
                ratios = ["", "", "", ""]
            else:
                ratios = [
                    _ratio(run.wall, base.wall),
                    _ratio(run.turns, base.turns),
                    _ratio(run.bytes_read, base.bytes_read),
                    _ratio(run.peak_rss_kb, base.peak_rss_kb),
                ]
            n = runs[(scenario, tool)]
            label = f"{scenario} (median of {n})" if n > 1 else scenario
            wall = _ms(run.wall) + (" **missed the change**" if run.detail.get("missed") else "")
            lines.append(
                f"| {label} | {tool} | {wall} | {_num(run.turns)} | "
                f"{_num(run.commands)} | {_num(run.bytes_read)} | {_mb(run.peak_rss_kb)} | "
                + " | ".join(ratios)
                + " |"
            )
    return "\n".join(lines)


def running_table(results: list[Measurement]) -> str:
    lines = [
        "| running agent | wall | IMAP command time | server-link time | rest (agent CPU, "
        "SQLite) | adapter round_trips | adapter bytes_read | summary |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in results:
        if m.tool not in (RUNNING, RUNNING_NOOP):
            continue
        r = m.median()
        d = r.detail
        rest = r.wall - d["imap_s"] - d["link_s"]
        summary = " ".join(f"{k}={v}" for k, v in d["summary"].items())
        if d.get("reconnected"):
            summary += " (reconnected)"
        if d.get("missed"):
            summary += " **missed the change**"
        scenario = m.scenario + (", NOOP first" if m.tool == RUNNING_NOOP else "")
        lines.append(
            f"| {scenario} | {_ms(r.wall)} | {_ms(d['imap_s'])} | {_ms(d['link_s'])} | "
            f"{_ms(rest)} | {d['adapter_cmds']} | {d['adapter_bytes']:,} | {summary} |"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        return "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="minutes"),
        "cpus": f"{os.cpu_count()} × {cpu}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "dovecot": version(["dovecot", "--version"]),
        "mbsync": version(["mbsync", "--version"]),
    }


def startup_cost() -> float:
    """Wall time of a Python process that only imports the agent's modules."""
    code = "import imapsync_bridge.cli, imapsync_bridge.agent.runner"
    walls = [run_measured([sys.executable, "-c", code], python_env())[1] for _ in range(3)]
    return statistics.median(walls)


def report_text(bench: Bench, seed_seconds: float, startup: float) -> str:
    info = machine_info()
    args = bench.args
    head = [
        f"- date: {info['date']}",
        f"- machine: {info['cpus']}; {info['os']}",
        f"- Python {info['python']}; Dovecot {info['dovecot']}; {info['mbsync']}",
        f"- N = {args.messages:,} messages (2–5 KB each, all read except the newest "
        f"{UNREAD_NEWEST}), window W = {args.window}; seeding + indexing took "
        f"{seed_seconds:.1f} s (not timed below)",
        f"- Python start-up + imports of the agent (`python -c 'import …'`): "
        f"{_ms(startup)}, included in every one-shot figure",
        f"- running agent: connect (IMAP login + TLS to the server) took "
        f"{_ms(bench.running.ready['connect_s'])} once, not in the figures",
    ]
    if bench.profile_dir:
        head.append("- **profiled run**: timings include cProfile overhead")
    return (
        "\n".join(head)
        + "\n\n"
        + results_table(bench.results)
        + "\n\nRunning agent, where one session's time goes (median run):\n\n"
        + running_table(bench.results)
        + "\n"
    )


def write_docs(path: Path, body: str, args: argparse.Namespace) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        if DOCS_MARKER in text:
            kept = text[text.index(DOCS_MARKER) :]
    method = f"""# Benchmark: the bridge and mbsync on one {args.messages:,}-message inbox

Generated by `make bench` (`bench/bench.py`, see `bench/README.md`); rerun to refresh.
Every tool talks to the same throwaway Dovecot on loopback through its own counting TCP
proxy: *IMAP turns* = times the client spoke again after the server had spoken (network
round trips, pipelining counted once), *commands* = IMAP commands sent, *bytes read* =
bytes from the server. *Wall* and *peak RSS* are the whole process for the one-shot
`agent sync` and mbsync (RSS from GNU time's `%M`); for the running agent (a worker
process, `bench.py --worker`), wall is one `SyncSession.run()` with IMAP and server
connections already open and RSS is that process's peak so far (`VmHWM`). Medians of
the repeated runs are shown. Change scenarios wait {DIRTY_SYNC_PAUSE:.0f} s after the change
(stock Dovecot re-scans `cur/` on every SELECT for ~1.5 s after a change) and are run by
all three tools in turn, each with its own state (two phone users on one IMAP inbox,
mbsync with `MaxMessages {args.window}`, `ExpireUnread yes`, `Sync All`).

## Results

"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(method + body + ("\n" + kept if kept else ""))
    log(f"wrote {path}")


def print_profiles(profile_dir: Path) -> None:
    for prof in sorted(profile_dir.glob("*.prof")):
        out = io.StringIO()
        stats = pstats.Stats(str(prof), stream=out)
        stats.sort_stats("cumulative").print_stats(25)
        print(f"\n==== {prof.name} ====\n{out.getvalue()}")


# -- main ------------------------------------------------------------------------------
@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP run the clean-up too (as Ctrl-C does)."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_bench(args: argparse.Namespace) -> int:
    if shutil.which("mbsync") is None:
        sys.exit("mbsync not found: `make bench` installs the Debian package isync")
    from dovecot import Dovecot

    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_exit())
        root = Path(tempfile.mkdtemp(prefix="bench-"))
        stack.callback(shutil.rmtree, root, True)
        global PYCACHE
        PYCACHE = root / "pycache"
        startup_cost()  # writes the bytecode cache
        log(f"starting Dovecot; work directory {root}")
        dovecot = Dovecot().start()
        stack.callback(dovecot.stop)
        user = dovecot.new_user()
        seed_seconds = seed_inbox(dovecot, user, args.messages)
        proxies = {name: CountingProxy(dovecot.port) for name in ("oneshot", "running", "mbsync")}
        for proxy in proxies.values():
            stack.callback(proxy.close)
        log("starting the hosted server and pairing two agents")
        product = start_product(
            root, user, dovecot.password, args.window,
            {name: p.port for name, p in proxies.items()},
        )  # fmt: skip
        stack.callback(stop_process, product.server)
        profile_dir = Path(args.profile).resolve() if args.profile else None
        if profile_dir:
            profile_dir.mkdir(parents=True, exist_ok=True)
        running = RunningAgent(product.running_ini, proxies["running"], profile_dir)
        stack.callback(running.close)
        mbsync_cfg = write_mbsync_config(
            root / "mbsync", proxies["mbsync"].port, user, dovecot.password, args.window
        )
        bench = Bench(args, dovecot, user, product, proxies, running, mbsync_cfg, profile_dir)
        bench.count = args.messages
        bench.unread = list(range(args.messages - UNREAD_NEWEST + 1, args.messages + 1))
        bench.first_sync()
        bench.no_change()
        bench.one_flag()
        bench.one_new()
        startup = startup_cost()
        body = report_text(bench, seed_seconds, startup)
        print(body)
        if args.docs:
            write_docs(REPO / args.docs, body, args)
        if profile_dir:
            print_profiles(profile_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50000, help="inbox size (50000)")
    parser.add_argument("--window", type=int, default=50, help="phone window (50)")
    parser.add_argument("--quick", action="store_true", help="2000 messages, no docs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per change scenario (3)")
    parser.add_argument("--docs", help="results file (default docs/benchmark.md, not --quick)")
    parser.add_argument("--profile", metavar="DIR", help="cProfile every bridge sync into DIR")
    parser.add_argument("--worker", metavar="INI", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(Path(args.worker), Path(args.profile) if args.profile else None)
    if args.quick:
        args.messages = 2000
    elif args.docs is None and not args.profile:
        args.docs = "docs/benchmark.md"
    if args.repeat < 1 or args.window < 1 or args.messages < args.window + 3 * args.repeat:
        parser.error("need --repeat >= 1 and more messages than the window")
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
