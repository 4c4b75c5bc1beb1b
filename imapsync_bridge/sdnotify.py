"""systemd's service notification protocol (sd_notify(3)), for ``Type=notify`` units.

A notification is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). ``READY=1`` once the
service works, ``STOPPING=1`` when it ends, ``WATCHDOG=1`` at least every half of
``$WATCHDOG_USEC`` while ``WatchdogSec=`` is set (for this process: ``$WATCHDOG_PID``,
when set, must be ours). Outside systemd every call does nothing. A failed send is
logged once and never stops the service: the watchdog will say if it matters.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        #: seconds between watchdog pings (half the watchdog timeout), None when off
        self.ping_every = watchdog_usec / 2e6 if address and watchdog_usec else None
        self._last_ping = float("-inf")
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        watchdog = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        usec = int(watchdog) if watchdog.isdigit() and int(watchdog) > 0 and mine else None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    def notify(self, **fields: str) -> None:
        """One datagram, e.g. ``notify(READY="1", STATUS="listening")``."""
        if not self._address:
            return
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc.strerror or exc)
            self._failed = True

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)
        self._last_ping = time.monotonic()

    def stopping(self) -> None:
        self.notify(STOPPING="1")

    def ping(self) -> None:
        """``WATCHDOG=1`` when half the watchdog timeout passed since the last one."""
        if self.ping_every is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.ping_every:
            self.notify(WATCHDOG="1")
            self._last_ping = now

    def update(self, what: str, done: int, total: int) -> None:
        """A step of long work was done (a :class:`~imapsync_bridge.logs.ProgressSink`):
        the service is alive, ping the watchdog."""
        self.ping()

    def seconds_to_ping(self) -> float | None:
        """How long a loop may wait before it must call :meth:`ping` (None: never)."""
        if self.ping_every is None:
            return None
        return max(0.0, self._last_ping + self.ping_every - time.monotonic())
