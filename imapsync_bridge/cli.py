"""`imapsync-bridge`: the command line (a contract: scripts and tests rely on it).

Exit codes: 0 success, 1 operational failure (message on stderr), 2 usage/config error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from imapsync_bridge.config import (
    KEYRING_SERVICE,
    keyring_account,
    load_agent_config,
    load_server_config,
)
from imapsync_bridge.errors import BridgeError, ConfigError

if TYPE_CHECKING:
    from imapsync_bridge.server.phone import PhoneService

log = logging.getLogger("imapsync_bridge")


# -- server ------------------------------------------------------------------------------
def cmd_server_init(args: argparse.Namespace) -> int:
    from imapsync_bridge.server.app import init_server

    ini = init_server(Path(args.data_dir), args.hostname, args.sync_port)
    print(f"created {ini}")
    return 0


def cmd_server_add_user(args: argparse.Namespace) -> int:
    from imapsync_bridge.server.app import new_pairing_code, open_store

    config = load_server_config(Path(args.config))
    store = open_store(config)
    try:
        user = store.add_user(
            args.user, args.address, args.desktop_address, args.window or config.default_window
        )
        code = new_pairing_code(config, store, user.name)
    finally:
        store.close()
    print(f"added {user.name} (phone address {user.address}, window {user.window})")
    print("pairing code (one use, 24 h):")
    print(code)
    return 0


def cmd_server_pair_code(args: argparse.Namespace) -> int:
    from imapsync_bridge.server.app import new_pairing_code, open_store

    config = load_server_config(Path(args.config))
    store = open_store(config)
    try:
        code = new_pairing_code(config, store, args.user)
    finally:
        store.close()
    print(f"new pairing code for {args.user}; pairing with it revokes the current agent:")
    print(code)
    return 0


def read_new_password(prompt: str) -> str:
    """The first line of stdin when it is not a terminal (a script or a pipe; the trailing
    newline dropped), else typed twice without echo and required to match."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ; nothing changed")
    return first


def cmd_server_set_password(args: argparse.Namespace) -> int:
    from imapsync_bridge.server.app import open_store
    from imapsync_bridge.server.credentials import set_password, validate

    config = load_server_config(Path(args.config))
    password = read_new_password(f"new password for phone user {args.user}: ")
    validate(password)  # before opening anything: a usage error changes nothing
    store = open_store(config)
    try:
        store.get_user(args.user)
        set_password(store, args.user, password)
    finally:
        store.close()
    print(f"password of {args.user} set")
    return 0


def cmd_server_run(args: argparse.Namespace) -> int:
    import asyncio

    from imapsync_bridge.server.app import serve

    asyncio.run(serve(load_server_config(Path(args.config))))
    return 0


# -- agent -------------------------------------------------------------------------------
def cmd_agent_pair(args: argparse.Namespace) -> int:
    from imapsync_bridge.agent.pairing import pair

    config = load_agent_config(Path(args.config))
    host, port = config.server
    user = pair(host, port, args.code.strip(), config.state_dir)
    print(f"paired with {host}:{port} as {user}")
    return 0


def cmd_agent_sync(args: argparse.Namespace) -> int:
    from imapsync_bridge.agent.runner import sync_once

    report = sync_once(load_agent_config(Path(args.config)), args.allow_mass_delete)
    summary = report.summary()
    print(" ".join(f"{name}={value}" for name, value in summary.items()))
    return 0


def cmd_agent_run(args: argparse.Namespace) -> int:
    import signal

    # A stop asked for while the service starts up ends it as soon as it can run.
    stop_asked: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stop_asked.append(signum))

    from imapsync_bridge.agent.service import AgentService

    service = AgentService(load_agent_config(Path(args.config)))

    def stop(_signum: int, _frame: object) -> None:
        service.stop()
        # A session still running after STOP_GRACE is left: the journal makes it safe.
        abandon = threading.Timer(STOP_GRACE, _abandon_session)
        abandon.daemon = True
        abandon.start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    if stop_asked:
        return 0
    service.run()
    return 0


