"""The mobile page: server-rendered HTML forms that work without JavaScript.

Every action is a ``POST`` form with the session's CSRF token, answered with a redirect
(post/redirect/get), so reload and back never repeat it. The one script
(``static/live.js``) only refreshes the inbox list when the event stream (``/events``)
says the mailbox changed. Every rule is the phone service's; this module only asks it
and renders the answer (Jinja2 autoescapes everything but sanitized mail markup).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
from email import policy
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from imapsync_bridge.server.outgoing_mail import check_form_text
from imapsync_bridge.server.phone import VERBS, MessageDetail, NoSuchMessage, OutgoingRefused
from imapsync_bridge.server.web import mailview
from imapsync_bridge.server.web.context import WebContext, context_of
from imapsync_bridge.server.web.security import (
    ANON_COOKIE,
    HEADERS,
    ID,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Handler,
    Session,
    check_login,
    client_address,
    phone_id,
    same_token,
    session_of,
    set_cookie,
)

routes = web.RouteTableDef()
_ADDRESS = re.compile(r"[^\s@<>,;:\"]+@[^\s@<>,;:\"]+")  # one plain local@domain
KEEPALIVE_SECONDS = 15.0  # a comment line on a quiet event stream, for proxies
GONE_CHECK_SECONDS = 1.0  # how often a quiet stream looks whether its page closed
MAX_STREAMS_PER_USER = 10  # open pages at once (every commit wakes every stream)


def _session(request: web.Request) -> Session:
    """The logged-in session, else a redirect to the login form."""
    session = session_of(request, context_of(request).sessions)
    if session is None:
        raise web.HTTPSeeOther("/login")
    return session


async def _form(request: web.Request, session: Session) -> MultiDictProxy[Any]:
    """The posted form, once its CSRF token is the session's (else 403)."""
    form = await request.post()
    if not same_token(_field(form, "csrf"), session.csrf):
        raise web.HTTPForbidden(reason="missing or wrong CSRF token")
    return form


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _render(
    name: str, request: web.Request, values: dict[str, Any], status: int = 200
) -> web.Response:
    return aiohttp_jinja2.render_template(name, request, values, status=status)


async def _overview(context: WebContext, user: str) -> dict[str, Any]:
    """What the inbox shows, and ``mark``: a digest of it the event stream compares."""
    mailbox, status = await asyncio.gather(
        context.call(context.service.list, user), context.call(context.service.status, user)
    )
    connected = context.agent_connected(user)
    shown = json.dumps([mailbox.as_json(), status.as_json(), connected]).encode()
    mark = hashlib.sha256(shown).hexdigest()[:32]
    return {"mailbox": mailbox, "status": status, "connected": connected, "mark": mark}


@web.middleware
async def page_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside /api/: an error is a small page with the reason and a way back."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/api/"):
            raise
        values = {"status": exc.status, "reason": exc.reason}
        return _render("error.html", request, values, exc.status)


# -- logging in and out ---------------------------------------------------------------
@routes.get("/")
async def root(request: web.Request) -> web.Response:
    logged_in = session_of(request, context_of(request).sessions) is not None
    raise web.HTTPSeeOther("/inbox" if logged_in else "/login")


