"""Server commands: init a data directory, add users, issue pairing codes, run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from imapsync_bridge.config import ServerConfig
from imapsync_bridge.errors import BridgeError, ConfigError
from imapsync_bridge.protocol import pki
from imapsync_bridge.sdnotify import Notifier
from imapsync_bridge.server.credentials import Logins
from imapsync_bridge.server.listener import SyncListener
from imapsync_bridge.server.notify import ChangeFeed, ChangeNotifier, MailTrigger
from imapsync_bridge.server.outgoing_mail import Relay
from imapsync_bridge.server.smtp_in import SmtpInListener, starttls_context
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.submission import SubmissionListener
from imapsync_bridge.server.trigger_mail import send_trigger_mail

log = logging.getLogger(__name__)

SERVER_INI = """\
# imapsync-bridge hosted server; every option is described in server.example.ini
[server]
data_dir = .
hostname = {hostname}
sync_listen = {listen_host}:{sync_port}
smtp_listen = {listen_host}:{smtp_port}
submission_listen = {listen_host}:{submission_port}
web_listen = {listen_host}:{web_port}
default_window = 50
max_frame = 67108864

[relay]
host = localhost
port = 25
security = none
username =
password_file =
"""


def init_server(
    data_dir: Path,
    hostname: str,
    sync_port: int = 4465,
    smtp_port: int = 2525,
    submission_port: int = 2587,
    web_port: int = 8443,
) -> Path:
    """Create the CA, the server certificate, the store and a working server.ini
    (port 0: any free port, for tests)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ini = data_dir / "server.ini"
    if ini.exists():
        raise ConfigError(f"{ini} already exists; refusing to make a new CA over it")
    pki.init_ca(data_dir, hostname)
    PhoneStore(data_dir / "phone.sqlite3").close()
    listen_host = "127.0.0.1" if hostname in ("localhost", "127.0.0.1") else "0.0.0.0"
    ini.write_text(
        SERVER_INI.format(
            hostname=hostname,
            listen_host=listen_host,
            sync_port=sync_port,
            smtp_port=smtp_port,
            submission_port=submission_port,
            web_port=web_port,
        )
    )
    return ini


def new_pairing_code(config: ServerConfig, store: PhoneStore, user: str) -> str:
    """A fresh one-time code for ``user``; it names our CA so the agent can check us."""
    store.get_user(user)
    fingerprint = pki.ca_fingerprint((config.data_dir / pki.CA_CRT).read_bytes())
    code, token_hash = pki.make_pairing_code(fingerprint)
    store.set_pairing_code(user, token_hash)
    return code


def open_store(config: ServerConfig) -> PhoneStore:
    if not config.database.parent.is_dir():
        raise ConfigError(f"{config.path}: data_dir {config.data_dir} does not exist")
    return PhoneStore(config.database)


class Listener(Protocol):
    """What the composition root runs: one network listener over the shared store."""

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: any free one); return the bound port."""
        ...

    async def close(self) -> None:
        """Stop listening and end the open connections."""
        ...


@dataclass(frozen=True)
class Shared:
    """What the listeners of one server process share: the store, and the password
    checks behind the process's one throttle (submission; the web page and API later),
    so bad passwords count together whichever door they come through."""

    store: PhoneStore
    logins: Logins
    changes: ChangeFeed  # the process's one watch on the database (notifier, live page)
    # the listeners started so far, by name (the web page asks "sync" who is connected)
    listeners: dict[str, Listener] = field(default_factory=dict)


@dataclass(frozen=True)
class ListenerEntry:
    """One listener ``serve`` may start: its name, where the config says it listens
    (None: off) and how to make it over what the listeners share."""

    name: str
    address: Callable[[ServerConfig], tuple[str, int] | None]
    make: Callable[[ServerConfig, Shared], Listener]


def _sync_listener(config: ServerConfig, shared: Shared) -> Listener:
    return SyncListener(shared.store, config.data_dir, config.max_frame)


def _smtp_in_listener(config: ServerConfig, shared: Shared) -> Listener:
    return SmtpInListener(
        shared.store,
        hostname=config.hostname,
        max_message_size=config.max_message_size,
        max_unsynced=config.max_unsynced,
        tls_context=starttls_context(config.data_dir),
    )


def _submission_listener(config: ServerConfig, shared: Shared) -> Listener:
    return SubmissionListener(
        shared.store,
        shared.logins,
        hostname=config.hostname,
        max_message_size=config.max_message_size,
        tls_context=starttls_context(config.data_dir),
        relay=Relay(config.relay, config.hostname) if config.relay is not None else None,
    )


def _web_listener(config: ServerConfig, shared: Shared) -> Listener:
    from imapsync_bridge.server.web import WebListener  # aiohttp: only when it is on

    return WebListener(config, shared.store, shared.logins, shared.listeners, shared.changes)


# The listeners `server run` starts, in order; the web page and submission share
# ``Shared.logins`` (one throttle).
LISTENERS: tuple[ListenerEntry, ...] = (
    ListenerEntry("sync", lambda config: config.sync_listen, _sync_listener),
    ListenerEntry("smtp", lambda config: config.smtp_listen, _smtp_in_listener),
    ListenerEntry("submission", lambda config: config.submission_listen, _submission_listener),
    ListenerEntry("web", lambda config: config.web_listen, _web_listener),
)


def mail_trigger(config: ServerConfig, store: PhoneStore) -> MailTrigger | None:
    """How the notifier mails a user's trigger through ``[relay]`` (None without one)."""
    relay = config.relay
    if relay is None:
        return None

    def send(user: str) -> None:
        secret = store.trigger_secret(user)
        if secret is None:
            raise ConfigError(f"{user} has no sync phrase yet: pair the agent again")
        record = store.get_user(user)
        phrase, key = secret
        send_trigger_mail(
            relay, user=user, sender=record.address, to=record.desktop_address,
            phrase=phrase, key=key,
        )  # fmt: skip

    async def mail(user: str) -> None:
        await asyncio.to_thread(send, user)

    return mail


