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

from agents import RunningAgent, start_product
from measuring import CountingProxy, log
from peers import write_mbsync_config
from processes import REPO, stop_process, terminate_as_exit, use_pycache
from reporting import print_profiles, report_text, startup_cost, write_docs
from scenarios import Bench
from seeding import UNREAD_NEWEST, seed_inbox
from worker import worker_main

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def run_bench(args: argparse.Namespace) -> int:
    if shutil.which("mbsync") is None:
        sys.exit("mbsync not found: `make bench` installs the Debian package isync")
    from dovecot import Dovecot

    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_exit())
        root = Path(tempfile.mkdtemp(prefix="bench-"))
        stack.callback(shutil.rmtree, root, True)
        use_pycache(root / "pycache")
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
