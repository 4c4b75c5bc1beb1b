"""INI configuration of the agent and the server: load, validate, look up secrets.

Every problem is a :class:`ConfigError` with one line naming the file, section and key,
so the CLI can print it and exit with status 2.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from imapsync_bridge.errors import ConfigError

SECURITY_MODES = ("tls", "starttls", "none")
KEYRING_SERVICE = "imapsync-bridge"


def is_loopback(host: str) -> bool:
    """True when *host* is a loopback address, or a name that resolves only to them."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name.rstrip(".").lower() != "localhost":
        return False
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def parse_host_port(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


class _Section:
    """Typed reads from one INI section, with errors that name the file and key."""

    def __init__(self, parser: configparser.ConfigParser, path: Path, name: str) -> None:
        if not parser.has_section(name):
            raise ConfigError(f"{path}: missing section [{name}]")
        self._section = parser[name]
        self._where = f"{path}: [{name}]"

    def text(self, key: str, default: str | None = None) -> str:
        value = self._section.get(key, default)
        if value is None:
            raise ConfigError(f"{self._where} {key} is required")
        return value.strip()

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        raw = self.text(key, str(default))
        if not raw.lstrip("-").isdigit() or int(raw) < minimum:
            raise ConfigError(f"{self._where} {key} must be an integer >= {minimum}, got {raw!r}")
        return int(raw)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        raw = self.text(key, str(default))
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise ConfigError(f"{self._where} {key} must be a number in [{low}, {high}]")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        try:
            return self._section.getboolean(key, default)
        except ValueError:
            raise ConfigError(f"{self._where} {key} must be true or false") from None

    def host_port(self, key: str) -> tuple[str, int]:
        return parse_host_port(self.text(key), f"{self._where} {key}")

    def security(self, host: str) -> str:
        mode = self.text("security", "tls").lower()
        if mode not in SECURITY_MODES:
            raise ConfigError(f"{self._where} security must be one of {', '.join(SECURITY_MODES)}")
        if mode == "none" and not is_loopback(host):
            raise ConfigError(
                f"{self._where} security = none is only allowed for a loopback host, not {host!r}"
            )
        return mode


def _read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: unreadable configuration: {first_line}") from None
    return parser


@dataclass(frozen=True)
class MailServer:
    """Where and how to reach the corporate IMAP or SMTP server."""

    role: str  # "imap" or "smtp": names the secret
    host: str
    port: int
    security: str
    username: str
    password_file: Path | None

    def password(self) -> str | None:
        """The secret, from the password file, the keyring or systemd credentials."""
        if not self.username:
            return None
        return lookup_secret(self.role, self.username, self.host, self.password_file)


@dataclass(frozen=True)
class ImapSettings:
    server: MailServer
    mailbox: str
    trash: str
    sent: str
    outbox: str


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    state_dir: Path
    server: tuple[str, int]
    server_timeout: int
    sync_interval: int
    idle: bool
    sync_on_change: bool
    poll_interval: int
    mass_delete_share: float
    max_message_size: int
    imap: ImapSettings
    smtp: MailServer | None
    trigger_max_age: int
    trigger_min_interval: int


def _mail_server(parser: configparser.ConfigParser, path: Path, role: str, port: int) -> MailServer:
    section = _Section(parser, path, role)
    host = section.text("host")
    password_file = section.text("password_file", "")
    return MailServer(
        role=role,
        host=host,
        port=section.integer("port", port, minimum=1),
        security=section.security(host),
        username=section.text("username", ""),
        password_file=(path.parent / password_file) if password_file else None,
    )


def load_agent_config(path: Path) -> AgentConfig:
    parser = _read(path)
    agent = _Section(parser, path, "agent")
    imap_section = _Section(parser, path, "imap")
    imap_server = _mail_server(parser, path, "imap", 993)
    smtp = _mail_server(parser, path, "smtp", 587) if parser.has_section("smtp") else None
    trigger = _Section(parser, path, "trigger") if parser.has_section("trigger") else None
    return AgentConfig(
        path=path,
        state_dir=path.parent / agent.text("state_dir"),
        server=agent.host_port("server"),
        server_timeout=agent.integer("server_timeout", 60, minimum=1),
        sync_interval=agent.integer("sync_interval", 300, minimum=10),
        idle=agent.boolean("idle", True),
        sync_on_change=agent.boolean("sync_on_change", True),
        poll_interval=agent.integer("poll_interval", 60, minimum=5),
        mass_delete_share=agent.number("mass_delete_share", 0.5, 0.0, 1.0),
        max_message_size=agent.integer("max_message_size", 25 * 1024 * 1024, minimum=1024),
        imap=ImapSettings(
            server=imap_server,
            mailbox=imap_section.text("mailbox", "INBOX") or "INBOX",
            trash=imap_section.text("trash", ""),
            sent=imap_section.text("sent", ""),
            outbox=imap_section.text("outbox", ""),
        ),
        smtp=smtp,
        trigger_max_age=trigger.integer("max_age", 900, minimum=1) if trigger else 900,
        trigger_min_interval=trigger.integer("min_interval", 30) if trigger else 30,
    )


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    data_dir: Path
    hostname: str
    sync_listen: tuple[str, int]
    default_window: int
    max_frame: int
    database: Path


def load_server_config(path: Path) -> ServerConfig:
    parser = _read(path)
    server = _Section(parser, path, "server")
    data_dir = path.parent / server.text("data_dir")
    return ServerConfig(
        path=path,
        data_dir=data_dir,
        hostname=server.text("hostname"),
        sync_listen=server.host_port("sync_listen"),
        default_window=server.integer("default_window", 50, minimum=1),
        max_frame=server.integer("max_frame", 64 * 1024 * 1024, minimum=4096),
        database=data_dir / "phone.sqlite3",
    )


def read_password_file(path: Path) -> str:
    """First line of a file only its owner can read (0600); else a ConfigError."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: password file is readable by group or others; chmod 600 it")
        with path.open(encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read password file: {exc.strerror}") from None


def keyring_account(role: str, username: str, host: str) -> str:
    return f"{role}:{username}@{host}"


def lookup_secret(role: str, username: str, host: str, password_file: Path | None) -> str:
    """Password file, else the OS keyring, else ``$CREDENTIALS_DIRECTORY/<role>``."""
    if password_file is not None:
        return read_password_file(password_file)
    secret = _keyring_secret(role, username, host)
    if secret is not None:
        return secret
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / role).exists():
        return read_password_file(Path(credentials) / role)
    raise ConfigError(
        f"no {role} password for {username}@{host}: set password_file in [{role}], "
        f"run `imapsync-bridge set-password {role}`, or pass a systemd credential named {role}"
    )


def _keyring_secret(role: str, username: str, host: str) -> str | None:
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:  # pragma: no cover - keyring is a declared dependency
        return None
    try:
        return keyring.get_password(KEYRING_SERVICE, keyring_account(role, username, host))
    except (KeyringError, RuntimeError):
        return None
