"""The JSON API under ``/api/`` (DESIGN.md "The phone's web page and JSON API").

Each handler authenticates (:func:`.security.api_user`), calls one
:class:`~imapsync_bridge.server.phone.PhoneService` method in a worker thread and
answers with the result's ``as_json()``: the same documents as ``phone list --json``.
Errors are ``{"error": "..."}`` with 400 (malformed body, refused mail), 401, 403, 404
(unknown id or another user's: the same answer), 429.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from imapsync_bridge.server.phone import VERBS, NoSuchMessage, OutgoingRefused
from imapsync_bridge.server.web.context import context_of
from imapsync_bridge.server.web.security import ID, Handler, api_user

routes = web.RouteTableDef()


async def _user(request: web.Request) -> str:
    context = context_of(request)
    return await api_user(request, context.sessions, context.logins)


@routes.get("/api/mailbox")
async def mailbox(request: web.Request) -> web.Response:
    user = await _user(request)
    context = context_of(request)
    return web.json_response((await context.call(context.service.list, user)).as_json())


@routes.get(f"/api/messages/{ID}")
async def message(request: web.Request) -> web.Response:
    user = await _user(request)
    context = context_of(request)
    detail = await context.call(context.service.show, user, int(request.match_info["id"]))
    return web.json_response(detail.as_json())


@routes.post(f"/api/messages/{ID}/{{verb}}")
async def change(request: web.Request) -> web.Response:
    user = await _user(request)
    verb = request.match_info["verb"]
    if verb not in VERBS:
        raise web.HTTPNotFound(reason=f"unknown action {verb!r}: one of {', '.join(VERBS)}")
    context = context_of(request)
    result = await context.call(context.service.change, user, verb, int(request.match_info["id"]))
    return web.json_response(result.as_json())


def _compose_fields(body: Any) -> tuple[list[str], str, str, bool, int | None]:
    """The checked fields of a compose request; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    to, subject, text = body.get("to"), body.get("subject", ""), body.get("body", "")
    via, reply = body.get("via_desktop", False), body.get("in_reply_to")
    if not isinstance(to, list) or not all(isinstance(a, str) and a.strip() for a in to):
        raise ValueError("to must be a list of addresses")
    if not isinstance(subject, str) or not isinstance(text, str):
        raise ValueError("subject and body must be strings")
    if not isinstance(via, bool):
        raise ValueError("via_desktop must be true or false")
    if reply is not None and (
        isinstance(reply, bool) or not isinstance(reply, int) or not 0 < reply < 2**63
    ):
        raise ValueError("in_reply_to must be a message id")
    return [a.strip() for a in to], subject, text, via, reply


@routes.post("/api/compose")
async def compose(request: web.Request) -> web.Response:
    user = await _user(request)
    try:
        fields = _compose_fields(json.loads(await request.read()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(reason=str(exc).splitlines()[0][:200]) from None
    except RecursionError:  # json's parser is recursive: "[[[[..." would be a 500
        raise web.HTTPBadRequest(reason="the JSON body is nested too deeply") from None
    context = context_of(request)
    item = await context.call(context.service.compose, user, *fields)
    return web.json_response(item.as_json(), status=201)


@routes.post("/api/sync")
async def sync(request: web.Request) -> web.Response:
    user = await _user(request)
    context = context_of(request)
    requested = await context.call(context.service.request_sync, user)
    return web.json_response({"requested_at": requested.requested_at}, status=202)


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    user = await _user(request)
    context = context_of(request)
    found = await context.call(context.service.status, user)
    return web.json_response({**found.as_json(), "agent_connected": context.agent_connected(user)})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /api/: every error as ``{"error": ...}``; service errors mapped to codes."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except NoSuchMessage:
        return web.json_response({"error": "no such message"}, status=404)
    except OutgoingRefused as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = ("WWW-Authenticate", "Retry-After")
        headers = {k: v for k, v in exc.headers.items() if k in kept}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