def _login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    anon = request.cookies.get(ANON_COOKIE) or secrets.token_urlsafe(32)
    csrf = context_of(request).sessions.anonymous_csrf(anon)
    response = _render("login.html", request, {"csrf": csrf, "error": error}, status)
    set_cookie(response, ANON_COOKIE, anon, 3600)
    return response


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_form(request)


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    context = context_of(request)
    form = await request.post()
    anon = request.cookies.get(ANON_COOKIE, "")
    if not anon or not same_token(_field(form, "csrf"), context.sessions.anonymous_csrf(anon)):
        raise web.HTTPForbidden(reason="missing or wrong CSRF token")
    try:
        user = await check_login(
            context.logins, _field(form, "user"), _field(form, "password"), client_address(request)
        )
    except web.HTTPTooManyRequests:
        return _login_form(request, "Too many failed logins: try again in a few minutes.", 429)
    except web.HTTPUnauthorized:
        return _login_form(request, "Wrong user name or password.", 401)
    context.sessions.drop(request.cookies.get(SESSION_COOKIE))  # one browser, one session
    token, _session_ = context.sessions.new(user)
    response = web.HTTPSeeOther("/inbox")
    set_cookie(response, SESSION_COOKIE, token, SESSION_SECONDS)
    response.del_cookie(ANON_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    raise response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    session = _session(request)
    await _form(request, session)
    context_of(request).sessions.drop(request.cookies.get(SESSION_COOKIE))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    raise response


# -- reading --------------------------------------------------------------------------
async def _folder(request: web.Request, template: str) -> web.Response:
    session = _session(request)
    values = await _overview(context_of(request), session.user)
    return _render(template, request, {**values, "csrf": session.csrf})


@routes.get("/inbox")
async def inbox(request: web.Request) -> web.Response:
    return await _folder(request, "inbox.html")


@routes.get("/inbox/list")
async def inbox_list(request: web.Request) -> web.Response:
    """The inbox list alone: what the page's script swaps in on a change."""
    return await _folder(request, "inbox_list.html")


@routes.get("/trash")
async def trash(request: web.Request) -> web.Response:
    return await _folder(request, "trash.html")


@routes.get("/outbox")
async def outbox(request: web.Request) -> web.Response:
    return await _folder(request, "outbox.html")


async def _show(request: web.Request, user: str, id: int) -> MessageDetail:
    context = context_of(request)
    try:
        return await context.call(context.service.show, user, id)
    except NoSuchMessage:
        raise web.HTTPNotFound(reason="no such message") from None


@routes.get(f"/messages/{ID}")
async def message(request: web.Request) -> web.Response:
    """One message; opening it marks it read, as in any mail client."""
    session = _session(request)
    detail = await _show(request, session.user, int(request.match_info["id"]))
    if not detail.message.seen:
        context = context_of(request)
        read = await context.call(context.service.read, session.user, detail.message.id)
        detail = dataclasses.replace(detail, message=read.message or detail.message)
    body = await asyncio.to_thread(mailview.html_body, detail.raw)  # nh3 on a big mail
    values = {"detail": detail, "body": body, "csrf": session.csrf}
    return _render("message.html", request, values)


@routes.post(f"/messages/{ID}/{{verb}}")
async def change(request: web.Request) -> web.Response:
    session = _session(request)
    await _form(request, session)
    verb, id = request.match_info["verb"], int(request.match_info["id"])
    if verb not in VERBS:
        raise web.HTTPNotFound(reason="no such action")
    context = context_of(request)
    try:
        await context.call(context.service.change, session.user, verb, id)
    except NoSuchMessage:
        raise web.HTTPNotFound(reason="no such message") from None
    # back to the list where the message would re-open (and so re-read) itself
    back_to_list = verb in ("delete", "destroy", "restore", "unread")
    raise web.HTTPSeeOther("/inbox" if back_to_list else f"/messages/{id}")


# -- writing and syncing --------------------------------------------------------------
@routes.get("/compose")
async def compose_form(request: web.Request) -> web.Response:
    """An empty form, or one filled in to reply to (``?reply=ID``) or forward
    (``?forward=ID``) a message."""
    session = _session(request)
    draft = {"to": "", "subject": "", "body": "", "in_reply_to": ""}
    for mode in ("reply", "forward"):
        id = phone_id(request.query.get(mode, ""))
        if id is not None:
            draft = _draft(mode, await _show(request, session.user, id))
    return _render("compose.html", request, {"draft": draft, "csrf": session.csrf, "error": ""})


def _draft(mode: str, detail: MessageDetail) -> dict[str, str]:
    item = detail.message
    if mode == "reply":
        quoted = "\n".join(f"> {line}" for line in detail.text.splitlines())
        subject = item.subject if item.subject.lower().startswith("re:") else f"Re: {item.subject}"
        body = f"\n\n{item.sender} wrote:\n{quoted}\n"
        to = _reply_address(detail)
        return {"to": to, "subject": subject, "body": body, "in_reply_to": str(item.id)}
    header = f"From: {item.sender}\nDate: {item.date}\nSubject: {item.subject}"
    body = f"\n\n---------- Forwarded message ----------\n{header}\n\n{detail.text}\n"
    return {"to": "", "subject": f"Fwd: {item.subject}", "body": body, "in_reply_to": ""}


def _reply_address(detail: MessageDetail) -> str:
    """Where a reply goes: the mail's Reply-To when it names an address (RFC 5322
    3.6.2), else its sender. A hostile header gives the sender, never a line break."""
    try:
        header = BytesHeaderParser(policy=policy.default).parsebytes(detail.raw)
        pairs = getaddresses([str(header.get("Reply-To", ""))])
    except Exception:  # whatever a sender wrote: the From will do
        pairs = []
    names = [(" ".join(n.replace('"', "").replace("\\", "").split()), a) for n, a in pairs]
    named = [f'"{n}" <{a}>' if n else a for n, a in names if _ADDRESS.fullmatch(a)]
    return ", ".join(named) or detail.message.sender


@routes.post("/compose")
async def compose(request: web.Request) -> web.Response:
    session = _session(request)
    form = await _form(request, session)
    draft = {k: _field(form, k) for k in ("to", "subject", "body", "in_reply_to")}
    reply = phone_id(draft["in_reply_to"])
    via_desktop = _field(form, "send") == "desktop"
    context = context_of(request)
    try:
        check_form_text(to=draft["to"])  # before getaddresses reads a line break as a comma
        to = [formataddr(pair) for pair in getaddresses([draft["to"]]) if pair[1]]
        await context.call(
            context.service.compose, session.user, to, draft["subject"], draft["body"],
            via_desktop, reply,
        )  # fmt: skip
    except (OutgoingRefused, NoSuchMessage) as exc:
        values = {"draft": draft, "csrf": session.csrf, "error": str(exc) or "no such message"}
        return _render("compose.html", request, values, 400)
    raise web.HTTPSeeOther("/outbox")


@routes.post("/sync")
async def sync(request: web.Request) -> web.Response:
    session = _session(request)
    await _form(request, session)
    context = context_of(request)
    await context.call(context.service.request_sync, session.user)
    raise web.HTTPSeeOther("/inbox")


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``mailbox`` whenever the user's mailbox changed since the
    page's ``since`` mark (a change between rendering and connecting counts too). The
    process's :class:`..notify.ChangeFeed` (``PRAGMA data_version``, the push notifier's
    watch too) says when to look: any commit by SMTP in, a sync, the CLI or this page."""
    session = _session(request)
    context = context_of(request)
    if context.streams[session.user] >= MAX_STREAMS_PER_USER:
        raise web.HTTPTooManyRequests(reason="too many open pages: close some")
    context.streams[session.user] += 1
    try:
        return await _stream(request, context, session)
    finally:
        context.streams[session.user] -= 1
        if not context.streams[session.user]:
            del context.streams[session.user]


async def _stream(
    request: web.Request, context: WebContext, session: Session
) -> web.StreamResponse:
    response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
    await response.prepare(request)
    seen, last = context.feed.version, request.query.get("since")  # the page's mark
    quiet = False  # the last wait ended without a change
    with contextlib.suppress(ConnectionResetError):  # the page went away
        while _still_open(request, context) and session_of(request, context.sessions):
            mark = (await _overview(context, session.user))["mark"]
            if mark != last:
                await response.write(b"event: mailbox\ndata: changed\n\n")
            elif quiet:  # keep proxies from closing a quiet stream
                await response.write(b": still here\n\n")
            last, before = mark, seen
            seen = await _next_change(request, context, seen)
            quiet = seen == before
    return response


def _still_open(request: web.Request, context: WebContext) -> bool:
    transport = request.transport
    return not context.closing.is_set() and transport is not None and not transport.is_closing()


async def _next_change(request: web.Request, context: WebContext, seen: int) -> int:
    """The feed's version once past ``seen``, or ``seen`` after the keep-alive time or
    when the stream must end. Looks every second whether the page is still there:
    aiohttp does not cancel the handler of a client that went, and a closed page must
    free its place among the user's streams."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KEEPALIVE_SECONDS
    while _still_open(request, context) and (left := deadline - loop.time()) > 0:
        version = await context.feed.wait(seen, min(GONE_CHECK_SECONDS, left))
        if version != seen:
            return version
    return seen
