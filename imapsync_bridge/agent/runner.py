"""Run one sync session with real connections, record its outcome, report status."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from imapsync_bridge.agent.desktop import DesktopSide
from imapsync_bridge.agent.imap import ImapMailbox
from imapsync_bridge.agent.link import AGENT_CRT, ServerLink
from imapsync_bridge.agent.outbox import OutgoingSettings
from imapsync_bridge.agent.session import SyncSession
from imapsync_bridge.agent.state import STATE_FILE, AgentState, make_state_dir
from imapsync_bridge.config import AgentConfig
from imapsync_bridge.errors import (
    AuthError,
    BridgeError,
    ConfigError,
    StoreError,
    TransientError,
)
from imapsync_bridge.logs import ProgressSink
from imapsync_bridge.model import Where
from imapsync_bridge.sync.outgoing import Limits
from imapsync_bridge.sync.session import SessionOptions, SessionReport

log = logging.getLogger(__name__)


def open_state(config: AgentConfig) -> AgentState:
    return AgentState(config.state_dir / STATE_FILE)


def connect_imap(config: AgentConfig, count_traffic: bool = False) -> ImapMailbox:
    """A logged-in connection; with ``auth = oauth2`` it logs in with a fresh access
    token and says (``renew_at``) when to reconnect before that token runs out."""
    server = config.imap.server
    token = None
    if server.auth == "oauth2":  # authlib and requests load only for such an account
        from imapsync_bridge.oauth2 import tokens

        token = tokens.access_token(server)
    try:
        imap = ImapMailbox.connect(
            server.host,
            server.port,
            security=server.security,
            username=server.username,
            password=server.password() or "",
            access_token=token.value if token else None,
            count_traffic=count_traffic,
        )
    except AuthError:
        if token is not None:  # refused (revoked early?): the next try refreshes first
            from imapsync_bridge.oauth2 import tokens

            tokens.forget_access_token(server)
        raise
    imap.renew_at = token.renew_at if token else None
    return imap


def open_desktop(
    config: AgentConfig, imap: ImapMailbox, sync_phrase: str | None = None
) -> DesktopSide:
    """The desktop side of a session; with the ``sync_phrase`` of the agent state, mail
    carrying it (trigger mail) never enters the phone window."""
    found = imap.resolve_folders(
        {"trash": config.imap.trash, "sent": config.imap.sent, "outbox": config.imap.outbox}
    )
    return DesktopSide(imap, config.imap.mailbox, found["trash"], found, sync_phrase)


def open_link(config: AgentConfig) -> ServerLink:
    if not (config.state_dir / AGENT_CRT).exists():
        raise ConfigError(f"{config.path}: this agent is not paired; run `agent pair` first")
    host, port = config.server
    return ServerLink.open(host, port, config.state_dir, config.server_timeout)


LOCK_FILE = "agent.lock"  # held around every session: one at a time (agent sync, agent run)


@contextlib.contextmanager
def session_lock(config: AgentConfig) -> Iterator[None]:
    """Exclusive use of the agent state for one session; a second waits for the first."""
    make_state_dir(config.state_dir)
    try:
        handle = (config.state_dir / LOCK_FILE).open("a")
    except OSError as exc:
        raise StoreError(f"cannot open {config.state_dir / LOCK_FILE}: {exc.strerror}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def session_options(config: AgentConfig, allow_mass_delete: bool) -> SessionOptions:
    return SessionOptions(
        mass_delete_share=config.mass_delete_share,
        allow_mass_delete=allow_mass_delete,
        max_message_size=config.max_message_size,
    )


def outgoing_settings(config: AgentConfig) -> OutgoingSettings:
    """How the agent sends via-desktop mail (``[smtp]``, from_address, the limits)."""
    return OutgoingSettings(
        smtp=config.smtp,
        limits=Limits(config.smtp_from_address, config.max_message_size),
    )


def _attempt(
    config: AgentConfig, state: AgentState, options: SessionOptions, progress: ProgressSink | None
) -> SessionReport:
    """One session, tried twice more (after 0.5 s, then 1 s) when a connection drops.

    tenacity (~25 ms of imports) is loaded only once a first attempt has failed: a
    one-shot `agent sync` that finds nothing to do stays quick."""
    try:
        return _session(config, state, options, progress)
    except TransientError as exc:
        log.info("sync attempt failed (%s): trying again", exc)
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    time.sleep(RETRY_FIRST_WAIT)
    retrying = Retrying(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(2),
        wait=wait_exponential(multiplier=2 * RETRY_FIRST_WAIT, max=5),
        reraise=True,
    )
    return retrying(_session, config, state, options, progress)


RETRY_FIRST_WAIT = 0.5  # seconds before a failed session is tried again


def _session(
    config: AgentConfig, state: AgentState, options: SessionOptions, progress: ProgressSink | None
) -> SessionReport:
    with open_link(config) as link, connect_imap(config) as imap:
        desktop = open_desktop(config, imap, state.get("sync_phrase"))
        outgoing = outgoing_settings(config)
        session = SyncSession(state, desktop, link, options, outgoing=outgoing, progress=progress)
        return session.run()


def sync_once(
    config: AgentConfig, allow_mass_delete: bool = False, progress: ProgressSink | None = None
) -> SessionReport:
    """One complete session (retried on connection loss); records the outcome.
    ``progress``: where a long send to the phone shows its counts (a terminal)."""
    state = open_state(config)
    try:
        with session_lock(config):
            options = session_options(config, allow_mass_delete)
            report = _attempt(config, state, options, progress)
    except BridgeError as exc:
        state.set_many({"last_result": "failed", "last_error": str(exc)})
        raise
    finally:
        state.close()
    log.info("sync complete: %s in %.2f s", report.summary(), report.seconds)
    return report


def status_lines(info: dict[str, Any]) -> list[str]:
    """`agent status` for a person: one fact a line, the same facts as ``--json``."""
    who = f" as {info['user']}" if info["user"] else ""
    lines = [f"paired        {'yes' if info['paired'] else 'no'}, server {info['server']}{who}"]
    if info["running"]:
        lines.append(
            f"service       running (pid {info['service_pid']}, since "
            f"{info['service_started']}), next sync {info['next_sync'] or '-'}"
        )
        connections = info["connections"] or {}
        idle, push = connections.get("imap_idle"), connections.get("push") or {}
        lines.append(f"  imap idle   {idle['state'] if idle else 'off (idle = false)'}")
        lines.append(f"  push link   {push.get('state', '-')}")
        if poll := connections.get("poll"):
            lines.append(f"  polling     every {poll['every']} s ({poll['why']})")
    else:
        lines.append(f"service       {info['service']}")
    result = info["last_result"] or "-"
    lines.append(f"last sync     {info['last_sync'] or 'never'} ({result})")
    lines.append(f"last error    {info['last_error'] or '-'}")
    window = info["window"] if info["window"] is not None else "-"
    lines.append(f"window        {window}, {info['mapped']} messages mapped")
    pending = info["pending"]
    lines.append(
        f"pending       {pending['to_phone']} to the phone, {pending['held_for_desktop']} held "
        f"for the desktop, {pending['outgoing_mail']} outgoing mail"
    )
    if info["folders"]:
        lines.append("folders       " + ", ".join(f"{k} {v}" for k, v in info["folders"].items()))
    lines.append(f"sync phrase   {info['sync_phrase'] or '-'}")
    lines.append(f"quarantined   {len(info['quarantined'])}")
    lines += [
        f"  {item['key']} (uid {item['uid']}): {item['reason']}" for item in info["quarantined"]
    ]
    return lines


def status(config: AgentConfig) -> dict[str, Any]:
    """What `agent status --json` prints (stable field names, see README); ``running``,
    ``connections`` and ``next_sync`` come from a running `agent run`."""
    from imapsync_bridge.agent.service_file import service_status

    state = open_state(config)
    try:
        ledger = state.ledger()
        window = state.get("window")
        return {
            "paired": (config.state_dir / AGENT_CRT).exists(),
            "server": "{}:{}".format(*config.server),
            "user": state.get("user"),
            "window": int(window) if window else None,
            "last_sync": state.get("last_sync"),
            "last_result": state.get("last_result"),
            "last_error": state.get("last_error"),
            "pending_actions": state.pending_count(),
            "pending": {
                "to_phone": state.pending_count(),
                "held_for_desktop": state.get_int("held"),
                "outgoing_mail": len(state.deliveries()),
            },
            "mapped": sum(
                e.desktop is Where.INBOX and e.phone is Where.INBOX for e in ledger.values()
            ),
            "quarantined": [
                {"key": q.key, "uid": q.uid, "reason": q.reason} for q in state.quarantined()
            ],
            "sync_phrase": state.get("sync_phrase"),
            "folders": json.loads(folders) if (folders := state.get("folders")) else None,
            **service_status(config),
        }
    finally:
        state.close()
