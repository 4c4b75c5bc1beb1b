"""`agent status` as a person reads it and as --json: the service, the last sync and its
result, what waits each way, the window, quarantine with reasons, the last error."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from bridge import Bridge, run_cli
from dovecot import Dovecot


def status_text(bridge: Bridge) -> list[str]:
    rc, out, err = run_cli("agent", "status", "--config", str(bridge.agent_ini))
    assert rc == 0, err
    return out.splitlines()


def test_status_before_during_and_after_sessions(dovecot: Dovecot, tmp_path: Path) -> None:
    bridge = Bridge(dovecot, tmp_path, window=6).start()
    try:
        bridge.pair()
        assert bridge.server is not None
        lines = status_text(bridge)
        assert lines[0] == f"paired        yes, server 127.0.0.1:{bridge.server.port} as alice"
        assert "service       never run" in lines
        assert "last sync     never (-)" in lines
        assert "quarantined   0" in lines

        bridge.write_agent_config(bridge.agent_ini, max_message_size="2048")
        bridge.deliver(1)
        bridge.deliver(2)
        big = bridge.deliver(3, body="x" * 5000)
        bridge.sync_ok()
        info = bridge.agent_status()
        assert info["pending"] == {"to_phone": 0, "held_for_desktop": 0, "outgoing_mail": 0}
        assert (info["service"], info["last_result"], info["mapped"]) == ("never run", "ok", 2)
        lines = status_text(bridge)
        assert f"last sync     {info['last_sync']} (ok)" in lines
        assert "window        6, 2 messages mapped" in lines
        assert "pending       0 to the phone, 0 held for the desktop, 0 outgoing mail" in lines
        assert "folders       inbox INBOX, trash Trash, sent Sent, outbox Outbox" in lines
        assert f"sync phrase   {info['sync_phrase']}" in lines
        quarantined = lines[lines.index("quarantined   1") + 1]
        assert quarantined.startswith(f"  {big} (uid 3): ") and "larger" in quarantined

        # the service, as a process: its pid, start and next sync
        agent = bridge.run_agent()
        try:
            deadline = time.monotonic() + 10
            while not (info := bridge.agent_status())["running"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert info["service"] == "running" and info["service_pid"] == agent.pid
            lines = status_text(bridge)
            assert any(
                line.startswith(f"service       running (pid {agent.pid}, since ") for line in lines
            )
            assert "  imap idle   " in "\n".join(lines) and "  push link   " in "\n".join(lines)
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(15) == 0
        assert "service       stopped" in status_text(bridge)
    finally:
        bridge.stop()
    # the server is gone: the failure and its reason
    assert bridge.sync()[0] == 1
    info = bridge.agent_status()
    assert info["last_result"] == "failed" and "127.0.0.1" in info["last_error"]
    lines = status_text(bridge)
    assert f"last error    {info['last_error']}" in lines
    assert any(line.startswith("last sync     ") and line.endswith("(failed)") for line in lines)
    rc, out, _err = run_cli("agent", "status", "--config", str(bridge.agent_ini), "--json")
    assert rc == 0 and json.loads(out) == info
