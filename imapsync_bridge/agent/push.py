"""The phone→desktop push link of ``agent run``: one long-lived outbound TLS connection
to the hosted server, over which the server says "something changed for you".

The agent still only dials out. :class:`PushConnector` makes (and re-makes) the
connection in a thread of its own, with exponential backoff and jitter (tenacity), so
the service loop never blocks on a server that is down; the loop owns a connection once
handed over, reads its notices, runs sync sessions over it, and hands it back for
reconnection when it dies. Liveness: the server sends a heartbeat after 30 s of quiet,
so a link that brought nothing for ``quiet_limit`` seconds is dead (also a path that
silently stopped forwarding); the agent sends its own heartbeat when it sent nothing for
``heartbeat_every`` seconds, so the server notices a dead agent within a minute too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from imapsync_bridge.agent.link import ServerLink
from imapsync_bridge.errors import AuthError, BridgeError, ConnectionLost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushTiming:
    quiet_limit: float = 45.0  # no frame for this long: dead (the server beats every 30 s)
    heartbeat_every: float = 20.0  # the agent's own heartbeat on a link it is quiet on
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    auth_backoff: float = 600.0  # the server refused our certificate: wait much longer


class _Stopped(Exception):
    """The connector was stopped while waiting."""


class PushConnector:
    """Connects in the background; ``on_connected(link)`` hands each new link over.

    ``connect()`` opens a link and says hello (see :func:`runner.open_push_link`).
    """

    def __init__(
        self,
        connect: Callable[[], ServerLink],
        on_connected: Callable[[ServerLink], None],
        timing: PushTiming,
    ) -> None:
        self._connect = connect
        self._on_connected = on_connected
        self.timing = timing
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="push-connector", daemon=True)
        self.last_error: str | None = None
        self.attempts = 0

    def start(self) -> None:
        self._wanted.set()
        self._thread.start()

    def reconnect(self) -> None:
        """The loop lost its link: make a new one."""
        self._wanted.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wanted.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping.is_set():
                return
            try:
                link = self._connect_with_backoff()
            except _Stopped:
                return
            self._on_connected(link)

    def _connect_with_backoff(self) -> ServerLink:
        exponential = wait_exponential_jitter(
            multiplier=self.timing.backoff_initial, max=self.timing.backoff_max
        )

        def wait(state: RetryCallState) -> float:
            failure = state.outcome.exception() if state.outcome else None
            if isinstance(failure, AuthError):
                return self.timing.auth_backoff
            return float(exponential(state))

        def sleep(seconds: float) -> None:
            if self._stopping.wait(seconds):
                raise _Stopped

        def log_retry(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            self.last_error = str(failure)
            log.warning("push link to the server: %s; retrying in %.0f s", failure, delay)

        for attempt in Retrying(
            retry=retry_if_exception_type((ConnectionLost, AuthError, BridgeError, OSError)),
            wait=wait,
            sleep=sleep,
            before_sleep=log_retry,
            reraise=True,
        ):
            with attempt:
                if self._stopping.is_set():
                    raise _Stopped
                self.attempts += 1
                link = self._connect()
        self.last_error = None
        return link
