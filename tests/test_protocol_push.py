"""Frames the agent did not ask for: the server pushes a ``changed`` notice and heartbeats
to a connected agent; the agent's link queues them while it waits for a reply.

The real server (composition root, sync listener over mutual TLS) and the real
``ServerLink`` with the certificate `agent pair` issued.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import Bridge
from dovecot import Dovecot

from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.protocol import schema


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(dovecot, tmp_path, window=6).start()
    b.pair()
    try:
        yield b
    finally:
        b.stop()


def _link(bridge: Bridge) -> ServerLink:
    assert bridge.server is not None
    return ServerLink.open(
        "127.0.0.1", bridge.server.port, bridge.agent_ini.parent / "state", timeout=10
    )


def _eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_server_pushes_changed_to_the_users_connected_agent(bridge: Bridge) -> None:
    server = bridge.server
    assert server is not None and server.sync is not None
    sync = server.sync
    assert server.call(sync.push("alice", schema.Changed(reason="phone_action"))) == 0
    with _link(bridge) as link:
        assert link.wait_notice(0.2) is None  # nothing yet, and the wait is bounded
        link.hello("push-test")
        assert sync.connected("alice") == 1
        assert sync.connected("bob") == 0
        sent = server.call(sync.push("alice", schema.Changed(reason="phone_action")))
        assert sent == 1
        assert link.wait_notice(5) == schema.Changed(reason="phone_action")
        assert link.wait_notice(0.1) is None

        # A notice arriving while a request waits for its reply is queued, not lost.
        server.call(sync.push("alice", schema.Changed(reason="inbound_mail")))
        time.sleep(0.2)  # the notice is on the wire before the snapshot is asked for
        snapshot = link.snapshot()
        assert snapshot.window == 6
        assert link.wait_notice(0) == schema.Changed(reason="inbound_mail")
    _eventually(lambda: sync.connected("alice") == 0)  # the registry forgets it


def test_a_quiet_connection_gets_heartbeats_and_can_ask_for_one(bridge: Bridge) -> None:
    server = bridge.server
    assert server is not None and server.sync is not None
    server.sync.heartbeat_interval = 0.2
    with _link(bridge) as link:
        link.hello("heartbeat-test")
        assert link.wait_notice(5) == schema.Heartbeat()
        link.heartbeat()  # the agent's own check: answered
        # Heartbeats in between do not disturb a session.
        time.sleep(0.5)
        assert link.snapshot().action_seq == 0


def test_an_unpaired_connection_is_not_registered(bridge: Bridge) -> None:
    server = bridge.server
    assert server is not None and server.sync is not None
    with _link(bridge) as link:
        link.request(schema.CaRequest(), schema.CaCert)
        assert server.sync.connected("alice") == 0
