"""Step 4: the scenarios (first sync, no change, one flag, one new message), each run by
every tool in turn: the one-shot agent, the running agent, mbsync.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import Product, RunningAgent, oneshot_sync
from measuring import CountingProxy, Measurement, Run, log
from peers import count_maildir, mbsync_sync, write_mbsync_config
from seeding import UNREAD_NEWEST, mail_date, make_mail

DIRTY_SYNC_PAUSE = 2.0  # stock Dovecot re-scans cur/ on every SELECT for ~1.5 s after a change
SCENARIOS = ["first sync", "no change", "one flag", "one new message"]
CHANGES = SCENARIOS[2:]
RUNNING = "bridge running agent"
RUNNING_NOOP = "bridge running agent, NOOP first"
TOOLS = ["bridge one-shot", RUNNING, RUNNING_NOOP, "mbsync"]


def fresh_agents(runs: int) -> list[str]:
    """Agents (phone users) paired only for first syncs 2..*runs*: each first sync needs
    an agent, a phone and an mbsync Maildir that never synced."""
    return [f"{tool}-first{r}" for r in range(1, runs) for tool in ("oneshot", "running")]


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
    messages: int  # the seeded inbox size (count grows with the new-message scenario)
    seed_seconds: float
    results: list[Measurement] = field(default_factory=list)
    count: int = 0
    unread: list[int] = field(default_factory=list)
    service: Any = None  # service.ServiceResults of the running-service step, if it ran

    def __post_init__(self) -> None:
        self.count = self.messages
        self.unread = list(range(self.messages - UNREAD_NEWEST + 1, self.messages + 1))

    @property
    def server(self) -> Any:
        """The tests/dovecot.py ``Profile`` this Dovecot plays."""
        return self.dovecot.profile

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

    def all_tools(
        self,
        scenario: str,
        label: str,
        mbsync_first: bool = False,
        oneshot_ini: Path | None = None,
        running: RunningAgent | None = None,
        mbsync_cfg: Path | None = None,
    ) -> None:
        """Each tool once; *mbsync_first* turns the order round (the runs alternate, so
        neither side always finds Dovecot just woken or just warmed by the other)."""
        label = f"{self.server.name}-{self.messages}-{label}"  # names the cProfile files
        prof = self.profile_dir / f"oneshot-{label}.prof" if self.profile_dir else None
        running = running or self.running
        mbsync_cfg = mbsync_cfg or self.mbsync_cfg

        def peer() -> None:
            self.record(scenario, "mbsync", mbsync_sync(mbsync_cfg, self.proxies["mbsync"]))

        if mbsync_first:
            peer()
        self.record(scenario, "bridge one-shot", oneshot_sync(
            oneshot_ini or self.product.oneshot_ini, self.proxies["oneshot"], prof))  # fmt: skip
        run = running.sync(label)
        missed = scenario in CHANGES and run.detail["summary"]["fast_path"]
        run.detail["missed"] = missed
        self.record(scenario, RUNNING, run)
        if missed:
            log("  the running agent took the fast path: it MISSED the change")
        if missed or scenario == "no change":
            self.record(scenario, RUNNING_NOOP, running.sync(label, noop_first=True))
        if not mbsync_first:
            peer()

    def first_sync(self, runs: int = 1) -> None:
        """*runs* first syncs per tool, alternating which side goes first; the 2nd and
        later with agents paired for it (``fresh_agents``) and a new mbsync Maildir."""
        log(f"scenario: first sync ({runs} runs)")
        self.all_tools("first sync", "first")
        near = count_maildir(self.mbsync_cfg.parent)
        log(f"  mbsync copied {near} messages into its Maildir (window {self.args.window})")
        for r in range(1, runs):
            inis = self.product.inis
            running = RunningAgent(inis[f"running-first{r}"], self.proxies["running"],
                                   self.profile_dir)  # fmt: skip
            cfg = write_mbsync_config(
                self.mbsync_cfg.parent.with_name(f"mbsync-first{r}"), self.proxies["mbsync"].port,
                self.user, self.dovecot.password, self.args.window, self.server,
            )  # fmt: skip
            try:
                self.all_tools("first sync", f"first{r}", r % 2 == 1,
                               inis[f"oneshot-first{r}"], running, cfg)  # fmt: skip
            finally:
                running.close()

    def no_change(self) -> None:
        log("scenario: no change")
        time.sleep(DIRTY_SYNC_PAUSE)
        for r in range(self.args.repeat):
            self.all_tools("no change", f"nochange{r}", r % 2 == 1)

    def one_flag(self) -> None:
        log("scenario: one \\Seen flag change (imapclient)")
        for r in range(self.args.repeat):
            uid = self.unread.pop()  # the newest unread message: inside the window
            with self.dovecot.client(self.user) as client:
                client.select_folder("INBOX")
                client.add_flags([uid], [b"\\Seen"])
            time.sleep(DIRTY_SYNC_PAUSE)
            self.all_tools("one flag", f"flag{r}", r % 2 == 1)

    def one_new(self) -> None:
        log("scenario: one new message (APPEND)")
        rng = random.Random(7)
        for r in range(self.args.repeat):
            self.count += 1
            date = mail_date(self.count)
            self.dovecot.append(self.user, make_mail(self.count, date, rng), date)
            time.sleep(DIRTY_SYNC_PAUSE)
            self.all_tools("one new message", f"new{r}", r % 2 == 1)
