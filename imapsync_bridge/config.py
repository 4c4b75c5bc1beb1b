"""INI configuration of the agent and the server: load, validate, look up secrets.

Every problem is a :class:`ConfigError` with one line naming the file, section and key,
so the CLI can print it and exit with status 2.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import socket
import stat
import urllib.parse
from dataclasses import dataclass, field
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


# Every key each file may hold: DESIGN.md's configuration contract, plus what the code
# reads (server_timeout, mass_delete_share, max_message_size, max_frame). Keys a later
# version reads (IDLE, OAuth2, triggers, the phone's listeners, the relay) are accepted and
# checked for type now, so a configuration written for the documented contract loads.
_MAIL_KEYS = frozenset(
    {
        "host",
        "port",
        "security",
        "username",
        "password_file",
        "auth",
        "oauth2_provider",
        "client_id",
        "tenant",
        "device_authorization_endpoint",
        "token_endpoint",
        "scopes",
        "oauth2_flow",
        "client_secret",
        "authorization_endpoint",
    }
)
AGENT_KEYS: dict[str, frozenset[str]] = {
    "agent": frozenset(
        {
            "state_dir",
            "server",
            "server_timeout",
            "sync_interval",
            "idle",
            "sync_on_change",
            "poll_interval",
            "mass_delete_share",
            "max_message_size",
        }
    ),
    "imap": _MAIL_KEYS | {"mailbox", "trash", "sent", "outbox"},
    "smtp": _MAIL_KEYS | {"from_address"},
    "trigger": frozenset({"max_age", "min_interval"}),
}
SERVER_KEYS: dict[str, frozenset[str]] = {
    "server": frozenset(
        {
            "data_dir",
            "hostname",
            "sync_listen",
            "smtp_listen",
            "submission_listen",
            "web_listen",
            "web_cert",
            "web_key",
            "default_window",
            "max_frame",
            "max_message_size",
            "max_unsynced",
        }
    ),
    "relay": frozenset({"host", "port", "security", "username", "password_file"}),
}
AUTH_MODES = ("password", "oauth2")
OAUTH2_PROVIDERS = ("microsoft", "google", "generic")
OAUTH2_FLOWS = ("device", "browser")  # RFC 8628, or RFC 8252's loopback redirect
# configparser's [DEFAULT] would copy its keys into every section; make it an ordinary
# (and therefore unknown) section instead, so every key is checked where it is written.
_NO_DEFAULT_SECTION = "\x00no default section"


def _check_keys(
    parser: configparser.ConfigParser, path: Path, known: dict[str, frozenset[str]]
) -> None:
    """ConfigError for the first unknown section, unknown key or password in clear."""
    for name in parser.sections():
        if name not in known:
            expected = ", ".join(f"[{n}]" for n in known)
            raise ConfigError(f"{path}: unknown section [{name}] (expected {expected})")
        for key in parser[name]:
            if key == "password" and "password_file" in known[name]:
                keyring = (
                    f"`imapsync-bridge set-password --config {path.name} {name}` (the keyring), "
                    if name in ("imap", "smtp")
                    else ""
                )
                raise ConfigError(
                    f"{path}: [{name}] password: a password is never read from the INI file; "
                    f"use password_file (mode 0600), {keyring}or a systemd credential named "
                    f"{name}"
                )
            if key not in known[name]:
                close = difflib.get_close_matches(key, sorted(known[name]), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{path}: [{name}] {key}: unknown key{hint}")


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

    def listen(self, key: str) -> tuple[str, int] | None:
        """host:port of a listener, or None when the key is empty or absent (= off)."""
        raw = self.text(key, "")
        return parse_host_port(raw, f"{self._where} {key}") if raw else None

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default).lower() or default
        if value not in choices:
            raise ConfigError(
                f"{self._where} {key} must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def url(self, key: str) -> str:
        """An http(s) URL with a host, or "" when the key is empty or absent."""
        raw = self.text(key, "")
        if raw:
            parts = urllib.parse.urlsplit(raw)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ConfigError(f"{self._where} {key} must be an https:// URL, got {raw!r}")
        return raw

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
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
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
class OAuth2Settings:
    """``auth = oauth2`` in [imap] or [smtp]: where the device sign-in goes, and where
    the agent keeps the grant (docs/oauth2.md)."""

    provider: str
    client_id: str
    tenant: str
    device_authorization_endpoint: str
    token_endpoint: str
    scopes: str
    state_dir: Path = Path()  # the token file and its lock live here
    config_path: Path = Path()  # named in "run `agent login`" errors
    flow: str = "device"  # how `agent login` signs in: device or browser
    # An installed app's "secret" (Google's Desktop clients): not confidential, yet kept
    # out of every repr, log and message all the same.
    client_secret: str = field(default="", repr=False)
    authorization_endpoint: str = ""  # the browser flow's; built in for microsoft, google


@dataclass(frozen=True)
class MailServer:
    """Where and how to reach the corporate IMAP or SMTP server (or the server's relay)."""

    role: str  # "imap", "smtp" or "relay": names the secret
    host: str
    port: int
    security: str
    username: str
    password_file: Path | None
    auth: str = "password"
    oauth2: OAuth2Settings | None = None

    def password(self) -> str | None:
        """The secret, from the password file, the keyring or systemd credentials."""
        if not self.username or self.auth == "oauth2":
            return None  # OAuth2 logs in with an access token: imapsync_bridge.oauth2
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
    smtp_from_address: str = ""


def _check_password_file(where: str, password_file: Path) -> None:
    """A password file that exists must be private: checked at load, not at first use.

    A missing file is reported when the password is needed (``agent status`` works
    without one).
    """
    try:
        mode = password_file.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{where} password_file {password_file}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{where} password_file {password_file} is readable by group or others; chmod 600 it"
        )