STOP_GRACE = 8.0  # seconds a session may go on after SIGTERM; the contract is 10


def _abandon_session() -> None:
    log.warning("stopping: abandoning the session in progress; the next run carries on")
    logging.shutdown()
    os._exit(0)


def cmd_agent_status(args: argparse.Namespace) -> int:
    from imapsync_bridge.agent.runner import status

    info = status(load_agent_config(Path(args.config)))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            if name == "quarantined":
                value = len(value)
            print(f"{name:16} {value if value is not None else '-'}")
        for item in info["quarantined"]:
            print(f"  quarantined {item['key']} (uid {item['uid']}): {item['reason']}")
    return 0


def cmd_agent_login(args: argparse.Namespace) -> int:
    """OAuth2 device sign-in (docs/oauth2.md); a running `agent run` picks it up."""
    from imapsync_bridge.oauth2.tokens import device_login

    config = load_agent_config(Path(args.config))
    server = config.imap.server if args.role == "imap" else config.smtp
    if server is None:
        raise ConfigError(f"{config.path}: no [{args.role}] section")
    where = device_login(server, lambda line: print(line, flush=True))
    print(f"signed in: {args.role} tokens stored in {where}")
    return 0


def cmd_set_password(args: argparse.Namespace) -> int:
    import keyring
    from keyring.errors import KeyringError

    config = load_agent_config(Path(args.config))
    server = config.imap.server if args.role == "imap" else config.smtp
    if server is None:
        raise ConfigError(f"{config.path}: no [{args.role}] section")
    if server.auth == "oauth2":
        raise ConfigError(f"[{args.role}] auth = oauth2 takes no password: run `agent login`")
    secret = getpass.getpass(f"{args.role} password for {server.username}@{server.host}: ")
    try:
        keyring.set_password(
            KEYRING_SERVICE, keyring_account(args.role, server.username, server.host), secret
        )
    except KeyringError as exc:
        raise ConfigError(
            f"no usable keyring ({exc}); use password_file or a systemd credential instead"
        ) from None
    print(f"stored the {args.role} password in the keyring")
    return 0


# -- phone -------------------------------------------------------------------------------
def cmd_phone(args: argparse.Namespace) -> int:
    from imapsync_bridge.server.app import open_store
    from imapsync_bridge.server.outgoing_mail import Relay
    from imapsync_bridge.server.phone import PhoneService

    config = load_server_config(Path(args.config))
    store = open_store(config)
    relay = Relay(config.relay, config.hostname) if config.relay else None
    try:
        service = PhoneService(store, relay, max_message_size=config.max_message_size)
        return _phone_verb(service, args)
    finally:
        store.close()


