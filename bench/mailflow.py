"""The mail flow's figures (patent FIG. 12 and the hosted mail server):

- inbound SMTP throughput into the hosted server: 1,000 small messages from 10
  concurrent clients (one connection each, smtplib), messages per second and the p50 /
  p99 time from the end of DATA to the 250;
- phone → recipient latency of a "send via my desktop" message with `agent run` up: from
  the compose call's return (the message queued in the hosted store) to its arrival at
  the corporate SMTP server (aiosmtpd on loopback), push, session and SMTP included.

Both run the real `server run` and `agent run` as processes, against a small Dovecot of
their own (the figures do not depend on the inbox size). ``python bench/mailflow.py``
prints them; ``bench.py`` adds them to its report.
"""

from __future__ import annotations

import re
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from processes import REPO, cli, free_port, python_env, stop_process, wait_for_port

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dovecot import Dovecot  # noqa: E402
from smtp_servers import MailServer  # noqa: E402

from imapsync_bridge.config import load_server_config  # noqa: E402
from imapsync_bridge.server.phone import PhoneService  # noqa: E402
from imapsync_bridge.server.store import PhoneStore  # noqa: E402

MAILFLOW_HEADING = (
    "\n## Mail flow (issue 8)\n\nThe real `server run` and `agent run` on loopback against a"
    " small Dovecot of their own (`bench/mailflow.py`): 1,000 small messages from 10"
    " concurrent SMTP clients into the hosted server (time from the end of DATA to the"
    " 250), and a via-desktop message from the phone's compose to its arrival at the"
    " corporate SMTP server (aiosmtpd), push, session and SMTP included.\n\n"
)
CLIENTS = 10
PER_CLIENT = 100
LATENCY_RUNS = 5
USER = "alice"
PHONE = "alice@phone.example"


def _server(root: Path, imap_user: str, extra: dict[str, str]) -> tuple[Any, Path, int]:
    """server init + add-user + `server run` (a process), with *extra* [server] keys."""
    sync_port = free_port()
    cli("server", "init", "--data-dir", str(root / "server"), "--hostname", "127.0.0.1",
        "--sync-port", str(sync_port))  # fmt: skip
    ini = root / "server" / "server.ini"
    text = ini.read_text()
    for key, value in extra.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if f"{key} = " not in text:
            text = text.replace("[server]\n", f"[server]\n{key} = {value}\n")
    ini.write_text(text)
    cli("server", "add-user", "--config", str(ini), USER, "--address", PHONE,
        "--desktop-address", f"{imap_user}@corp.example", "--window", "50")  # fmt: skip
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config", str(ini)],
        env=python_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(sync_port, process, "server run")
    except RuntimeError:
        raise RuntimeError((root / "server.log").read_text()[-500:]) from None
    return process, ini, sync_port


def inbound_throughput(root: Path, imap_user: str) -> dict[str, float]:
    smtp_port = free_port()
    process, ini, _ = _server(
        root,
        imap_user,
        {
            "smtp_listen": f"127.0.0.1:{smtp_port}",
            "max_unsynced": "100000",
            "submission_listen": "",
            "web_listen": "",
        },
    )
    try:
        wait_for_port(smtp_port, process, "smtp listener")
        times: list[float] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            mine = []
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
                for i in range(PER_CLIENT):
                    raw = (
                        f"From: sender{n}@example.net\r\nTo: {PHONE}\r\n"
                        f"Subject: throughput {n}.{i}\r\n"
                        f"Message-ID: <tp{n}.{i}@bench.example>\r\n\r\nsmall body {i}\r\n"
                    ).encode()
                    started = time.perf_counter()
                    smtp.sendmail(f"sender{n}@example.net", [PHONE], raw)
                    mine.append(time.perf_counter() - started)
            with lock:
                times.extend(mine)

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        wall = time.perf_counter() - started
        with PhoneStore(load_server_config(ini).database) as store:
            stored = store.counts(USER)["inbox"]
    finally:
        stop_process(process)
    times.sort()
    return {
        "messages": float(len(times)),
        "stored": float(stored),
        "wall_s": wall,
        "per_s": len(times) / wall,
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
    }


