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
    server: subprocess.Popen
    sync_port: int
    inis: dict[str, Path]  # agent name (= phone user) -> its agent.ini

    @property
    def oneshot_ini(self) -> Path:
        return self.inis["oneshot"]

    @property
    def running_ini(self) -> Path:
        return self.inis["running"]

    @property
    def database(self) -> Path:
        """The hosted server's SQLite store (``server init``'s default)."""
        return self.root / "server" / "phone.sqlite3"


@dataclass(frozen=True)
class AgentSpec:
    """One paired agent: its IMAP port (a proxy), phone window, extra ``[agent]`` lines."""

    imap_port: int
    window: int
    options: str = ""


def start_product(
    root: Path, imap_user: str, password: str, agents: dict[str, AgentSpec]
) -> Product:
    """server init / add-user / run (a subprocess) / agent pair, one agent per entry of
    *agents* (each its own phone user on the same IMAP inbox)."""
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
    inis = {name: root / name / "agent.ini" for name in agents}
    product = Product(root, server_ini, server, sync_port, inis)
    try:
        wait_for_port(sync_port, server, "server run")
        for name, spec in agents.items():
            out = cli("server", "add-user", "--config", str(server_ini), name,
                      "--address", f"{name}@phone.example", "--desktop-address",
                      f"{imap_user}@corp.example", "--window", str(spec.window))  # fmt: skip
            code = out.strip().splitlines()[-1]
            write_agent_ini(inis[name], sync_port, spec, imap_user, password)
            cli("agent", "pair", "--config", str(inis[name]), "--code", code)
    except BaseException:
        stop_process(server)
        raise
    return product


def write_agent_ini(ini: Path, sync_port: int, spec: AgentSpec, user: str, password: str) -> None:
    ini.parent.mkdir(parents=True, exist_ok=True)
    secret = ini.parent / PASSWORD_FILE
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    ini.write_text(
        "[agent]\nstate_dir = state\n"
        f"server = 127.0.0.1:{sync_port}\n{spec.options}"
        "[imap]\nhost = 127.0.0.1\n"
        f"port = {spec.imap_port}\nsecurity = none\nusername = {user}\n"
        f"password_file = {PASSWORD_FILE}\n"
    )


def point_at_server(ini: Path, port: int) -> None:
    """After pairing: the agent reaches the hosted server at 127.0.0.1:*port* (a proxy)."""
    lines = [
        f"server = 127.0.0.1:{port}" if line.startswith("server = ") else line
        for line in ini.read_text().splitlines()
    ]
    ini.write_text("\n".join(lines) + "\n")


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

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def sync(self, label: str, noop_first: bool = False, vouched: bool = False) -> Run:
        """One session; *noop_first*: a NOOP (inside the timing) refreshes the
        connection's view of the selected mailbox before the session starts;
        *vouched*: ``phone_vouched=True``, as ``agent run`` passes it
        to a timer's session while its push link is up and said nothing."""
        before = self.proxy.counts()
        r = self._ask({"cmd": "sync", "label": label, "noop": noop_first, "vouched": vouched})
        traffic = self.proxy.counts().minus(before)
        return Run(r["wall"], traffic.turns, traffic.commands, traffic.bytes_read,
                   r["maxrss_kb"], r)  # fmt: skip

    def status_round_trip(self) -> Run:
        """One ``STATUS`` of the Trash on the worker's IMAP connection (same proxy)."""
        before = self.proxy.counts()
        r = self._ask({"cmd": "status"})
        traffic = self.proxy.counts().minus(before)
        return Run(r["wall"], traffic.turns, traffic.commands, traffic.bytes_read)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        stop_process(self.proc)