RELAY_POLL = 1.0  # seconds between looks for due send-now messages


async def relay_worker(config: ServerConfig, store: PhoneStore, poll: float = RELAY_POLL) -> None:
    """Send due send-now messages through ``[relay]``: those a front end queued without
    sending, and deferred ones whose backoff ran out. The claim in the store keeps two
    processes from sending one message twice."""
    assert config.relay is not None
    relay = Relay(config.relay, config.hostname)
    while True:
        try:
            await asyncio.to_thread(relay.send_due, store)
        except BridgeError as exc:
            log.warning("relay: %s", exc)
        await asyncio.sleep(poll)


async def _ping_watchdog(notifier: Notifier, every: float) -> None:
    """Runs on the event loop: a loop that stops turning stops the pings."""
    while True:
        notifier.ping()
        await asyncio.sleep(every)


@dataclass
class Running:
    """What ``serve`` started, handed to its ``ready`` callback (on the event loop)."""

    store: PhoneStore
    stop: asyncio.Event
    logins: Logins
    listeners: dict[str, Listener] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def sync(self) -> SyncListener:
        listener = self.listeners["sync"]
        assert isinstance(listener, SyncListener)
        return listener


async def serve(
    config: ServerConfig,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[Running], None] | None = None,
    entries: Sequence[ListenerEntry] = LISTENERS,
    systemd: Notifier | None = None,
) -> None:
    """Start every listener the config enables, over one store, and run until ``stop`` is
    set (without one: until SIGTERM or SIGINT). ``ready`` is called once all of them
    listen; a listener that fails to start stops the ones already started. Under systemd
    (``Type=notify``) ``systemd`` says READY=1 then, and the event loop pings the
    watchdog."""
    systemd = systemd or Notifier.from_environment()
    store = open_store(config)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    shared = Shared(store, Logins(store), ChangeFeed(config.database))
    running = Running(store, stop, shared.logins, shared.listeners)
    notifier: ChangeNotifier | None = None
    relaying: asyncio.Task[None] | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        await shared.changes.start()
        for entry in entries:
            address = entry.address(config)
            if address is None:
                continue
            listener = entry.make(config, shared)
            try:
                running.ports[entry.name] = await listener.start(*address)
            except OSError as exc:  # e.g. the port is taken: one line, not a traceback
                where = f"{address[0]}:{address[1]}"
                raise BridgeError(
                    f"{entry.name} listener: cannot listen on {where}: {exc}"
                ) from None
            running.listeners[entry.name] = listener
            log.info("%s listener on %s:%s", entry.name, address[0], running.ports[entry.name])
        if "sync" in running.listeners:
            notifier = ChangeNotifier(
                config.database, store, running.sync, mail_trigger(config, store),
                shared.changes,
            )  # fmt: skip
            await notifier.start()
        if config.relay is not None:
            relaying = asyncio.create_task(relay_worker(config, store))
        if ready is not None:
            ready(running)
        systemd.ready(", ".join(f"{name} on {port}" for name, port in running.ports.items()))
        if systemd.ping_every is not None:
            watchdog = asyncio.create_task(_ping_watchdog(systemd, systemd.ping_every))
        await stop.wait()
    finally:
        systemd.stopping()
        for task in (relaying, watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if notifier is not None:
            await notifier.close()
        for listener in reversed(running.listeners.values()):
            await listener.close()
        await shared.changes.close()
        store.close()
        log.info("server stopped")
