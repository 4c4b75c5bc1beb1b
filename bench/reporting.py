"""Step 5: the tables (stdout and docs/benchmark.md) and the machine facts beside them."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from measuring import Measurement, log, run_measured
from processes import REPO, python_env
from scenarios import DIRTY_SYNC_PAUSE, RUNNING, RUNNING_NOOP, SCENARIOS, TOOLS, Bench
from seeding import UNREAD_NEWEST
from service import BULK_WINDOW, LINK_DELAY, ServiceResults

DOCS_MARKER = "<!-- bench.py keeps everything below this line -->"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def _ms(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _num(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MB"


def _span(values: list[float]) -> str:
    """Min–max of several runs' seconds, in ms like the median printed beside it."""
    low, high = min(values) * 1000, max(values) * 1000
    digits = 2 if high < 10 else (1 if high < 1000 else 0)
    return f"{low:.{digits}f}–{high:.{digits}f}"


def _spread(values: list[float]) -> str:
    """The min–max in brackets after a median of several runs; nothing after one run."""
    return f" ({_span(values)})" if len(values) > 1 else ""


def results_table(results: list[Measurement]) -> str:
    by = {(m.scenario, m.tool): m.median() for m in results}
    runs = {(m.scenario, m.tool): len(m.runs) for m in results}
    walls = {(m.scenario, m.tool): m.walls() for m in results}
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
            wall = _ms(run.wall) + _spread(walls[(scenario, tool)])
            wall += " **missed the change**" if run.detail.get("missed") else ""
            lines.append(
                f"| {label} | {tool} | {wall} | {_num(run.turns)} | "
                f"{_num(run.commands)} | {_num(run.bytes_read)} | {_mb(run.peak_rss_kb)} | "
                + " | ".join(ratios)
                + " |"
            )
    return "\n".join(lines)


def running_rows(results: list[Measurement], prefix: str = "") -> list[tuple[str, Measurement]]:
    """The running agent's measurements, labelled by scenario (after *prefix*)."""
    return [
        (prefix + m.scenario + (", NOOP first" if m.tool == RUNNING_NOOP else ""), m)
        for m in results
        if m.tool in (RUNNING, RUNNING_NOOP)
    ]


