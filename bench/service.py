"""Step 4b: the running service, ``agent run`` (IMAP IDLE on, the push link up).

After the one-shot scenarios of a profile, on the same inbox, with two more agents
that were paired at the start (their own phone users) and had not run yet:

- ``service`` (window W) runs as ``imapsync-bridge agent run`` with ``idle = true`` and
  ``sync_interval = 3600``, so only IDLE and the push link start its sessions:

  1. an idle stretch (60 s on the first profile): CPU seconds (utime + stime of the
     process, all threads, from ``/proc/PID/stat``) and peak RSS (``VmHWM``);
  2. desktop → phone: one ``\\Seen`` set and one mail APPENDed through another IMAP
     connection; from the command's tagged OK until the phone store (its SQLite, read
     only, every 2 ms) shows it. Then once more of each with an observer connection
     IDLEing beside the agent's watcher: when Dovecot tells an IDLE client (that run's
     latency is not kept: the observer's Dovecot process re-scans the Maildir at the
     notice too, beside the agent's);
  3. phone → desktop: a phone "flag" committed through the store API in this process;
     from the commit until Dovecot renamed the message's Maildir file (the flag is in
     the name; Dovecot renames it inside the agent's STORE, before its tagged OK, so it
     is what any desktop client sees next), polled every 1 ms;

- the running-agent worker (``worker.py``) runs (4) sessions with
  ``phone_vouched=True``, as ``agent run`` passes it to a timer's
  session while its push link is up and quiet, each beside one ``STATUS`` round trip
  on the same IMAP connection;
- ``bulk`` (window 1,000) runs as a second worker whose link to the hosted server goes
  through a delaying proxy (50 ms each way): its first sync pulls 1,000 messages, then
  (5) 1,000 phone actions (each message's read state flipped, twice) are applied to
  the desktop in one session: round trips of the sync link (turns through that proxy) and wall time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import AgentSpec, Product, RunningAgent, point_at_server
from measuring import CountingProxy, Run, log, proc_cpu_seconds, proc_memory_kb
from peers import mbsync_sync
from processes import python_env, stop_process
from seeding import mail_date, make_mail

SERVICE, BULK = "service", "bulk"
SERVICE_AGENTS = (SERVICE, BULK)  # the agents (phone users) this step adds
SERVICE_OPTIONS = "idle = true\nsync_on_change = true\nsync_interval = 3600\n"
BULK_WINDOW = 1000  # phone messages, so that 1,000 phone actions are real ones
LINK_DELAY = 0.050  # seconds each way on the bulk agent's link: +100 ms round trip
PHONE_POLL = 0.002  # seconds between looks at the phone store
FILE_POLL = 0.001  # seconds between looks at the Maildir file
SEEN_WITHIN = 10.0  # a change not visible by then counts as missed
SETTLE = 2.0  # quiet seconds (no session, Dovecot's dirty re-scan over) between changes
BULK_RUNS = 2  # mark 1,000 unread, then 1,000 read again

# agent run's log (cli.py: "%(asctime)s %(levelname)s %(name)s: %(message)s")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_SESSION_LINE = re.compile(r"^sync \(([^)]*)\): .* in (\d+\.\d+) s$")
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE)
_SEEDED = re.compile(r"^<bench\.(\d+)\.")  # a seeded message's Message-ID
_SEEDED_FILE = re.compile(r"\.M(\d+)P\d+\.bench,")  # and its Maildir file (seeding.py)


def service_agents(window: int, ports: dict[str, int]) -> dict[str, AgentSpec]:
    """The two agents this step needs, paired with the others at the start."""
    return {
        SERVICE: AgentSpec(ports[SERVICE], window, SERVICE_OPTIONS),
        BULK: AgentSpec(ports[BULK], BULK_WINDOW),
    }


@dataclass
class ServiceResults:
    """What this step measured on one profile (seconds; None: not seen in time)."""

    latency: dict[str, list[float | None]] = field(default_factory=dict)
    idle_notice: dict[str, list[float | None]] = field(default_factory=dict)
    nochange: list[Run] = field(default_factory=list)
    status: list[Run] = field(default_factory=list)
    bulk: list[Run] = field(default_factory=list)
    bulk_first: Run | None = None
    idle: dict[str, float] = field(default_factory=dict)
    #: per latency measurement, from agent run's log: the first session's own seconds
    #: (its "sync (…) in X s" line, 10 ms resolution) and, for phone changes, seconds
    #: from the commit to its "server: changed" line
    sessions: dict[str, list[float]] = field(default_factory=dict)
    push_notice: dict[str, list[float]] = field(default_factory=dict)
    #: mbsync run right after the same kind of change: from the change to its exit
    mbsync: dict[str, list[float]] = field(default_factory=dict)
    #: one phone flag applied by the running-agent worker right after it was made
    phone_worker: list[Run] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole step


class ServiceProcess:
    """``imapsync-bridge agent run`` as a child process, watched from outside."""

    def __init__(self, ini: Path) -> None:
        self.state_dir = ini.parent / "state"
        self.log_path = ini.parent / "agent-run.log"
        self._read = 0  # bytes of the log already looked at (events)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imapsync_bridge.cli", "agent", "run", "--config",
                 str(ini)],
                env=python_env(), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def shown(self) -> dict[str, Any]:
        """What the service writes for `agent status` (agent-run.json)."""
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.state_dir / "agent-run.json").read_text()))
        return {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the first session completed, the push link is up and IDLE runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent run exited ({self.proc.returncode}):\n{self.tail()}")
            shown = self.shown()
            connections = shown.get("connections") or {}
            push = connections.get("push") or {}
            idle = connections.get("imap_idle") or {}
            if (
                shown.get("syncs", 0) >= 1
                and push.get("state") == "connected"
                and idle.get("state") == "idle"
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"agent run not ready within {timeout:.0f} s:\n{self.tail()}")

    def settle(self, quiet: float = SETTLE, timeout: float = 30.0) -> None:
        """Until no session ran for *quiet* seconds."""
        deadline = time.monotonic() + timeout
        syncs, since = self.shown().get("syncs"), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.1)
            now = self.shown().get("syncs")
            if now != syncs:
                syncs, since = now, time.monotonic()

    def events(self) -> list[tuple[float, str]]:
        """The log lines written since the last call: (epoch seconds, message)."""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self._read)
            text = log_file.read()
        self._read += len(text)
        found = []
        for line in text.decode("utf-8", "replace").splitlines():
            if m := _LOG_LINE.match(line):
                stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found.append((stamp.timestamp(), m.group(2)))
        return found

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return ""

    def close(self) -> None:
        stop_process(self.proc)


class PhoneView:
    """The hosted store's SQLite, read only: one user's message by key."""

    def __init__(self, database: Path, user: str) -> None:
        self.user = user
        self.conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None)

    def row(self, key: str) -> tuple[str, int, int] | None:
        return self.conn.execute(
            "SELECT folder, seen, flagged FROM messages WHERE user_name = ? AND msg_key = ?",
            (self.user, key),
        ).fetchone()

    def close(self) -> None:
        self.conn.close()


def wait_until(check: Callable[[], bool], since: float, poll: float) -> float | None:
    """Seconds from *since* (a perf_counter) until *check()* held, or None."""
    while not check():
        if time.perf_counter() - since > SEEN_WITHIN:
            return None
        time.sleep(poll)
    return time.perf_counter() - since


class IdleObserver:
    """A second IMAP client IDLEing on the inbox: when Dovecot tells it of a change."""

    def __init__(self, dovecot: Any, user: str) -> None:
        self.client = dovecot.client(user)
        self.client.select_folder("INBOX")

    @contextlib.contextmanager
    def watching(self, kind: bytes) -> Iterator[tuple[Callable[[], None], list[float | None]]]:
        """IDLE around the block, read in a thread of its own; the block calls the
        yielded ``started()`` right after its change's tagged OK; the seconds from then
        until an untagged *kind* (``FETCH``, ``EXISTS``) came are in the yielded list
        at the end (None if none came within SEEN_WITHIN)."""
        self.client.idle()
        start: list[float] = []
        seen: list[float] = []
        result: list[float | None] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set() and not seen:
                responses = self.client.idle_check(timeout=0.2)
                if any(len(r) > 1 and r[1] == kind for r in responses):
                    seen.append(time.perf_counter())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield (lambda: start.append(time.perf_counter())), result
            reader.join(SEEN_WITHIN)
        finally:
            done.set()
            reader.join(1.0)
            self.client.idle_done()
        result.append(seen[0] - start[0] if seen and start else None)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.logout()


@contextlib.contextmanager
def _watching(
    observer: IdleObserver | None, kind: bytes, notices: dict[str, list[float | None]], name: str
) -> Iterator[Callable[[], None]]:
    """:meth:`IdleObserver.watching` when there is an observer (its result appended to
    ``notices[name]``), else nothing; yields ``started()``."""
    if observer is None:
        yield lambda: None
        return
    with observer.watching(kind) as (started, result):
        yield started
    notices.setdefault(name, []).extend(result)


def _shown(seconds: float | None) -> str:
    return "not seen" if seconds is None else f"{seconds * 1000:7.1f} ms"


class ServiceBench:
    """Step 4b on one profile's inbox (see the module docstring)."""

    def __init__(self, bench: Any, idle_seconds: float) -> None:
        self.bench = bench
        self.product: Product = bench.product
        self.idle_seconds = idle_seconds
        self.results = ServiceResults()
        self.rng = random.Random(11)

    def run(self, stack: contextlib.ExitStack) -> ServiceResults:
        started = time.perf_counter()
        log(f"the running service (agent run, IDLE on, push link up) on {self.bench.server.name}")
        service = ServiceProcess(self.product.inis[SERVICE])
        stack.callback(service.close)
        service.wait_ready()
        service.settle()
        service.events()  # its first sessions are not part of any measurement
        if self.idle_seconds:
            self.idle_stretch(service)
        phone = PhoneView(self.product.database, SERVICE)
        stack.callback(phone.close)
        for _ in range(self.bench.args.repeat):  # ours and mbsync's best case alternate
            self.desktop_flag(service, phone)
            self.desktop_new(service, phone)
            self.phone_flag(service)
            self.mbsync_right_after(service)
        # Dovecot's IDLE notice, once more of each change with an observer IDLEing
        # (not above: its own Maildir re-scan at the notice would compete with the agent's)
        observer = IdleObserver(self.bench.dovecot, self.bench.user)
        stack.callback(observer.close)
        self.desktop_flag(service, phone, observer)
        self.desktop_new(service, phone, observer)
        service.close()
        self.nochange_vouched()
        self.bulk(stack)
        self.results.seconds = time.perf_counter() - started
        log(f"  the running service took {self.results.seconds:.1f} s")
        return self.results

    def _record(
        self,
        what: str,
        seconds: float | None,
        service: ServiceProcess,
        keep: bool = True,
        changed_at: float | None = None,
    ) -> None:
        """One latency (unless not *keep*); then, once the service is quiet, its
        sessions from its log (and, given the change's epoch time *changed_at*, when the
        push reached it)."""
        service.settle()
        if not keep:
            service.events()
            log(f"  {what:<28} {_shown(seconds)} with an observer IDLEing (not kept)")
            return
        self.results.latency.setdefault(what, []).append(seconds)
        events = service.events()
        lines = [m for _, text in events if (m := _SESSION_LINE.match(text))]
        sessions = [(m.group(1), float(m.group(2))) for m in lines]
        if sessions:  # the first one brought the change across
            self.results.sessions.setdefault(what, []).append(sessions[0][1])
        pushed = [at for at, text in events if text.startswith("server: changed")]
        if changed_at is not None and pushed:
            self.results.push_notice.setdefault(what, []).append(pushed[0] - changed_at)
        extra = ""
        if changed_at is not None and pushed:
            extra += f"; push at the agent after {(pushed[0] - changed_at) * 1000:.0f} ms"
        ran = ", ".join(f"{why} {took * 1000:.0f} ms" for why, took in sessions)
        log(f"  {what:<28} {_shown(seconds)} (sessions: {ran or 'none logged'}{extra})")

    # -- 1. idle ---------------------------------------------------------------------
    def idle_stretch(self, service: ServiceProcess) -> None:
        pid = service.proc.pid
        log(f"  idle for {self.idle_seconds:.0f} s ...")
        traffic = self.bench.proxies[SERVICE].counts()
        syncs, cpu = service.shown().get("syncs", 0), proc_cpu_seconds(pid)
        time.sleep(self.idle_seconds)
        cpu = proc_cpu_seconds(pid) - cpu
        memory = proc_memory_kb(pid)
        turns = self.bench.proxies[SERVICE].counts().minus(traffic).turns
        self.results.idle = {
            "seconds": self.idle_seconds,
            "cpu_s": cpu,
            "hwm_kb": memory["VmHWM"],
            "rss_kb": memory["VmRSS"],
            "sessions": service.shown().get("syncs", 0) - syncs,
            "imap_turns": turns,
        }
        log(f"  idle {self.idle_seconds:.0f} s: {cpu:.3f} CPU s, peak RSS "
            f"{memory['VmHWM'] / 1024:.1f} MB, {turns} IMAP turns")  # fmt: skip

    # -- 2. desktop -> phone -----------------------------------------------------------
    def desktop_flag(
        self, service: ServiceProcess, phone: PhoneView, observer: IdleObserver | None = None
    ) -> None:
        """One ``\\Seen`` set on the desktop; with *observer*, only Dovecot's IDLE
        notice of it is recorded, not the latency."""
        uid = self.bench.unread.pop()  # the newest unread message: inside the window
        with self.bench.dovecot.client(self.bench.user) as client:
            client.select_folder("INBOX")
            header = client.fetch([uid], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            key = _message_id(next(v for v in header[uid].values() if isinstance(v, bytes)))
            with _watching(observer, b"FETCH", self.results.idle_notice, "flag") as started:
                client.add_flags([uid], [b"\\Seen"], silent=True)
                started()
                since = time.perf_counter()
                seconds = wait_until(lambda: (phone.row(key) or ("", 0, 0))[1] == 1,
                                     since, PHONE_POLL)  # fmt: skip
        self._record("desktop \\Seen → phone", seconds, service, observer is None)

    def desktop_new(
        self, service: ServiceProcess, phone: PhoneView, observer: IdleObserver | None = None
    ) -> None:
        """One mail APPENDed; *observer* as for :meth:`desktop_flag`."""
        self.bench.count += 1
        date = mail_date(self.bench.count)
        raw = make_mail(self.bench.count, date, self.rng)
        key = _message_id(raw)
        with (
            self.bench.dovecot.client(self.bench.user) as client,
            _watching(observer, b"EXISTS", self.results.idle_notice, "new") as started,
        ):
            client.append("INBOX", raw, msg_time=date)
            started()
            since = time.perf_counter()
            seconds = wait_until(lambda: phone.row(key) is not None, since, PHONE_POLL)
        self._record("desktop new mail → phone", seconds, service, observer is None)

    # -- 3. phone -> desktop -----------------------------------------------------------
    def phone_flag(self, service: ServiceProcess) -> None:
        from imapsync_bridge.server.store import PhoneStore

        store = PhoneStore(self.product.database)
        try:
            message, old = self._seeded_unflagged(store)
            store.set_flagged(SERVICE, message.id, True)
            since, changed_at = time.perf_counter(), time.time()
            seconds = wait_until(lambda: not old.exists(), since, FILE_POLL)
        finally:
            store.close()
        renamed = list(old.parent.glob(old.name.split(":2,")[0] + ":2,*"))
        if seconds is not None and not any("F" in p.name.split(":2,")[1] for p in renamed):
            raise RuntimeError(f"{old.name} was renamed, but not flagged: {renamed}")
        self._record("phone flag → desktop", seconds, service, changed_at=changed_at)

    def _seeded_unflagged(self, store: Any) -> tuple[Any, Path]:
        """A phone message of the seeded inbox not yet flagged, and its Maildir file."""
        cur = self.bench.dovecot.maildir(self.bench.user) / "cur"
        files = {}
        for name in os.listdir(cur):
            if (n := _SEEDED_FILE.search(name)) and "F" not in name.split(":2,")[1]:
                files[int(n.group(1))] = name
        for message in store.list_folder(SERVICE, "inbox"):
            seeded = _SEEDED.match(message.message_id or "")
            if seeded and not message.flagged and int(seeded.group(1)) in files:
                return message, cur / files[int(seeded.group(1))]
        raise RuntimeError("no unflagged seeded message on the phone")

    def mbsync_right_after(self, service: ServiceProcess) -> None:
        """mbsync's best case beside (2) and (3): a timer firing right after the change
        (Dovecot's re-scan of a just-changed Maildir included, as the agent pays it)."""
        bench = self.bench

        def run(what: str, change: Callable[[], None]) -> None:
            change()
            started = time.perf_counter()
            mbsync_sync(bench.mbsync_cfg, bench.proxies["mbsync"])
            seconds = time.perf_counter() - started
            self.results.mbsync.setdefault(what, []).append(seconds)
            log(f"  mbsync right after: {what:<24} {seconds * 1000:7.1f} ms")
            service.settle()
            service.events()  # the agent's sessions for mbsync's changes are no figure

        def flag() -> None:
            with bench.dovecot.client(bench.user) as client:
                client.select_folder("INBOX")
                client.add_flags([bench.unread.pop()], [b"\\Seen"], silent=True)

        def new_mail() -> None:
            bench.count += 1
            date = mail_date(bench.count)
            bench.dovecot.append(bench.user, make_mail(bench.count, date, self.rng), date)

        def near_flag() -> None:  # a flag set in mbsync's own Maildir (its "phone")
            cur = bench.mbsync_cfg.parent / "maildir" / "INBOX" / "cur"
            name = next(n for n in sorted(os.listdir(cur)) if not re.search(":2,.*[FT]", n))
            base, _, flags = name.partition(":2,")
            os.rename(cur / name, cur / f"{base}:2,{''.join(sorted(flags + 'F'))}")

        run("desktop \\Seen → phone", flag)
        run("desktop new mail → phone", new_mail)
        run("phone flag → desktop", near_flag)

    # -- 4. no change, push link up ------------------------------------------------------
    def nochange_vouched(self) -> None:
        """(4), after the same worker applied one phone flag per repeat right after it
        was made (where such a session's time goes: IMAP, server link, the rest)."""
        from imapsync_bridge.server.store import PhoneStore

        running: RunningAgent = self.bench.running
        store = PhoneStore(self.product.database)
        try:
            for r in range(self.bench.args.repeat):
                time.sleep(SETTLE)
                message = next(m for m in store.list_folder("running", "inbox") if not m.flagged)
                store.set_flagged("running", message.id, True)
                run = running.sync(f"phoneflag{r}")
                self.results.phone_worker.append(run)
                log(f"  phone flag, one worker session: {run.wall * 1000:.1f} ms, IMAP "
                    f"{run.detail['imap_s'] * 1000:.1f} ms, {run.turns} IMAP turns")  # fmt: skip
        finally:
            store.close()
        time.sleep(SETTLE)
        running.sync("service-settle")  # takes in what the service scenarios changed
        for r in range(3 * self.bench.args.repeat):
            self.results.nochange.append(running.sync(f"vouched{r}", vouched=True))
            self.results.status.append(running.status_round_trip())
        median = sorted(run.wall for run in self.results.nochange)[len(self.results.nochange) // 2]
        floor = sorted(run.wall for run in self.results.status)[len(self.results.status) // 2]
        log(f"  no-change session, push link up: {median * 1000:.2f} ms; one STATUS "
            f"{floor * 1000:.2f} ms")  # fmt: skip

    # -- 5. 1,000 phone actions over a slow link ---------------------------------------------
    def bulk(self, stack: contextlib.ExitStack) -> None:
        from imapsync_bridge.server.store import PhoneStore

        delay = CountingProxy(self.product.sync_port, one_way_delay=LINK_DELAY)
        stack.callback(delay.close)
        ini = self.product.inis[BULK]
        point_at_server(ini, delay.port)
        worker = RunningAgent(ini, self.bench.proxies[BULK], None)
        stack.callback(worker.close)
        self.results.bulk_first = self._link_session(worker, delay, "bulk-first")
        store = PhoneStore(self.product.database)
        try:
            for r in range(BULK_RUNS):
                # each message's read state flipped: BULK_WINDOW real phone actions
                messages = store.list_folder(BULK, "inbox")[:BULK_WINDOW]
                if len(messages) < BULK_WINDOW:
                    raise RuntimeError(f"the bulk phone holds {len(messages)} messages")
                started = time.perf_counter()
                made = sum(store.set_seen(BULK, m.id, not m.seen) for m in messages)
                made_s = time.perf_counter() - started
                run = self._link_session(worker, delay, f"bulk{r}")
                run.detail |= {"actions": made, "actions_s": made_s}
                self.results.bulk.append(run)
        finally:
            store.close()

    def _link_session(self, worker: RunningAgent, delay: CountingProxy, label: str) -> Run:
        before = delay.counts()
        run = worker.sync(label)
        link = delay.counts().minus(before)
        run.detail["link_turns"], run.detail["link_bytes"] = link.turns, link.bytes_read
        log(f"  {label:<10} over +{2 * LINK_DELAY * 1000:.0f} ms RTT: {run.wall * 1000:.1f} ms, "
            f"{link.turns} link round trips, {run.turns} IMAP turns "
            f"({run.detail['summary']})")  # fmt: skip
        return run


def _message_id(raw: bytes) -> str:
    found = _MESSAGE_ID.search(raw.replace(b"\r\n", b"\n"))
    if found is None:
        raise RuntimeError(f"no Message-ID in {raw[:200]!r}")
    return found.group(1).decode()
