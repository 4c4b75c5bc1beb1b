"""`agent check`: each thing a new set-up gets wrong, in order, one line each.

The checks only read: they log in, LIST, STATUS and greet the hosted server, but create
no folder, store no state and send no mail, so a user can run them as often as they
like. A check that fails says what to do; checks that depend on it are left out (no
IMAP login: no capabilities and no folders), the others still run.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imapsync_bridge.agent import folders
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.link import AGENT_CRT, AGENT_KEY, SERVER_CA, ServerLink
from imapsync_bridge.agent.runner import connect_imap
from imapsync_bridge.config import AgentConfig, MailServer, find_secret, load_agent_config
from imapsync_bridge.errors import AuthError, BridgeError, ConfigError, ImapError, LoginRefused
from imapsync_bridge.oauth2 import tokens

CHECK_INSTANCE = "agent-check"  # how the check's session names itself to the server


@dataclass(frozen=True)
class Outcome:
    """One line of the report."""

    ok: bool
    what: str  # e.g. "IMAP login"
    detail: str  # what was found, or what went wrong
    hint: str = ""  # what to do (failures)

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        hint = f" — {self.hint}" if self.hint and not self.ok else ""
        return f"{mark} {self.what}: {self.detail}{hint}"


# What the agent does with each capability, and without it (docs/compat.md).
CAPABILITIES: tuple[tuple[str, str, str], ...] = (
    (
        "CONDSTORE",
        "a sync fetches only the flags changed since the last one",
        "not offered: each sync compares every message's flags (slower on a big inbox)",
    ),
    (
        "IDLE",
        "`agent run` hears inbox changes at once",
        "not offered: `agent run` polls for inbox changes and trigger mail every "
        "poll_interval instead",
    ),
    (
        "MOVE",
        "deletes move messages to Trash in one command",
        "not offered: COPY, then \\Deleted and UID EXPUNGE of just those messages",
    ),
    (
        "SPECIAL-USE",
        "Trash and Sent are found by their attributes",
        "not offered: Trash and Sent are found by their usual names",
    ),
)


def run_checks(path: Path) -> Iterator[Outcome]:
    """Every check of ``agent check`` for the agent.ini at *path*, in order."""
    try:
        config = load_agent_config(path)
    except ConfigError as exc:
        yield Outcome(False, "config", str(exc), "fix the setting named, then run this again")
        return
    yield Outcome(True, "config", f"{path} loads")
    yield _state_dir(config.state_dir)
    found = _secret(config.imap.server)
    yield found
    if found.ok:
        yield from _imap(config)
    if config.smtp is None:
        yield Outcome(
            True, "SMTP", "no [smtp] section: the phone's 'send via desktop' is not available"
        )
    else:
        found = _secret(config.smtp)
        yield found
        if found.ok:
            yield _smtp(config.smtp)
    key = _agent_key(config.state_dir / AGENT_KEY)
    if key is not None:
        yield key
    yield _server(config)


def _user() -> str:
    """Who runs this (the service's user when run as the service runs)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _state_dir(path: Path) -> Outcome:
    """The agent keeps its state, lock and certificates there: it must be a directory
    this user can write, or one it can create (pairing creates it). Creates nothing."""
    what = "state directory"
    fix = (
        f"create it for the user the agent runs as (`install -d -m 700 -o USER {path}`; "
        "systemd's StateDirectory= does it), or set [agent] state_dir"
    )
    if path.exists():
        if not path.is_dir():
            return Outcome(False, what, f"{path} is not a directory", fix)
        if not os.access(path, os.W_OK | os.X_OK):
            return Outcome(False, what, f"{path} is not writable by {_user()}", fix)
        return Outcome(True, what, f"{path} is writable by {_user()}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return Outcome(False, what, f"{path} cannot be created: {parent} is not a directory", fix)
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = f"{parent} is not writable by {_user()}"
        return Outcome(False, what, f"{path} is missing and cannot be created ({reason})", fix)
    return Outcome(True, what, f"{path} (missing: made at pairing)")


def _agent_key(key: Path) -> Outcome | None:
    """The agent's private key (None before pairing: the hosted-server line says so)."""
    what = "agent key"
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Outcome(False, what, f"{key}: {exc.strerror}", "check the state directory's owner")
    if mode & 0o077:
        return Outcome(
            False,
            what,
            f"{key} is open to group or others (mode {mode:04o})",
            f"chmod 600 {key}: anyone who reads it can act as this agent",
        )
    if not os.access(key, os.R_OK):
        return Outcome(
            False,
            what,
            f"{key} is not readable by {_user()}",
            f"`chown USER {key}` for the user the agent runs as",
        )
    return Outcome(True, what, f"{key} is private (mode {mode:04o})")


def _secret(server: MailServer) -> Outcome:
    """Where the password (or the OAuth2 sign-in) comes from, never the secret itself."""
    if server.auth == "oauth2":
        what = f"{server.role} OAuth2 sign-in"
        problem = tokens.check_sign_in(server)
        if problem is not None:
            return Outcome(False, what, problem, "see docs/oauth2.md")
        return Outcome(True, what, f"an access token for {server.username}@{server.host}")
    what = f"{server.role} password"
    if not server.username:
        return Outcome(True, what, "none needed (empty username: no login)")
    try:
        _secret_value, source = find_secret(
            server.role, server.username, server.host, server.password_file
        )
    except ConfigError as exc:
        return Outcome(False, what, str(exc), "see docs/secrets.md for the lookup order")
    return Outcome(True, what, f"found in {source}")


def _imap(config: AgentConfig) -> Iterator[Outcome]:
    server = config.imap.server
    where = f"{server.host}:{server.port} ({server.security})"
    try:
        imap = connect_imap(config)
    except LoginRefused as exc:
        yield Outcome(True, "IMAP connection", f"{where} answered")
        yield Outcome(False, "IMAP login", str(exc), _login_hint(config.imap.server))
        return
    except AuthError as exc:
        yield Outcome(False, "IMAP connection", str(exc), _tls_hint(str(exc), "imap", "993"))
        return
    except BridgeError as exc:
        yield Outcome(
            False,
            "IMAP connection",
            str(exc),
            "check [imap] host, port and security (993 for tls, 143 for starttls) "
            "and that this machine may connect there",
        )
        return
    with imap:
        yield Outcome(True, "IMAP connection", f"{where} answered")
        who = f"as {server.username}" if server.username else "without a login"
        yield Outcome(True, "IMAP login", f"logged in {who}")
        for name, used, fallback in CAPABILITIES:
            offered = imap.has(name)
            yield Outcome(True, f"IMAP {name}", "offered: " + used if offered else fallback)
        yield from _folders(config, imap)


def _tls_hint(message: str, role: str, tls_port: str) -> str:
    if "STARTTLS" in message:
        return f"the server offers no STARTTLS on this port: use security = tls (port {tls_port})"
    return (
        "the server's certificate is not trusted here: install its CA in the system "
        f"store (or SSL_CERT_FILE), and use the name it carries as [{role}] host"
    )


def _login_hint(server: MailServer) -> str:
    role = server.role
    if server.auth == "oauth2":
        again = tokens.login_hint(server)
        return f"check [{role}] username; if it is right, sign in again: {again}"
    return (
        f"check [{role}] username and the password: `imapsync-bridge set-password "
        f"--config agent.ini {role}` stores a new one (docs/secrets.md)"
    )


def _folders(config: AgentConfig, imap: ImapMailbox) -> Iterator[Outcome]:
    mailbox = config.imap.mailbox
    try:
        status = imap.status(mailbox)
    except ImapError as exc:
        yield Outcome(False, "mailbox", str(exc), "set [imap] mailbox to an existing folder")
    else:
        yield Outcome(True, "mailbox", f"{mailbox} ({status.messages} messages)")
    try:
        choices = imap.find_folders(
            {"trash": config.imap.trash, "sent": config.imap.sent, "outbox": config.imap.outbox}
        )
    except ImapError as exc:
        yield Outcome(False, "folders", str(exc), "the server refused LIST; ask its admin")
        return
    for role in folders.ROLES:
        yield _folder(role, choices[role.name])


def _folder(role: folders.Role, choice: folders.Choice) -> Outcome:
    """Trash and Sent must exist (a new folder would split them from the one the user's
    mail client uses); the agent's own Outbox is created at the first sync."""
    what = f"{role.name} folder"
    if choice.exists:
        return Outcome(True, what, f"{choice.name} ({choice.how})")
    if choice.how == "configured":
        return Outcome(
            False,
            what,
            f"[imap] {role.name} = {choice.name}: no such folder",
            f"set [imap] {role.name} to a folder that exists, or empty to find it",
        )
    if role.attribute is None:
        return Outcome(True, what, f"{choice.name} (missing: made at the first sync)")
    return Outcome(
        False,
        what,
        f"none found (no {role.attribute} attribute, none of the usual names); "
        f"a sync would create {choice.name}",
        f"set [imap] {role.name} = <the {role.name} folder your mail client uses>, "
        f"or create {choice.name} there if that is the one you want",
    )


def _smtp(server: MailServer) -> Outcome:
    from imapsync_bridge import smtp_out

    where = f"{server.host}:{server.port} ({server.security})"
    try:
        smtp_out.probe(server, timeout=15.0)
    except LoginRefused as exc:
        return Outcome(False, "SMTP", str(exc), _login_hint(server))
    except BridgeError as exc:
        text = str(exc)
        hint = "check [smtp] host, port and security (465 for tls, 587 for starttls)"
        if "certificate" in text.lower() or "STARTTLS" in text:  # smtplib's own words
            hint = _tls_hint(text, "smtp", "465")
        return Outcome(False, "SMTP", text, hint)
    who = f"logged in as {server.username}" if server.username else "no login configured"
    return Outcome(True, "SMTP", f"{where} answered, {who}")


def _server(config: AgentConfig) -> Outcome:
    host, port = config.server
    what = "hosted server"
    if not (config.state_dir / AGENT_CRT).exists():
        return Outcome(
            False,
            what,
            f"this agent is not paired ({config.state_dir / AGENT_CRT} is missing)",
            "run `imapsync-bridge agent pair --config agent.ini --code CODE` with the code "
            "`server add-user` or `server pair-code` printed",
        )
    try:
        with ServerLink.open(host, port, config.state_dir, timeout=15.0) as link:
            link.hello(CHECK_INSTANCE)
    except AuthError as exc:
        return Outcome(
            False,
            what,
            str(exc),
            f"the server and {SERVER_CA} do not agree: ask for a new code "
            "(`server pair-code`) and pair again",
        )
    except BridgeError as exc:
        return Outcome(
            False,
            what,
            str(exc),
            "check [agent] server (host:port of the sync listener) and that this machine "
            "may connect there",
        )
    return Outcome(
        True, what, f"{host}:{port} verified with the pinned CA, this agent is {link.user}"
    )


def report(path: Path, write: Callable[[str], None]) -> int:
    """Print each line as it is known; the exit status: 0 all passed, 2 the config is
    unusable, 1 another check failed."""
    failed = False
    for outcome in run_checks(path):
        write(outcome.line())
        if not outcome.ok:
            if outcome.what == "config":
                return 2
            failed = True
    return 1 if failed else 0
