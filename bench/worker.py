"""The running agent (``python bench/bench.py --worker INI``): connections opened once,
then one ``SyncSession.run()`` per JSON request line on stdin, one JSON reply per line.
"""

from __future__ import annotations

import cProfile
import json
import sys
import time
from pathlib import Path
from typing import Any

from measuring import log, peak_rss_self


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


def status_round_trip(imap: Any, mailbox: str) -> float:
    """Seconds of one ``STATUS`` (the counts the agent asks for) on the agent's own
    connection: the floor of any session that has to look at the desktop."""
    started = time.perf_counter()
    imap.status(mailbox)
    return time.perf_counter() - started


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
    imap = runner.connect_imap(config, count_traffic=True)
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
        if request["cmd"] == "status":
            reply({"wall": status_round_trip(imap, desktop.trash)})
            continue
        if request["cmd"] != "sync":
            break
        vouched = bool(request.get("vouched"))
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
                report = SyncSession(
                    state,
                    desktop,
                    link,
                    options,
                    phone_vouched=vouched,
                    keep_inbox_selected=not vouched,
                ).run()
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