def via_desktop_latency(root: Path, dovecot: Dovecot, imap_user: str) -> dict[str, float]:
    """`agent run` up; each compose (via desktop) timed until the corporate SMTP server
    has the message."""

    with MailServer(dovecot) as corporate:
        process, ini, sync_port = _server(
            root, imap_user,
            {"smtp_listen": "", "submission_listen": "", "web_listen": ""},
        )  # fmt: skip
        agent_ini = root / "agent" / "agent.ini"
        agent_ini.parent.mkdir(parents=True)
        secret = agent_ini.parent / "imap.pass"
        secret.write_text(dovecot.password + "\n")
        secret.chmod(0o600)
        agent_ini.write_text(
            f"[agent]\nstate_dir = state\nserver = 127.0.0.1:{sync_port}\n"
            "sync_interval = 3600\nidle = true\n"
            f"[imap]\nhost = 127.0.0.1\nport = {dovecot.port}\nsecurity = none\n"
            f"username = {imap_user}\npassword_file = imap.pass\n"
            f"[smtp]\nhost = {corporate.host}\nport = {corporate.port}\nsecurity = none\n"
            f"username =\nfrom_address = {imap_user}@corp.example\n"
        )
        code = cli("server", "pair-code", "--config", str(ini), USER).strip().splitlines()[-1]
        cli("agent", "pair", "--config", str(agent_ini), "--code", code)
        log = (root / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "imapsync_bridge.cli", "agent", "run", "--config",
             str(agent_ini)],
            env=python_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        latencies: list[float] = []
        try:
            deadline = time.monotonic() + 20
            while "push link to the server is up" not in (root / "agent.log").read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("agent run did not come up")
                time.sleep(0.05)
            time.sleep(1.0)  # the start-up sessions are done
            config = load_server_config(ini)
            with PhoneStore(config.database) as store:
                service = PhoneService(
                    store, config.relay, max_message_size=config.max_message_size
                )
                for n in range(LATENCY_RUNS):
                    before = len(corporate.received)
                    service.compose(
                        USER, ["someone@elsewhere.example"], f"latency {n}", "hello",
                        via_desktop=True,
                    )  # fmt: skip
                    queued = time.perf_counter()
                    while len(corporate.received) == before:
                        if time.perf_counter() - queued > 10:
                            raise RuntimeError("the message never reached the corporate SMTP")
                        time.sleep(0.001)
                    latencies.append(time.perf_counter() - queued)
                    time.sleep(0.5)
        finally:
            stop_process(agent)
            stop_process(process)
    return {
        "runs": float(len(latencies)),
        "median_ms": statistics.median(latencies) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def mailflow_figures() -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp, Dovecot() as dovecot:
        root = Path(tmp)
        (root / "in").mkdir()
        (root / "out").mkdir()
        inbound = inbound_throughput(root / "in", dovecot.new_user())
        outgoing = via_desktop_latency(root / "out", dovecot, dovecot.new_user())
    return {"inbound": inbound, "via_desktop": outgoing}


def report(figures: dict[str, dict[str, float]]) -> str:
    i, o = figures["inbound"], figures["via_desktop"]
    return "\n".join(
        [
            "| figure | measured | target |",
            "| --- | ---: | --- |",
            f"| inbound SMTP, {int(i['messages'])} messages from {CLIENTS} clients "
            f"({int(i['stored'])} stored) | {i['per_s']:.0f} messages/s; "
            f"p50 {i['p50_ms']:.1f} ms, p99 {i['p99_ms']:.1f} ms to 250 | — |",
            f"| phone → recipient, via the desktop, `agent run` up ({int(o['runs'])} runs) "
            f"| median {o['median_ms']:.0f} ms, max {o['max_ms']:.0f} ms | < 1 s |",
        ]
    )


if __name__ == "__main__":
    print(report(mailflow_figures()))
