"""The phone's mail application: a mobile web page and a JSON API over HTTPS.

``server run`` starts :class:`WebListener` on ``[server] web_listen`` in its own event
loop, beside the sync, SMTP and submission listeners (aiohttp's ``AppRunner`` and
``TCPSite``). Page (:mod:`.pages`), API (:mod:`.api`) and the ``phone`` CLI share the
:class:`~imapsync_bridge.server.phone.PhoneService`; passwords are checked by the
process's one :class:`~imapsync_bridge.server.credentials.Logins` (one throttle with
SMTP submission). docs/web.md describes the routes, the security and the choices.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from imapsync_bridge.config import ServerConfig
from imapsync_bridge.errors import ConfigError
from imapsync_bridge.protocol import pki
from imapsync_bridge.server.credentials import Logins
from imapsync_bridge.server.listener import SyncListener
from imapsync_bridge.server.notify import ChangeFeed
from imapsync_bridge.server.outgoing_mail import Relay
from imapsync_bridge.server.phone import PhoneService
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.web import api, pages
from imapsync_bridge.server.web.context import CONTEXT, WebContext
from imapsync_bridge.server.web.security import Sessions, same_site_writes, security_headers

HERE = Path(__file__).parent


def web_tls_context(config: ServerConfig) -> ssl.SSLContext:
    """``[server] web_cert``/``web_key`` (a certificate browsers trust), else the server
    certificate of ``server init``. TLS 1.2 and up: what browsers speak."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = config.web_cert, config.web_key
    if cert is None or key is None:
        cert, key = config.data_dir / pki.SERVER_CRT, config.data_dir / pki.SERVER_KEY
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{config.path}: [server] web_cert/web_key: cannot load {cert} with {key}: {exc}"
        ) from None
    return context


def when(iso: str | None) -> str:
    """An ISO 8601 UTC time as the list shows it: ``06 Dec 22:57``."""
    if not iso:
        return "never"
    return f"{iso[8:10]} {_MONTHS[int(iso[5:7]) - 1]} {iso[11:16]}" if len(iso) >= 16 else iso


def display_name(sender: str) -> str:
    """The name of ``Name <address>``, else the address: what a list of mail shows.
    (A plain split: ``email.utils.parseaddr`` cost a third of a 500-row page.)"""
    name, _, address = sender.rpartition("<")
    return name.strip().strip('"').strip() or address.rstrip().rstrip(">").strip() or sender


_BIDI_CONTROLS = dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def without_bidi_controls(value: Any) -> Any:
    """Every value a template shows, as text without bidi embeddings, overrides and
    isolates: U+202E would make ``invoice<RLO>fdp.exe`` read ``invoiceexe.pdf``.
    Sanitized mail markup is left as it is."""
    return value.translate(_BIDI_CONTROLS) if type(value) is str else value


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def make_app(context: WebContext, max_body: int) -> web.Application:
    app = web.Application(
        middlewares=[security_headers, api.json_errors, pages.page_errors, same_site_writes],
        client_max_size=max_body,
    )
    app[CONTEXT] = context
    environment = aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
    )
    environment.finalize = without_bidi_controls
    environment.filters["when"] = when
    environment.filters["name"] = display_name
    app.add_routes(api.routes)
    app.add_routes(pages.routes)
    app.router.add_static("/static", HERE / "static")
    return app


class WebListener:
    """The Listener (see :class:`..app.Listener`) of the page and the API."""

    def __init__(
        self,
        config: ServerConfig,
        store: PhoneStore,
        logins: Logins,
        listeners: Mapping[str, Any],
        changes: ChangeFeed,
    ) -> None:
        """``listeners``: the process's, by name (who is connected is the sync
        listener's to say); ``changes``: the process's watch on the store."""
        relay = Relay(config.relay, config.hostname) if config.relay is not None else None
        service = PhoneService(store, relay, max_message_size=config.max_message_size)

        def agent_connected(user: str) -> bool:
            sync = listeners.get("sync")
            return isinstance(sync, SyncListener) and sync.connected(user) > 0

        self.context = WebContext(
            service, logins, Sessions(), changes, agent_connected, asyncio.Event()
        )
        self.app = make_app(self.context, config.max_message_size + 64 * 1024)
        self.tls = web_tls_context(config)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.tls)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        self.context.closing.set()
        self.context.feed.wake()  # the open event streams see it and end
        if self._runner is not None:
            await self._runner.cleanup()
