"""Throttling of password guesses, shared by every listener that checks a password.

DESIGN.md: 10 bad passwords in a row for a user or from an address (the client's IP) and
logins are refused for a while (:data:`LOCKOUT`, 5 minutes): SMTP submission answers
``454 4.7.0``, the web page and the API 429. A good password resets the *user's* count,
not the address's: one account of their own must not let someone reset the count of the
address they spray other users' passwords from. A streak older than the lockout is
forgotten, so an address with a few typos a day is never refused. An IPv6 client counts
as its /64 (:func:`.credentials.client_block`): it could pick a fresh address per guess.
Where a user logged in before (her last 8 client blocks, per process), the user's count
does not refuse her, only that address's own: others cannot lock her out of her network.

While refused, a login is not checked at all (no scrypt cost, and no answer that tells a
right password from a wrong one), and the attempt does not extend the refusal.

The counts live in memory, per server process, in one :class:`Throttle` that
:func:`.app.serve` makes and hands to each listener: a restart forgets them, and with
several server processes each counts its own (an attacker gets 10 guesses per process
and lockout period). The table is bounded (:data:`MAX_SUBJECTS`, least recently failed
dropped first), so random login names cannot grow it without end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIMIT = 10  # bad passwords in a row
LOCKOUT = 300.0  # seconds refused after that
MAX_SUBJECTS = 100_000


@dataclass
class _Streak:
    count: int
    last: float
    locked_until: float = 0.0


class Throttle:
    """Consecutive failures per subject (``user:NAME``, ``address:IP``); thread-safe,
    since password checks run in worker threads."""

    def __init__(
        self,
        limit: int = LIMIT,
        lockout: float = LOCKOUT,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_subjects: int = MAX_SUBJECTS,
    ) -> None:
        self.limit = limit
        self.lockout = lockout
        self._clock = clock
        self._max = max_subjects
        self._lock = threading.Lock()
        self._streaks: OrderedDict[str, _Streak] = OrderedDict()

    def refused(self, *subjects: str) -> bool:
        """Whether any of the subjects is locked out now."""
        now = self._clock()
        with self._lock:
            return any(self._locked(subject, now) for subject in subjects)

    def failed(self, *subjects: str) -> None:
        """Count one bad password against each subject; lock a subject at the limit."""
        now = self._clock()
        with self._lock:
            for subject in subjects:
                streak = self._streaks.pop(subject, None)
                if streak is None or now - streak.last > self.lockout:
                    streak = _Streak(0, now)
                streak.count += 1
                streak.last = now
                if streak.count >= self.limit and streak.locked_until <= now:
                    streak.locked_until = now + self.lockout
                    log.warning(
                        "logins: %d bad passwords in a row for %s; refused for %d s",
                        streak.count, subject, self.lockout,
                    )  # fmt: skip
                self._streaks[subject] = streak  # most recent last
            while len(self._streaks) > self._max:
                self._streaks.popitem(last=False)

    def succeeded(self, subject: str) -> None:
        """A good password: the subject's streak starts again from 0."""
        with self._lock:
            self._streaks.pop(subject, None)

    def _locked(self, subject: str, now: float) -> bool:
        streak = self._streaks.get(subject)
        if streak is None or streak.locked_until == 0.0:
            return False
        if streak.locked_until > now:
            return True
        del self._streaks[subject]  # served its time: a fresh streak
        return False
