"""Server commands: init a data directory, add users, issue pairing codes, run."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from imapsync_bridge.config import ServerConfig
from imapsync_bridge.errors import ConfigError
from imapsync_bridge.protocol import pki
from imapsync_bridge.server.listener import FrameObserver, SyncListener
from imapsync_bridge.server.store import PhoneStore

log = logging.getLogger(__name__)

SERVER_INI = """\
# imapsync-bridge hosted server; every option is described in config.example.ini
[server]
data_dir = .
hostname = {hostname}
sync_listen = {listen_host}:{sync_port}
smtp_listen = {listen_host}:2525
submission_listen = {listen_host}:2587
web_listen = {listen_host}:8443
default_window = 50
max_frame = 67108864

[relay]
host = localhost
port = 25
security = none
username =
password_file =
"""


def init_server(data_dir: Path, hostname: str, sync_port: int = 4465) -> Path:
    """Create the CA, the server certificate, the store and a working server.ini."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ini = data_dir / "server.ini"
    if ini.exists():
        raise ConfigError(f"{ini} already exists; refusing to make a new CA over it")
    pki.init_ca(data_dir, hostname)
    PhoneStore(data_dir / "phone.sqlite3").close()
    listen_host = "127.0.0.1" if hostname in ("localhost", "127.0.0.1") else "0.0.0.0"
    ini.write_text(
        SERVER_INI.format(hostname=hostname, listen_host=listen_host, sync_port=sync_port)
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


async def serve(
    config: ServerConfig,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[int], None] | None = None,
    observer: FrameObserver | None = None,
) -> None:
    """Run the sync listener until ``stop`` is set, or else until SIGTERM or SIGINT."""
    store = open_store(config)
    listener = SyncListener(store, config.data_dir, config.max_frame, observer)
    host, port = config.sync_listen
    server = await listener.start(host, port)
    bound = server.sockets[0].getsockname()
    log.info("sync listener on %s:%s", bound[0], bound[1])
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    if on_listening is not None:
        on_listening(bound[1])
    try:
        await stop.wait()
    finally:
        server.close()
        await listener.close_sessions()
        await server.wait_closed()
        store.close()
        log.info("server stopped")
