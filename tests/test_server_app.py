"""The server's composition root: every enabled listener over one store, one stop event,
and a readiness signal."""

from __future__ import annotations

import asyncio
from pathlib import Path

from imapsync_bridge.config import load_server_config
from imapsync_bridge.server.app import LISTENERS, ListenerEntry, Running, init_server, serve


class FakeListener:
    def __init__(self, log: list[object]) -> None:
        self.log = log

    async def start(self, host: str, port: int) -> int:
        self.log.append(("start", host, port))
        return 4242

    async def close(self) -> None:
        self.log.append("closed")


def test_serve_starts_each_enabled_entry_then_signals_ready(tmp_path: Path) -> None:
    config = load_server_config(
        init_server(
            tmp_path / "server",
            "127.0.0.1",
            sync_port=0,
            smtp_port=0,
            submission_port=0,
            web_port=0,
        )
    )
    log: list[object] = []
    entries = (
        *LISTENERS,
        ListenerEntry("off", lambda c: None, lambda c, s: FakeListener(log)),
        ListenerEntry("fake", lambda c: ("127.0.0.1", 0), lambda c, s: FakeListener(log)),
    )
    seen: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()

        def ready(running: Running) -> None:
            seen.update(running.ports)
            seen["same store"] = running.sync.store is running.store
            stop.set()

        await serve(config, stop=stop, ready=ready, entries=entries)

    asyncio.run(main())
    assert set(seen) == {"sync", "smtp", "submission", "web", "fake", "same store"}
    assert seen["fake"] == 4242 and isinstance(seen["sync"], int) and seen["sync"] > 0
    assert seen["same store"] is True
    assert log == [("start", "127.0.0.1", 0), "closed"]  # "off" was never made