def _phone_verb(service: PhoneService, args: argparse.Namespace) -> int:
    """Call the phone service and format its result; no mailbox logic here."""
    user = args.user
    verb = args.verb
    if verb == "list":
        mailbox = service.list(user)
        if args.json:
            print(json.dumps(mailbox.as_json(), indent=2))
        else:
            for folder in ("inbox", "trash"):
                messages = getattr(mailbox, folder)
                print(f"{folder} ({len(messages)}):")
                for m in messages:
                    mark = ("  " if m.seen else "N ") + ("F " if m.flagged else "  ")
                    print(f"  {m.id:>6} {mark}{m.date[:16]}  {m.sender[:24]:24}  {m.subject}")
        return 0
    if verb == "request-sync":
        request = service.request_sync(user)
        print(
            f"sync requested (pending since {request.requested_at}): `server run` pushes it "
            "to the agent when it is connected, else mails the trigger through [relay]"
        )
        return 0
    if verb == "compose":
        item = service.compose(
            user, args.to, args.subject, args.body, args.via_desktop, args.in_reply_to
        )
        if args.json:
            print(json.dumps(item.as_json(), indent=2))
        else:
            why = f": {item.reason}" if item.state == "failed" else ""
            print(f"outgoing {item.id} {item.message_id}: {item.state}{why}")
        return 0
    if verb == "show":
        detail = service.show(user, args.id)
        if args.json:
            print(json.dumps(detail.as_json(), indent=2))
        else:
            sys.stdout.buffer.write(detail.raw)
        return 0
    result = service.change(user, verb, args.id)
    print(f"{verb} {args.id}: {'done' if result.changed else 'nothing to change'}")
    return 0


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imapsync-bridge", description="Sync a corporate IMAP inbox with a phone mailbox."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    top = parser.add_subparsers(dest="command", required=True)

    server = top.add_parser("server", help="the hosted server").add_subparsers(
        dest="action", required=True
    )
    p = server.add_parser("init", help="create a CA, certificates, store and server.ini")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--hostname", default="localhost", help="DNS name or IP address")
    p.add_argument("--sync-port", type=int, default=4465)
    p.set_defaults(func=cmd_server_init)
    p = server.add_parser("add-user", help="add a phone mailbox; prints a pairing code")
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.add_argument("--address", required=True)
    p.add_argument("--desktop-address", required=True)
    p.add_argument("--window", type=int)
    p.set_defaults(func=cmd_server_add_user)
    p = server.add_parser("pair-code", help="a new pairing code (revokes the old agent)")
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.set_defaults(func=cmd_server_pair_code)
    p = server.add_parser(
        "set-password",
        help="the phone user's password (submission, web); stdin when not a terminal",
    )
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.set_defaults(func=cmd_server_set_password)
    p = server.add_parser("run", help="run the server's listeners")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_server_run)

    agent = top.add_parser("agent", help="the desktop agent").add_subparsers(
        dest="action", required=True
    )
    p = agent.add_parser("pair", help="pair with the server using a one-time code")
    p.add_argument("--config", required=True)
    p.add_argument("--code", required=True)
    p.set_defaults(func=cmd_agent_pair)
    p = agent.add_parser("sync", help="one sync session now; exit 0 only if it completed")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="carry out a mass delete the breaker stopped",
    )
    p.set_defaults(func=cmd_agent_sync)
    p = agent.add_parser(
        "run", help="the service: periodic sync, IMAP IDLE and server push, trigger mail"
    )
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_agent_run)
    p = agent.add_parser("status", help="pairing, last sync, quarantine")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_agent_status)
    p = agent.add_parser("login", help="OAuth2 device sign-in for [imap] or [smtp] (auth = oauth2)")
    p.add_argument("--config", required=True)
    p.add_argument("role", choices=["imap", "smtp"])
    p.set_defaults(func=cmd_agent_login)

    p = top.add_parser("set-password", help="store the IMAP or SMTP password in the keyring")
    p.add_argument("--config", required=True)
    p.add_argument("role", choices=["imap", "smtp"])
    p.set_defaults(func=cmd_set_password)

    p = top.add_parser("phone", help="act as the phone user")
    p.add_argument("--config", required=True)
    p.add_argument("--user", required=True)
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("list")
    v.add_argument("--json", action="store_true")
    v = verbs.add_parser("show", help="the raw message; --json: fields, text, attachments")
    v.add_argument("id", type=int)
    v.add_argument("--json", action="store_true")
    for verb in ("delete", "restore", "destroy", "read", "unread", "flag", "unflag"):
        verbs.add_parser(verb).add_argument("id", type=int)
    verbs.add_parser(
        "request-sync", help="ask for a sync: pushed to a connected agent, else the trigger mail"
    )
    v = verbs.add_parser(
        "compose", help="write a message: sent now through [relay], or via the desktop"
    )
    v.add_argument("--to", action="append", required=True, help="a recipient (repeatable)")
    v.add_argument("--subject", required=True)
    v.add_argument("--body", required=True)
    v.add_argument("--via-desktop", action="store_true", help="send via the desktop's SMTP")
    v.add_argument("--in-reply-to", type=int, help="the phone id of the message answered")
    v.add_argument("--json", action="store_true", help="print the outbox entry as JSON")
    p.set_defaults(func=cmd_phone)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"imapsync-bridge: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"imapsync-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
