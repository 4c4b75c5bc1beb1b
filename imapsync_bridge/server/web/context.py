"""What every web handler needs, kept in the aiohttp application under :data:`CONTEXT`."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from aiohttp import web

from imapsync_bridge.server.credentials import Logins
from imapsync_bridge.server.notify import ChangeFeed
from imapsync_bridge.server.phone import PhoneService
from imapsync_bridge.server.web.security import Sessions

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class WebContext:
    service: PhoneService
    logins: Logins
    sessions: Sessions
    feed: ChangeFeed
    agent_connected: Callable[[str], bool]
    closing: asyncio.Event  # set when the listener closes: open event streams end
    streams: Counter[str] = field(default_factory=Counter)  # open event streams per user

    async def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A blocking service call (SQLite, scrypt, the relay) in a worker thread."""
        return await asyncio.to_thread(method, *args, **kwargs)


CONTEXT = web.AppKey("context", WebContext)


def context_of(request: web.Request) -> WebContext:
    return request.app[CONTEXT]