def _oauth2_settings(
    section: _Section, path: Path, role: str, state_dir: Path, used: bool
) -> OAuth2Settings:
    """The OAuth2 keys, checked for type always; when ``auth = oauth2`` (*used*) also a
    client id, for ``generic`` its endpoints and scopes, and plain-http endpoints only on
    loopback (a test or a local proxy)."""
    where = f"{path}: [{role}]"
    provider = section.choice("oauth2_provider", OAUTH2_PROVIDERS, "generic")
    settings = OAuth2Settings(
        provider=provider,
        client_id=section.text("client_id", ""),
        tenant=section.text("tenant", ""),
        device_authorization_endpoint=section.url("device_authorization_endpoint"),
        token_endpoint=section.url("token_endpoint"),
        scopes=section.text("scopes", ""),
        state_dir=state_dir,
        config_path=path,
        # Google's device flow will not grant the mail scope: its default is the browser.
        flow=section.choice(
            "oauth2_flow", OAUTH2_FLOWS, "browser" if provider == "google" else "device"
        ),
        client_secret=section.text("client_secret", ""),
        authorization_endpoint=section.url("authorization_endpoint"),
    )
    if not used:
        return settings
    needed = ["client_id"]
    if settings.provider == "google":
        needed.append("client_secret")  # Google's token endpoint wants it
    if settings.provider == "generic":
        browser = settings.flow == "browser"
        needed.append("authorization_endpoint" if browser else "device_authorization_endpoint")
        needed += ["token_endpoint", "scopes"]
    for key in needed:
        if not getattr(settings, key):
            raise ConfigError(
                f"{where} auth = oauth2 with oauth2_provider = {settings.provider} needs {key} "
                "(docs/oauth2.md says where to find it)"
            )
    for key in ("device_authorization_endpoint", "token_endpoint", "authorization_endpoint"):
        url = urllib.parse.urlsplit(getattr(settings, key))
        if url.scheme == "http" and not is_loopback(url.hostname or ""):
            raise ConfigError(f"{where} {key} must be an https:// URL (http only on loopback)")
    if not section.text("username", ""):
        raise ConfigError(f"{where} auth = oauth2 needs username (the account to sign in as)")
    return settings


def _mail_server(
    parser: configparser.ConfigParser,
    path: Path,
    role: str,
    port: int,
    *,
    oauth2: bool = True,
    state_dir: Path = Path(),
) -> MailServer:
    section = _Section(parser, path, role)
    host = section.text("host")
    password_file = section.text("password_file", "")
    resolved = (path.parent / password_file) if password_file else None
    if resolved is not None:
        _check_password_file(f"{path}: [{role}]", resolved)
    auth = section.choice("auth", AUTH_MODES, "password") if oauth2 else "password"
    oauth2_settings = None
    if oauth2:
        oauth2_settings = _oauth2_settings(section, path, role, state_dir, auth == "oauth2")
    return MailServer(
        role=role,
        host=host,
        port=section.integer("port", port, minimum=1),
        security=section.security(host),
        username=section.text("username", ""),
        password_file=resolved,
        auth=auth,
        oauth2=oauth2_settings if auth == "oauth2" else None,
    )


def load_agent_config(path: Path) -> AgentConfig:
    """Read and check agent.ini; the first problem is a one-line ConfigError."""
    parser = _read(path)
    _check_keys(parser, path, AGENT_KEYS)
    agent = _Section(parser, path, "agent")
    imap_section = _Section(parser, path, "imap")
    state_dir = path.parent / agent.text("state_dir")
    imap_server = _mail_server(parser, path, "imap", 993, state_dir=state_dir)
    smtp = (
        _mail_server(parser, path, "smtp", 587, state_dir=state_dir)
        if parser.has_section("smtp")
        else None
    )
    from_address = _Section(parser, path, "smtp").text("from_address", "") if smtp else ""
    if from_address and "@" not in from_address:
        raise ConfigError(
            f"{path}: [smtp] from_address must be a mail address, got {from_address!r}"
        )
    trigger = _Section(parser, path, "trigger") if parser.has_section("trigger") else None
    return AgentConfig(
        path=path,
        state_dir=state_dir,
        server=agent.host_port("server"),
        server_timeout=agent.integer("server_timeout", 60, minimum=1),
        sync_interval=agent.integer("sync_interval", 300, minimum=1),
        idle=agent.boolean("idle", True),
        sync_on_change=agent.boolean("sync_on_change", True),
        poll_interval=agent.integer("poll_interval", 60, minimum=1),
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
        smtp_from_address=from_address,
    )


