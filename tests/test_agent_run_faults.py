"""`agent run` under faults: Dovecot restarted, the path to the hosted server or to IMAP
silently blackholed (a proxy that stops forwarding without closing). Each time the agent
notices, reconnects, and the next change still syncs, with nothing lost or doubled.

The service runs in-process (its real class, real connections) so the blackhole tests
can shorten the liveness timings from their production values (push: 45 s quiet; IDLE:
a 30 s probe with 15 s for the answer); the Dovecot restart runs the real `agent run`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge
from dovecot import Dovecot
from proxy import BlackholeProxy
from test_agent_run import start_agent, stop_agent, wait_for

from imapsync_bridge.agent.idle import IdleTiming
from imapsync_bridge.agent.push import PushTiming
from imapsync_bridge.agent.service import AgentService, ServiceTiming
from imapsync_bridge.config import load_agent_config

FAST = ServiceTiming(
    push=PushTiming(quiet_limit=2.0, heartbeat_every=0.5, backoff_initial=0.2, backoff_max=1.0),
    idle=IdleTiming(probe_after=1.0, reply_timeout=1.0, backoff_initial=0.2, backoff_max=1.0),
    retry_initial=0.5,
    retry_max=2.0,
)


class ServiceThread:
    def __init__(self, bridge: Bridge) -> None:
        self.service = AgentService(load_agent_config(bridge.agent_ini), FAST)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    def __enter__(self) -> AgentService:
        self.thread.start()
        return self.service

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the service did not stop"


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path).start()
    try:
        yield b
    finally:
        b.stop()


def desktop_seen(bridge: Bridge, message_id: str) -> bool:
    return any(m.message_id == message_id and m.seen for m in bridge.mails())


def test_the_path_to_the_server_blackholed(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    assert bridge.server is not None
    proxy = BlackholeProxy(bridge.server.port)
    first, second = bridge.deliver(1), bridge.deliver(2)
    bridge.write_agent_config(
        bridge.agent_ini, server=f"127.0.0.1:{proxy.port}", idle="false",
        sync_interval="3600", server_timeout="2",
    )  # fmt: skip
    bridge.pair()
    caplog.set_level("INFO")
    try:
        with ServiceThread(bridge) as service:
            wait_for(
                lambda: service.push is not None and len(bridge.phone_inbox_ids()) == 2, 10, "up"
            )
            proxy.blackhole()
            holed = time.monotonic()
            wait_for(lambda: "push link to the server lost" in caplog.text, 10, "the loss noticed")
            assert time.monotonic() - holed < 5  # quiet_limit 2 s
            bridge.phone("delete", str(bridge.phone_id(first)))  # no notice can pass
            proxy.restore()
            wait_for(lambda: first in bridge.desktop_ids(bridge.trash), 15, "the change, after")
            bridge.phone("read", str(bridge.phone_id(second)))
            wait_for(lambda: desktop_seen(bridge, second), 5, "the next change, by push")
            bridge.assert_in_sync()
    finally:
        proxy.close()


def test_the_path_to_imap_blackholed(bridge: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    proxy = BlackholeProxy(bridge.dovecot.port)
    bridge.deliver(1)
    bridge.write_agent_config(
        bridge.agent_ini, imap_port=proxy.port, idle="true", sync_interval="3600"
    )
    bridge.pair()
    caplog.set_level("INFO")
    try:
        with ServiceThread(bridge) as service:
            wait_for(
                lambda: (
                    service.watcher is not None
                    and service.watcher.state == "idle"
                    and len(bridge.phone_inbox_ids()) == 1
                ),
                10,
                "up",
            )
            time.sleep(0.5)  # the agent idles now (a command cut mid-way waits 30 s)
            proxy.blackhole()
            assert service.watcher is not None
            wait_for(lambda: service.watcher.state != "idle", 10, "the loss noticed")  # type: ignore[union-attr]
            during = bridge.deliver(2)  # made while the path is dead
            proxy.restore()
            # A reconnect begun before restore() (the watcher retries after ~0.1 s; on a
            # loaded machine deliver() takes longer) waits out the 30 s IMAP timeout.
            wait_for(lambda: during in bridge.phone_inbox_ids(), 45, "the change made meanwhile")
            after = bridge.deliver(3)
            wait_for(lambda: after in bridge.phone_inbox_ids(), 5, "the next change, by IDLE")
            bridge.assert_in_sync()
    finally:
        proxy.close()


def test_dovecot_restarted_under_a_running_agent(tmp_path: Path) -> None:
    with Dovecot() as own:
        bridge = Bridge(own, tmp_path).start()
        try:
            first = bridge.deliver(1)
            agent = start_agent(bridge, idle="true", sync_interval="3600")
            wait_for(lambda: first in bridge.phone_inbox_ids(), 10, "the first sync")
            wait_for(
                lambda: (
                    (bridge.agent_status()["connections"] or {}).get("imap_idle", {}).get("state")
                    == "idle"
                ),
                10,
                "IDLE",
            )
            own.restart()
            after = bridge.deliver(2)
            wait_for(lambda: after in bridge.phone_inbox_ids(), 20, "mail after the restart")
            bridge.phone("read", str(bridge.phone_id(first)))
            wait_for(lambda: desktop_seen(bridge, first), 10, "a phone change after it")
            bridge.assert_in_sync()
            assert agent.poll() is None, "agent run died"
            stop_agent(bridge, agent)
        finally:
            bridge.stop()
