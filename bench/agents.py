"""Step 2: the hosted server and the two paired agents (two phone users on one inbox).

One agent runs as a one-shot ``agent sync`` process per scenario (:func:`oneshot_sync`),
the other as a long-running worker (:class:`RunningAgent`, see ``worker.py``) that keeps
its IMAP and server connections open.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measuring import CountingProxy, Run, run_measured
from processes import cli, free_port, python_env, stop_process, wait_for_port

BENCH_SCRIPT = Path(__file__).resolve().with_name("bench.py")
PASSWORD_FILE = "imap.pass"


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
        argv = [sys.executable, str(BENCH_SCRIPT), "--worker", str(ini)]
        if profile_dir is not None:
            argv += ["--cprofile", str(profile_dir)]
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