@dataclass(frozen=True)
class ServerConfig:
    """server.ini: every key ``server init`` writes (listeners empty = off)."""

    path: Path
    data_dir: Path
    hostname: str
    sync_listen: tuple[str, int]
    default_window: int
    max_frame: int
    database: Path
    smtp_listen: tuple[str, int] | None = None
    submission_listen: tuple[str, int] | None = None
    web_listen: tuple[str, int] | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_unsynced: int = 1000
    relay: MailServer | None = None
    # The web page's certificate chain and key (e.g. certbot's fullchain.pem, privkey.pem);
    # None: the server certificate of ``server init`` (signed by its private CA).
    web_cert: Path | None = None
    web_key: Path | None = None


def _web_certificate(server: _Section, path: Path) -> tuple[Path | None, Path | None]:
    """``[server] web_cert`` and ``web_key``: both or neither, files that exist."""
    cert, key = server.text("web_cert", ""), server.text("web_key", "")
    if bool(cert) != bool(key):
        raise ConfigError(f"{path}: [server] web_cert and web_key go together: set both or neither")
    if not cert:
        return None, None
    paths = (path.parent / cert, path.parent / key)
    for name, file in zip(("web_cert", "web_key"), paths, strict=True):
        if not file.is_file():
            raise ConfigError(f"{path}: [server] {name}: {file} is not a readable file")
    return paths


def _check_data_dir(path: Path, raw: str, data_dir: Path) -> None:
    """The CA, the server certificate and key must be in data_dir (``server init`` made them)."""
    from imapsync_bridge.protocol import pki  # cryptography: only for server commands

    where = f"{path}: [server] data_dir = {raw}"
    if not data_dir.is_dir():
        raise ConfigError(
            f"{where}: {data_dir} is not a directory; point data_dir at the directory "
            "`server init` made (relative paths are relative to server.ini)"
        )
    for name in (pki.CA_CRT, pki.CA_KEY, pki.SERVER_CRT, pki.SERVER_KEY):
        if not (data_dir / name).is_file():
            raise ConfigError(
                f"{where}: {data_dir / name} is missing; point data_dir at the directory "
                "`server init` made (relative paths are relative to server.ini)"
            )


def load_server_config(path: Path) -> ServerConfig:
    """Read and check server.ini; the first problem is a one-line ConfigError."""
    parser = _read(path)
    _check_keys(parser, path, SERVER_KEYS)
    server = _Section(parser, path, "server")
    raw_data_dir = server.text("data_dir")
    data_dir = path.parent / raw_data_dir
    relay = (
        _mail_server(parser, path, "relay", 25, oauth2=False)
        if parser.has_section("relay")
        else None
    )
    web_cert, web_key = _web_certificate(server, path)
    config = ServerConfig(
        path=path,
        data_dir=data_dir,
        hostname=server.text("hostname"),
        sync_listen=server.host_port("sync_listen"),
        default_window=server.integer("default_window", 50, minimum=1),
        max_frame=server.integer("max_frame", 64 * 1024 * 1024, minimum=4096),
        database=data_dir / "phone.sqlite3",
        smtp_listen=server.listen("smtp_listen"),
        submission_listen=server.listen("submission_listen"),
        web_listen=server.listen("web_listen"),
        max_message_size=server.integer("max_message_size", 25 * 1024 * 1024, minimum=1024),
        max_unsynced=server.integer("max_unsynced", 1000, minimum=1),
        relay=relay,
        web_cert=web_cert,
        web_key=web_key,
    )
    _check_data_dir(path, raw_data_dir, data_dir)
    return config


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
    return find_secret(role, username, host, password_file)[0]


def find_secret(role: str, username: str, host: str, password_file: Path | None) -> tuple[str, str]:
    """The secret and where it came from, in the documented order (docs/secrets.md):
    ``password_file`` when set (never falling through: a set file that is missing or
    readable by others is an error), else the OS keyring, else the systemd credential
    ``$CREDENTIALS_DIRECTORY/<role>``. The source names no secret (``agent check``)."""
    if password_file is not None:
        return read_password_file(password_file), f"password_file {password_file}"
    secret = _keyring_secret(role, username, host)
    if secret is not None:
        account = keyring_account(role, username, host)
        return secret, f"the OS keyring (service {KEYRING_SERVICE}, {account})"
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / role).exists():
        path = Path(credentials) / role
        return read_password_file(path), f"the systemd credential {path}"
    raise ConfigError(
        f"no {role} password for {username}@{host}: set password_file in [{role}], "
        f"run `imapsync-bridge set-password --config <agent.ini> {role}`, "
        f"or pass a systemd credential named {role}"
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
