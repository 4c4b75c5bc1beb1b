"""`make bench`: the bridge and mbsync side by side on one large Dovecot inbox.

Steps, for each server profile (tests/dovecot.py ``Profile``: full, exchange-like,
cyrus-like) in turn, each with its own Dovecot and inbox:

1. a throwaway Dovecot playing that profile with N realistic 2-5 KB mails written
   straight into the INBOX Maildir's ``cur/``, then indexed and warmed once before any
   timing;
2. the hosted server as a subprocess and two paired agents (two phone users on the same
   IMAP inbox): one run as a one-shot ``agent sync`` process per scenario, one as a
   long-running worker process that keeps its IMAP and server connections open
   (``python bench/bench.py --worker INI``, driven over a pipe);
3. mbsync (Debian ``isync``) with ``MaxMessages W`` into a temp Maildir;
4. scenarios: first sync, no change, one ``\\Seen`` change, one new message. Every
   tool's IMAP connection goes through its own counting TCP proxy (IMAP turns, commands,
   bytes from the server), so the figures are comparable across tools; then (``--large``)
   the same again with a fresh inbox of 200,000 messages, first sync only;
5. one table per profile and one of first syncs at both sizes on stdout, also written
   to docs/benchmark.md.

The steps live in their own modules beside this one: ``seeding.py`` (1), ``agents.py`` and
``worker.py`` (2), ``peers.py`` (3), ``scenarios.py`` (4), ``reporting.py`` (5), with
``measuring.py`` (the counting proxy, timing) and ``processes.py`` (child processes).
This script keeps the command line and ties the steps together.

Everything (Dovecot, server, worker, proxies, temp dirs) is cleaned up on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agents import AgentSpec, RunningAgent, start_product
from mailflow import MAILFLOW_HEADING, mailflow_figures
from mailflow import report as mailflow_report
from measuring import CountingProxy, log
from peers import write_mbsync_config
from processes import REPO, stop_process, terminate_as_exit, use_pycache
from reporting import print_profiles, report_text, startup_cost, write_docs
from scenarios import Bench, fresh_agents
from seeding import seed_inbox
from service import BULK_WINDOW, SERVICE_AGENTS, ServiceBench, service_agents
from web import WEB_HEADING, web_figures
from web import report as web_report
from worker import worker_main

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def start_bench(
    stack: contextlib.ExitStack,
    root: Path,
    args: argparse.Namespace,
    server: Any,
    messages: int,
    profile_dir: Path | None,
    with_service: bool = False,
    first_runs: int = 1,
) -> Bench:
    """A Dovecot playing *server* (a tests/dovecot.py ``Profile``) with its own inbox of
    *messages* seeded, a counting proxy per tool, the hosted server with two paired agents
    (one of them running; *with_service*: also the two of the running-service step;
    *first_runs* > 1: two more per extra first sync), mbsync's config. All of it stops
    when *stack* closes."""
    from dovecot import Dovecot

    work = root / f"{server.name}-{messages}"
    work.mkdir()
    log(f"profile {server.name}, {messages:,} messages: starting Dovecot; work directory {work}")
    dovecot = Dovecot(profile=server).start()
    stack.callback(dovecot.stop)
    user = dovecot.new_user()
    seed_seconds = seed_inbox(dovecot, user, messages)
    names = ["oneshot", "running", "mbsync", *(SERVICE_AGENTS if with_service else ())]
    proxies = {name: CountingProxy(dovecot.port) for name in names}
    for proxy in proxies.values():
        stack.callback(proxy.close)
    agents = {name: AgentSpec(proxies[name].port, args.window) for name in ("oneshot", "running")}
    if with_service:
        agents |= service_agents(args.window, {n: p.port for n, p in proxies.items()})
    for name in fresh_agents(first_runs):  # through the proxy of the tool they stand in for
        agents[name] = agents[name.partition("-")[0]]
    log(f"starting the hosted server and pairing {len(agents)} agents")
    product = start_product(work, user, dovecot.password, agents)
    stack.callback(stop_process, product.server)
    running = RunningAgent(product.running_ini, proxies["running"], profile_dir)
    stack.callback(running.close)
    mbsync_cfg = write_mbsync_config(
        work / "mbsync", proxies["mbsync"].port, user, dovecot.password, args.window, server
    )
    return Bench(
        args, dovecot, user, product, proxies, running, mbsync_cfg, profile_dir,
        messages, seed_seconds,
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    if shutil.which("mbsync") is None:
        sys.exit("mbsync not found: `make bench` installs the Debian package isync")
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_exit())
        root = Path(tempfile.mkdtemp(prefix="bench-"))
        stack.callback(shutil.rmtree, root, True)
        use_pycache(root / "pycache")
        startup_cost()  # writes the bytecode cache
        profile_dir = Path(args.cprofile).resolve() if args.cprofile else None
        if profile_dir:
            profile_dir.mkdir(parents=True, exist_ok=True)
        benches: list[Bench] = []
        large: list[Bench] = []
        for n, server in enumerate(args.servers):  # one after the other: each has the machine
            with contextlib.ExitStack() as run:
                bench = start_bench(run, root, args, server, args.messages, profile_dir,
                                    args.service, args.repeat)  # fmt: skip
                bench.first_sync(args.repeat)
                bench.no_change()
                bench.one_flag()
                bench.one_new()
                if args.service:
                    idle = args.idle_seconds if n == 0 else 0.0
                    bench.service = ServiceBench(bench, idle).run(run)
                benches.append(bench)
            if args.large:
                with contextlib.ExitStack() as run:
                    bench = start_bench(run, root, args, server, args.large, profile_dir)
                    bench.first_sync()
                    large.append(bench)
        startup = startup_cost()
        body = report_text(benches, large, startup, profile_dir is not None)
        if args.mailflow:
            log("mail flow: inbound SMTP throughput, phone → recipient via the desktop")
            body += MAILFLOW_HEADING + mailflow_report(mailflow_figures()) + "\n"
        if args.web:
            log("web: the inbox page and /api/mailbox, 500 slots, 50 concurrent clients")
            body += WEB_HEADING + web_report(web_figures()) + "\n"
        print(body)
        if args.docs:
            write_docs(REPO / args.docs, body, args)
        if profile_dir:
            print_profiles(profile_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    from dovecot import PROFILES

    by_name = {p.name: p for p in PROFILES}
    default_servers = ["full", "exchange-like"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50000, help="inbox size (50000)")
    parser.add_argument("--window", type=int, default=50, help="phone window (50)")
    parser.add_argument("--quick", action="store_true", help="2000 messages, no --large, no docs")
    parser.add_argument(
        "--repeat", type=int, default=5,
        help="runs per scenario and per push latency at N messages, first sync included (5)",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        action="append",
        choices=list(by_name),
        help="server profile (tests/dovecot.py), repeatable; default: "
        + " and ".join(default_servers)
        + ", one after the other, each with its own Dovecot and inbox",
    )
    parser.add_argument(
        "--large",
        type=int,
        metavar="N",
        default=200000,
        help="also a first sync at N messages on each profile (200000; 0: off)",
    )
    parser.add_argument(
        "--docs",
        help="results file (default docs/benchmark.md, not with --quick, --profile, --cprofile)",
    )
    parser.add_argument(
        "--no-service",
        dest="service",
        action="store_false",
        help="skip the running service (agent run: push latency, 1,000 actions, idle)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="idle agent run measured this long, on the first profile (60; --quick: 5)",
    )
    parser.add_argument("--cprofile", metavar="DIR", help="cProfile every bridge sync into DIR")
    parser.add_argument(
        "--no-mailflow", dest="mailflow", action="store_false",
        help="leave out the mail flow figures (inbound SMTP, via-desktop latency)",
    )  # fmt: skip
    parser.add_argument(
        "--no-web", dest="web", action="store_false",
        help="leave out the web page and API figures (issue 10)",
    )  # fmt: skip
    parser.add_argument("--worker", metavar="INI", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(Path(args.worker), Path(args.cprofile) if args.cprofile else None)
    if args.quick:
        args.messages = 2000
        args.large = 0
        args.idle_seconds = min(args.idle_seconds, 5.0)
    elif args.docs is None and not args.cprofile and not args.profile:
        args.docs = "docs/benchmark.md"
    args.servers = [by_name[name] for name in dict.fromkeys(args.profile or default_servers)]
    if args.repeat < 1 or args.window < 1 or args.messages < args.window + 3 * args.repeat:
        parser.error("need --repeat >= 1 and more messages than the window")
    if args.service and (args.messages < BULK_WINDOW + args.window or 2 * args.repeat > 20):
        parser.error(f"the running service needs {BULK_WINDOW + args.window}+ messages and "
                     "--repeat <= 10 (or --no-service)")  # fmt: skip
    if args.large and args.large < args.window + 1:
        parser.error("--large N needs more messages than the window (or 0: off)")
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
