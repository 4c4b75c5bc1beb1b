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
from imapsync_bridge.agent.state import STATE_FILE, AgentState
from imapsync_bridge.config import AgentConfig
from imapsync_bridge.errors import BridgeError, ConfigError, TransientError
from imapsync_bridge.model import Where
from imapsync_bridge.sync.outgoing import Limits
from imapsync_bridge.sync.session import SessionOptions, SessionReport

log = logging.getLogger(__name__)


def open_state(config: AgentConfig) -> AgentState:
    return AgentState(config.state_dir / STATE_FILE)


def connect_imap(config: AgentConfig, count_traffic: bool = False) -> ImapMailbox:
    server = config.imap.server
    return ImapMailbox.connect(
        server.host,
        server.port,
        security=server.security,
        username=server.username,
        password=server.password() or "",
        count_traffic=count_traffic,
    )


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
    config.state_dir.mkdir(parents=True, exist_ok=True)
    with (config.state_dir / LOCK_FILE).open("a") as handle:
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


def _attempt(config: AgentConfig, state: AgentState, options: SessionOptions) -> SessionReport:
    """One session, tried twice more (after 0.5 s, then 1 s) when a connection drops.

    tenacity (~25 ms of imports) is loaded only once a first attempt has failed: a
    one-shot `agent sync` that finds nothing to do stays quick."""
    try:
        return _session(config, state, options)
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
    return retrying(_session, config, state, options)


RETRY_FIRST_WAIT = 0.5  # seconds before a failed session is tried again


def _session(config: AgentConfig, state: AgentState, options: SessionOptions) -> SessionReport:
    with open_link(config) as link, connect_imap(config) as imap:
        desktop = open_desktop(config, imap, state.get("sync_phrase"))
        outgoing = outgoing_settings(config)
        return SyncSession(state, desktop, link, options, outgoing=outgoing).run()


def sync_once(config: AgentConfig, allow_mass_delete: bool = False) -> SessionReport:
    """One complete session (retried on connection loss); records the outcome."""
    state = open_state(config)
    try:
        with session_lock(config):
            report = _attempt(config, state, session_options(config, allow_mass_delete))
    except BridgeError as exc:
        state.set_many({"last_result": "failed", "last_error": str(exc)})
        raise
    finally:
        state.close()
    log.info("sync complete: %s in %.2f s", report.summary(), report.seconds)
    return report


def status(config: AgentConfig) -> dict[str, Any]:
    """What `agent status --json` prints (stable field names, see README); ``running``,
    ``connections`` and ``next_sync`` come from a running `agent run`."""
    from imapsync_bridge.agent.service import service_status

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
