"""Who is asking, and may they write: sessions, CSRF tokens, Basic auth, headers.

* The page logs in with a form and gets a session: a random token in the cookie
  ``__Host-session`` (Secure, HttpOnly, SameSite=Strict, Path=/), kept in memory by
  :class:`Sessions`. A restart (or another server process) does not know it: the user
  logs in again. Logout forgets it at once.
* Every session has its own CSRF token; forms carry it as ``csrf``, the page's script as
  the header ``X-CSRF-Token``. The login form, before any session, carries a token bound
  to the random cookie ``__Host-anon`` (HMAC with a per-process key), so a foreign site
  cannot log a browser into its own account either.
* The API also takes HTTP Basic with the phone password on every request (a phone mail
  app or a script). Every password check, the login form's and Basic's, goes through the
  process's one :class:`.credentials.Logins` (the throttle submission uses too).
* :func:`same_site_writes` refuses a write another site's page makes the browser send.
* :func:`security_headers` puts a strict Content-Security-Policy (nothing but our own
  files; no inline script or style, so a sanitized mail cannot style or script anything)
  and the usual companions on every answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from imapsync_bridge.errors import BridgeError
from imapsync_bridge.server.credentials import Logins
from imapsync_bridge.server.throttle import LOCKOUT

log = logging.getLogger(__name__)

SESSION_COOKIE = "__Host-session"
ANON_COOKIE = "__Host-anon"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
MAX_SESSIONS_PER_USER = 20
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",  # private mail: no copy in any cache, redirects too
}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ID = r"{id:[0-9]{1,18}}"  # a message id in a route: ASCII digits (\d takes any script's)


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    expires: float


class Sessions:
    """The logged-in browsers of this process, bounded: at most ``per_user`` for one
    user (so one account cannot push everyone else's out) and ``limit`` in all, the
    oldest dropped first."""

    def __init__(
        self,
        ttl: float = SESSION_SECONDS,
        limit: int = MAX_SESSIONS,
        per_user: int = MAX_SESSIONS_PER_USER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.per_user = per_user
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._key = secrets.token_bytes(32)  # for the login form's token

    def new(self, user: str) -> tuple[str, Session]:
        mine = [token for token, s in self._sessions.items() if s.user == user]
        for token in mine[: max(0, len(mine) - self.per_user + 1)]:
            del self._sessions[token]
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self._clock() + self.ttl)
        self._sessions[token] = session
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        session = self._sessions.get(token) if token else None
        if session is not None and session.expires < self._clock():
            self.drop(token)
            return None
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def anonymous_csrf(self, anon: str) -> str:
        """The login form's token for the browser holding cookie ``anon``."""
        return hmac.new(self._key, anon.encode(), hashlib.sha256).hexdigest()


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def session_of(request: web.Request, sessions: Sessions) -> Session | None:
    return sessions.get(request.cookies.get(SESSION_COOKIE))


def set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Strict"
    )


def client_address(request: web.Request) -> str | None:
    return request.remote


async def check_login(logins: Logins, login: str, password: str, address: str | None) -> str:
    """The user for a good password; raises 429 when throttled, 401 when wrong."""
    found = await asyncio.to_thread(logins.check, login, password, address)
    if found.refused:
        raise web.HTTPTooManyRequests(
            reason="too many failed logins, try later",
            headers={"Retry-After": str(int(LOCKOUT))},  # at the latest
        )
    if found.user is None:
        raise web.HTTPUnauthorized(
            reason="wrong user name or password",
            headers={"WWW-Authenticate": 'Basic realm="imapsync-bridge", charset="UTF-8"'},
        )
    return found.user


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(login, password) of an ``Authorization: Basic`` header; None if it is not one."""
    scheme, _, blob = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, sep, password = base64.b64decode(blob.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (login, password) if sep else None


async def api_user(request: web.Request, sessions: Sessions, logins: Logins) -> str:
    """The API caller: HTTP Basic, or the page's session (plus ``X-CSRF-Token`` to
    write). 401 without credentials, 429 throttled, 403 for a write without the token."""
    header = request.headers.get("Authorization")
    if header is not None:
        credentials = basic_credentials(header)
        if credentials is None:
            raise web.HTTPUnauthorized(reason="malformed Authorization header")
        return await check_login(logins, *credentials, client_address(request))
    session = session_of(request, sessions)
    if session is None:
        raise web.HTTPUnauthorized(
            reason="log in first",
            headers={"WWW-Authenticate": 'Basic realm="imapsync-bridge", charset="UTF-8"'},
        )
    if request.method in WRITE_METHODS and not same_token(
        request.headers.get(CSRF_HEADER), session.csrf
    ):
        raise web.HTTPForbidden(reason="missing or wrong CSRF token")
    return session.user


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def phone_id(text: str) -> int | None:
    """A message id from a form or query field (digits, within SQLite's integers)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


@web.middleware
async def same_site_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write a browser makes for another site's page is refused (403) before anything
    else: Basic credentials the browser holds go with a foreign form too (SameSite does
    not cover them, and a text/plain form can post JSON). Browsers say who asks with
    ``Sec-Fetch-Site`` (older ones only with ``Origin``, which is ``null`` under our
    ``Referrer-Policy: no-referrer``); a client that sends neither is not a browser."""
    if request.method in WRITE_METHODS:
        site = request.headers.get("Sec-Fetch-Site", "same-origin")
        origin = request.headers.get("Origin", "null")
        if site not in ("same-origin", "none") or origin not in (
            "null",
            f"{request.scheme}://{request.host}",
        ):
            raise web.HTTPForbidden(reason="cross-site request refused")
    return await handler(request)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The strict headers on every answer, errors included; nothing is cached. A store
    or relay failure is one logged line and a 503, never a traceback."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(HEADERS)
        raise
    except BridgeError as exc:
        log.warning("web: %s %s: %s", request.method, request.path, exc)
        raise web.HTTPServiceUnavailable(
            reason="the server cannot do that now", headers=HEADERS
        ) from None
    if not response.prepared:  # (the event stream sent them itself)
        response.headers.update(HEADERS)
    return response