def running_table(rows: list[tuple[str, Measurement]]) -> str:
    lines = [
        "| running agent | wall | IMAP command time | server-link time | rest (agent CPU, "
        "SQLite) | adapter round_trips | adapter bytes_read | summary |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for scenario, m in rows:
        r = m.median()
        d = r.detail
        rest = r.wall - d["imap_s"] - d["link_s"]
        summary = " ".join(f"{k}={v}" for k, v in d["summary"].items())
        if d.get("reconnected"):
            summary += " (reconnected)"
        if d.get("missed"):
            summary += " **missed the change**"
        lines.append(
            f"| {scenario} | {_ms(r.wall)} | {_ms(d['imap_s'])} | {_ms(d['link_s'])} | "
            f"{_ms(rest)} | {d['adapter_cmds']} | {d['adapter_bytes']:,} | {summary} |"
        )
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def _latency(values: list[float | None]) -> tuple[str, float | None]:
    """A latency cell (median of the runs that saw the change) and that median."""
    seen = [v for v in values if v is not None]
    if not seen:
        return f"**not seen within 10 s** ({len(values)} of {len(values)})", None
    text = _ms(_median(seen)) + (
        f" (median of {len(seen)}, min–max {_span(seen)})" if len(seen) > 1 else ""
    )
    if len(seen) < len(values):
        text += f", **{len(values) - len(seen)} of {len(values)} not seen within 10 s**"
    return text, _median(seen)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


SERVICE_METHOD = f"""`imapsync-bridge agent run` as a child process (`idle = true`,
`sync_on_change = true`, `sync_interval = 3600`, so only IMAP IDLE and the push link start
its sessions), its own phone user (window W) on the same inbox, after the scenarios above,
measured from outside:

- **desktop → phone**: one `\\Seen` set (`STORE … +FLAGS.SILENT`) and one mail APPENDed
  through another IMAP connection; from that command's tagged OK until the phone store
  (the hosted server's SQLite, opened read-only, looked at every 2 ms) shows it.
  Detection included. *Dovecot's IDLE notice* is when a second observer connection,
  IDLEing beside the agent's watcher, was told of one more such change (measured apart:
  at the notice its own Dovecot process re-scans the Maildir too): Dovecot waits 500 ms
  after a change before it tells IDLE clients (`NOTIFY_DELAY_MSECS` in its
  `index-mailbox-check.c`, not configurable), so that is the floor of any IDLE client;
- **phone → desktop**: a phone "flag" committed through the store API (`PhoneStore`, as
  the `phone` CLI and the web page do) in the bench process; from the commit until
  Dovecot renamed the message's Maildir file (Maildir keeps the flags in the file name;
  Dovecot renames it inside the agent's `STORE`, before the tagged OK), looked at every
  1 ms. The server's change notifier polls SQLite's `data_version` every 50 ms;
- **1,000 phone actions over a slow link**: a third agent (window {BULK_WINDOW:,}) whose
  link to the hosted server goes through a delaying TCP proxy ({LINK_DELAY * 1000:.0f} ms
  each way: +{2 * LINK_DELAY * 1000:.0f} ms round trip, `bench/measuring.py`), run as a
  worker (`SyncSession.run()` on an open link, as `agent run` does); its phone flips the
  read state of 1,000 messages, then one session applies them to the desktop: *link
  round trips* = the client speaking again after the server spoke, counted by that proxy;
- **no-change session, push link up**: the running-agent worker runs `SyncSession.run()`
  with `phone_vouched=True` (what `agent run` passes to a timer's session
  while its push link is up and quiet), each beside one `STATUS` of the Trash on the
  same IMAP connection and proxy;
- **idle**: after its first session, the process's CPU time (utime + stime of all
  threads, `/proc/PID/stat`) over the idle stretch and its peak RSS (`VmHWM`) at its
  end, with IDLE on and the push link up.

mbsync has no push and no resident process: beside the push latencies stands its best
case, a timer firing right after the change: the same kind of change (a `\\Seen` or an
APPEND on the IMAP side; for phone → desktop a flag set in mbsync's own Maildir, its
"phone"), mbsync run at once, timed from the change to its exit; and its one-flag /
one-new-mail sync above, run 2 s after the change (Dovecot's re-scan of a just-changed
Maildir over). The ratio is against the run right after the change. Beside the no-change
session stands mbsync's no-change sync. The agent's sessions are also timed by its own
log lines (`sync (…): … in X s`, 10 ms resolution), and for phone changes the time until
its `server: changed` line."""


def service_table(bench: Bench) -> str:
    res: ServiceResults = bench.service
    mb = {m.scenario: m.median() for m in bench.results if m.tool == "mbsync"}
    lines = [
        "| measure | bridge `agent run` | target | | mbsync, best case | bridge/mbsync |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]

    def latency_row(what: str, key: str, mbsync: str, notice: str | None = None) -> None:
        totals = res.latency.get(key, [])
        text, value = _latency(totals)
        notices = [n for n in res.idle_notice.get(notice or "", []) if n is not None]
        if notices and value is not None:
            text += (
                f"; of which Dovecot's IDLE notice (to an observer, measured apart) "
                f"{_ms(_median(notices))}, the agent after it ≈ "
                f"{_ms(value - _median(notices))}"
            )
        if pushed := res.push_notice.get(key):
            text += f"; the push reached the agent after {_ms(_median(pushed))}"
        if sessions := res.sessions.get(key):
            text += f"; its session, by its log: {_ms(_median(sessions))}"
        right_after = res.mbsync.get(key)
        later = mb.get(mbsync)
        base = _median(right_after) if right_after else (later.wall if later else None)
        cells = []
        if right_after:
            cells.append(
                f"{_ms(_median(right_after))}{_spread(right_after)} run right after the "
                f"change (median of {len(right_after)})"
            )
        if later:
            cells.append(f"{_ms(later.wall)} 2 s later (its {mbsync} sync above)")
        met = "**missed**" if value is None else _met(value < 0.2)
        lines.append(
            f"| {what} | {text} | < 0.2 s | {met} | {'; '.join(cells) or 'n/a'} "
            f"| {_ratio(value, base)} |"
        )

    latency_row("desktop `\\Seen` → phone", "desktop \\Seen → phone", "one flag", "flag")
    latency_row("desktop new mail → phone", "desktop new mail → phone", "one new message", "new")
    latency_row("phone flag → desktop", "phone flag → desktop", "one flag")
    if res.phone_worker:
        run = sorted(res.phone_worker, key=lambda r: r.wall)[(len(res.phone_worker) - 1) // 2]
        d = run.detail
        lines.append(
            f"| … the same applied by one session of the running-agent worker (median of "
            f"{len(res.phone_worker)}) | {_ms(run.wall)}: IMAP command time "
            f"{_ms(d['imap_s'])}, server link {_ms(d['link_s'])}, rest "
            f"{_ms(run.wall - d['imap_s'] - d['link_s'])}; {_num(run.turns)} IMAP turns, "
            f"{_num(run.bytes_read)} bytes | | | | |"
        )
    if res.bulk:
        run = min(res.bulk, key=lambda r: r.detail["link_turns"])
        turns = max(r.detail["link_turns"] for r in res.bulk)
        walls = _median([r.wall for r in res.bulk])
        actions = ", ".join(str(r.detail["actions"]) for r in res.bulk)
        lines.append(
            f"| {BULK_WINDOW:,} phone actions → desktop over +{2 * LINK_DELAY * 1000:.0f} ms "
            f"RTT: sync-link round trips | {turns} (runs: "
            + ", ".join(str(r.detail["link_turns"]) for r in res.bulk)
            + f"; phone actions: {actions}) | ≤ 5 | {_met(turns <= 5)} | n/a | |"
        )
        lines.append(
            f"| … its wall time (median of {len(res.bulk)}) | {_ms(walls)}, "
            f"{_num(run.turns)} IMAP turns, {_num(run.detail['link_bytes'])} bytes from the "
            f"server | — | | n/a | |"
        )
    if res.nochange:
        wall = _median([r.wall for r in res.nochange])
        status = _median([r.wall for r in res.status])
        turns = _median([float(r.turns or 0) for r in res.nochange])
        imap_s = _median([r.detail["imap_s"] for r in res.nochange])
        link_s = _median([r.detail["link_s"] for r in res.nochange])
        base = mb.get("no change")
        lines.append(
            f"| no-change session, push link up (median of {len(res.nochange)}) | "
            f"{_ms(wall)} (IMAP command time {_ms(imap_s)}, server link {_ms(link_s)}, "
            f"rest {_ms(wall - imap_s - link_s)}), {turns:.0f} IMAP turns; "
            f"{wall / status:.2f}× one `STATUS` ({_ms(status)}) | ≤ 1.5× one `STATUS` "
            f"| {_met(wall <= 1.5 * status)} | {_ms(base.wall) if base else 'n/a'} (its "
            f"no-change sync) | {_ratio(wall, base.wall if base else None)} |"
        )
    if res.idle:
        idle = res.idle
        lines.append(
            f"| idle {idle['seconds']:.0f} s, IDLE on, push link up: CPU | "
            f"{idle['cpu_s']:.2f} s ({idle['sessions']:.0f} sessions, "
            f"{idle['imap_turns']:.0f} IMAP turns) | < 0.5 s | {_met(idle['cpu_s'] < 0.5)} "
            f"| n/a (no resident process) | |"
        )
        lines.append(
            f"| … its peak RSS | {_mb(int(idle['hwm_kb']))} (RSS now "
            f"{_mb(int(idle['rss_kb']))}) | ≤ 60 MB | {_met(idle['hwm_kb'] <= 60 * 1024)} | "
            f"n/a | |"
        )
    first = res.bulk_first
    if first is not None:
        lines.append(
            f"| (first sync of the {BULK_WINDOW:,}-message phone over that link) | "
            f"{_ms(first.wall)}, {first.detail['link_turns']} sync-link round trips | — | | | |"
        )
    return "\n".join(lines)


def service_section(benches: list[Bench]) -> str:
    parts = ["### The running service\n", SERVICE_METHOD, ""]
    for bench in benches:
        if bench.service is None:
            continue
        parts += [
            f"#### Profile `{bench.server.name}` (the whole step took "
            f"{bench.service.seconds:.0f} s)\n",
            service_table(bench),
            "",
        ]
    return "\n".join(parts)


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
        "commit": code_version(),
    }


def code_version() -> str:
    """The commit the product's code is at, and whether imapsync_bridge/ differs from it."""
    git = ["git", "-C", str(REPO)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run([*git, "status", "--porcelain", "--", "imapsync_bridge"],
                                 capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        return head + (" + uncommitted changes in imapsync_bridge/" if changed.strip() else "")
    return "unknown"


def startup_cost() -> dict[str, float]:
    """Median wall times (3 runs) of short processes: a bare interpreter, one that
    only imports the agent's modules, and ``imapsync-bridge --help``."""
    commands = {
        "python": [sys.executable, "-c", "pass"],
        "imports": [
            sys.executable,
            "-c",
            "import imapsync_bridge.cli, imapsync_bridge.agent.runner",
        ],
        "help": [sys.executable, "-m", "imapsync_bridge.cli", "--help"],
    }
    return {
        name: statistics.median(run_measured(argv, python_env())[1] for _ in range(3))
        for name, argv in commands.items()
    }


STARTUP_TARGET = 0.3  # issue 9: a no-change `agent sync` process, whole


def startup_line(benches: list[Bench], startup: dict[str, float]) -> str:
    """Issue 9's figures: the one-shot process's start-up and a no-change sync."""
    nochange = [
        (b.server.name, m.median().wall)
        for b in benches
        for m in b.results
        if m.scenario == "no change" and m.tool == "bridge one-shot"
    ]
    syncs = ", ".join(f"{name} {_ms(wall)}" for name, wall in nochange)
    met = _met(all(wall <= STARTUP_TARGET for _name, wall in nochange)) if nochange else ""
    return (
        f"- one-shot start-up (issue 9): a bare `python -c pass` {_ms(startup['python'])}; "
        f"`imapsync-bridge --help` {_ms(startup['help'])}; a whole no-change `agent sync` "
        f"process (median, the one-shot *no change* rows below): {syncs} — target "
        f"≤ {STARTUP_TARGET:.1f} s: {met}"
    )


def server_line(server: Any) -> str:
    """What a profile advertises and how it names its folders, for its heading."""
    caps = server.capability or "Dovecot's own (CONDSTORE, QRESYNC, ESORT, SPECIAL-USE, …)"
    folders = ", ".join(
        f"`{server.folder(name)}`" + (f" `{use}`" if use else "")
        for name, use in server.folders.items()
    )
    return (
        f'- advertised after login: {caps}; namespace `"{server.prefix}"`, separator '
        f"`{server.separator}`; folders {folders}"
    )


def profile_section(bench: Bench) -> str:
    head = [
        f"### Profile `{bench.server.name}`",
        "",
        server_line(bench.server),
        f"- seeding + indexing took {bench.seed_seconds:.1f} s (not timed below); running "
        f"agent: connect (IMAP login + TLS to the server) took "
        f"{_ms(bench.running.ready['connect_s'])} once, not in the figures",
    ]
    return (
        "\n".join(head)
        + "\n\n"
        + results_table(bench.results)
        + "\n\nRunning agent, where one session's time goes (median run):\n\n"
        + running_table(running_rows(bench.results))
        + "\n"
    )


def large_table(benches: list[Bench], large: list[Bench]) -> str:
    """First sync of every tool at both inbox sizes, side by side, per profile."""
    small_n, large_n = f"{benches[0].messages:,}", f"{large[0].messages:,}"
    lines = [
        f"| profile | tool | wall at {small_n} | wall at {large_n} | growth | IMAP turns "
        f"| bytes read | peak RSS | bridge/mbsync wall at {large_n} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    small_by = {b.server.name: b for b in benches}
    for big in large:
        small = small_by.get(big.server.name)
        if small is None:
            continue
        first = {
            b.messages: {m.tool: m.median() for m in b.results if m.scenario == "first sync"}
            for b in (small, big)
        }
        a_runs, b_runs = first[small.messages], first[big.messages]
        base = b_runs.get("mbsync")
        for tool in TOOLS:
            a, b = a_runs.get(tool), b_runs.get(tool)
            if a is None or b is None:
                continue
            vs_mbsync = "" if tool == "mbsync" or base is None else _ratio(b.wall, base.wall)
            lines.append(
                f"| {big.server.name} | {tool} | {_ms(a.wall)} | {_ms(b.wall)} | "
                f"{_ratio(b.wall, a.wall)} | {_num(a.turns)} → {_num(b.turns)} | "
                f"{_num(a.bytes_read)} → {_num(b.bytes_read)} | "
                f"{_mb(a.peak_rss_kb)} → {_mb(b.peak_rss_kb)} | {vs_mbsync} |"
            )
    return "\n".join(lines)


def report_text(
    benches: list[Bench], large: list[Bench], startup: dict[str, float], profiled: bool
) -> str:
    info = machine_info()
    args = benches[0].args
    head = [
        f"- date: {info['date']}",
        f"- machine: {info['cpus']}; {info['os']}",
        f"- Python {info['python']}; Dovecot {info['dovecot']}; {info['mbsync']}; "
        f"code at `{info['commit']}`",
        f"- N = {args.messages:,} messages (2–5 KB each, all read except the newest "
        f"{UNREAD_NEWEST}), window W = {args.window}; profiles: "
        + ", ".join(f"`{b.server.name}`" for b in benches),
        f"- Python start-up + imports of the agent (`python -c 'import …'`): "
        f"{_ms(startup['imports'])}, included in every one-shot figure",
        startup_line(benches, startup),
    ]
    if profiled:
        head.append("- **profiled run**: timings include cProfile overhead")
    parts = ["\n".join(head) + "\n", *(profile_section(b) for b in benches)]
    if any(b.service is not None for b in benches):
        parts.append(service_section(benches))
    if large:
        seeded = ", ".join(f"{b.server.name} {b.seed_seconds:.1f} s" for b in large)
        parts.append(
            f"### First sync at {large[0].messages:,} messages\n\n"
            f"Each profile again with a fresh Dovecot, inbox and agents, seeded with "
            f"{large[0].messages:,} messages (seeding + indexing: {seeded}); first sync "
            f"only, beside the first sync at {benches[0].messages:,} above (growth = wall "
            f"at {large[0].messages:,} / wall at {benches[0].messages:,}).\n\n"
            + large_table(benches, large)
            + "\n\nRunning agent, where the first sync's time goes at both sizes:\n\n"
            + running_table(
                [
                    row
                    for big in large
                    for b in (*(s for s in benches if s.server is big.server), big)
                    for row in running_rows(
                        [m for m in b.results if m.scenario == "first sync"],
                        f"{b.server.name}, {b.messages:,}: ",
                    )
                ]
            )
            + "\n"
        )
    return "\n".join(parts)


def write_docs(path: Path, body: str, args: argparse.Namespace) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        if DOCS_MARKER in text:
            kept = text[text.index(DOCS_MARKER) :]
    inbox = f"{args.messages:,}-message inbox"
    method = f"""# Benchmark: the bridge and mbsync on a {inbox}, per server profile

Generated by `make bench` (`bench/bench.py`, see `bench/README.md`); rerun to refresh.
Every tool talks to the same throwaway Dovecot on loopback through its own counting TCP
proxy: *IMAP turns* = times the client spoke again after the server had spoken (network
round trips, pipelining counted once), *commands* = IMAP commands sent, *bytes read* =
bytes from the server. *Wall* and *peak RSS* are the whole process for the one-shot
`agent sync` and mbsync (RSS from GNU time's `%M`); for the running agent (a worker
process, `bench.py --worker`), wall is one `SyncSession.run()` with IMAP and server
connections already open and RSS is that process's peak so far (`VmHWM`). Every
scenario at {args.messages:,} messages, the first sync included, is run {args.repeat} times
by every tool, the order turned round on every other run (bridge first, then mbsync
first); a wall cell shows the median run and, in brackets, the fastest and slowest; the
ratios are of the medians. Each extra first sync uses an agent paired for it and an
empty mbsync Maildir (the 200,000-message first syncs run once). Change scenarios wait
{DIRTY_SYNC_PAUSE:.0f} s after the change (stock Dovecot re-scans `cur/` on every SELECT
for ~1.5 s after a change) and are run by all three tools in turn, each with its own
state (two phone users on one IMAP inbox, mbsync with `MaxMessages {args.window}`,
`ExpireUnread yes`, `Sync All`).

Each server profile (`tests/dovecot.py` `Profile`, see `docs/compat.md`) runs on its own
Dovecot with its own freshly seeded inbox, one profile after the other; mbsync runs
against the same profile (it syncs only INBOX: `Patterns INBOX`, the profile's namespace
prefix and separator in its far store). `full` is stock Dovecot (CONDSTORE, ESORT,
SPECIAL-USE); `exchange-like` advertises what Microsoft Exchange's IMAP service offers
(no CONDSTORE, SORT or SPECIAL-USE) and names its folders `Deleted Items`/`Sent Items`.

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
