"""What `agent status` shows of a running `agent run`: a small JSON file in the state
directory that the service rewrites when what it shows changes, and that another
process reads (with a check that the service's process is still alive)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imapsync_bridge.config import AgentConfig

SERVICE_FILE = "agent-run.json"


class ServiceFile:
    """The running service's side: rewritten atomically, and only on a change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SERVICE_FILE
        self._shown: dict[str, Any] = {}

    def publish(self, shown: dict[str, Any]) -> None:
        if shown == self._shown:
            return
        self._shown = shown
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(shown, indent=2))
        os.replace(temporary, self.path)


def service_status(config: AgentConfig) -> dict[str, Any]:
    """The running service as its file says, if its process is alive."""
    try:
        shown = json.loads((config.state_dir / SERVICE_FILE).read_text())
    except (OSError, ValueError):
        return {"service": "never run", "running": False, "connections": None, "next_sync": None}
    alive = bool(shown.get("running")) and _process_alive(int(shown.get("pid", 0)))
    return {
        "service": "running" if alive else "stopped",
        "running": alive,
        "service_pid": shown.get("pid") if alive else None,
        "service_started": shown.get("started") if alive else None,
        "connections": shown.get("connections") if alive else None,
        "next_sync": shown.get("next_sync") if alive else None,
    }


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
