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

from imapsync_bridge import __version__, logs
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

    config = load_agent_config(Path(args.config))
    report = sync_once(config, args.allow_mass_delete, progress=logs.Progress())
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
    from imapsync_bridge.agent.runner import status, status_lines

    info = status(load_agent_config(Path(args.config)))
    print(json.dumps(info, indent=2) if args.json else "\n".join(status_lines(info)))
    return 0


def cmd_agent_check(args: argparse.Namespace) -> int:
    from imapsync_bridge.agent.check import report

    return report(Path(args.config), lambda line: print(line, flush=True))


def cmd_agent_login(args: argparse.Namespace) -> int:
    """OAuth2 sign-in, device or browser (docs/oauth2.md); a running `agent run` picks it up."""
    from imapsync_bridge.oauth2.tokens import sign_in

    config = load_agent_config(Path(args.config))
    server = config.imap.server if args.role == "imap" else config.smtp
    if server is None:
        raise ConfigError(f"{config.path}: no [{args.role}] section")
    where = sign_in(server, lambda line: print(line, flush=True), open_browser=not args.no_browser)
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
    if not server.username:
        raise ConfigError(f"{config.path}: [{args.role}] username is empty: no password is used")
    secret = read_new_password(f"{args.role} password for {server.username}@{server.host}: ")
    if not secret:
        raise ConfigError("an empty password; nothing stored")
    try:
        keyring.set_password(
            KEYRING_SERVICE, keyring_account(args.role, server.username, server.host), secret
        )
    except KeyringError as exc:
        raise ConfigError(
            f"no usable keyring ({exc}); use password_file or a systemd credential instead"
        ) from None
    print(f"stored the {args.role} password for {server.username}@{server.host} in the keyring")
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
def command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    purpose: str,
    example: str,
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with its purpose and ends with an example."""
    return subparsers.add_parser(
        name,
        help=purpose,
        description=purpose[0].upper() + purpose[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imapsync-bridge",
        description="Sync a corporate IMAP inbox with a phone mailbox.",
        epilog="example:\n  imapsync-bridge agent check --config agent.ini",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log debug details too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    top = parser.add_subparsers(dest="command", required=True)

    server = command(
        top, "server", "the hosted server", "imapsync-bridge server run --config server.ini"
    ).add_subparsers(dest="action", required=True)
    p = command(
        server, "init", "create a CA, certificates, store and server.ini",
        "imapsync-bridge server init --data-dir /var/lib/imapsync-bridge-server "
        "--hostname sync.example.com",
    )  # fmt: skip
    p.add_argument("--data-dir", required=True)
    p.add_argument("--hostname", default="localhost", help="DNS name or IP address")
    p.add_argument("--sync-port", type=int, default=4465)
    p.set_defaults(func=cmd_server_init)
    p = command(
        server, "add-user", "add a phone mailbox; prints a pairing code",
        "imapsync-bridge server add-user --config server.ini alice --address "
        "alice@phone.example.com --desktop-address alice@corp.example.com --window 50",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.add_argument("--address", required=True)
    p.add_argument("--desktop-address", required=True)
    p.add_argument("--window", type=int)
    p.set_defaults(func=cmd_server_add_user)
    p = command(
        server, "pair-code", "a new pairing code (revokes the old agent)",
        "imapsync-bridge server pair-code --config server.ini alice",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.set_defaults(func=cmd_server_pair_code)
    p = command(
        server, "set-password",
        "the phone user's password (submission, web); stdin when not a terminal",
        "imapsync-bridge server set-password --config server.ini alice",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("user")
    p.set_defaults(func=cmd_server_set_password)
    p = command(
        server, "run", "run the server's listeners",
        "imapsync-bridge server run --config server.ini",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_server_run)

    agent = command(
        top, "agent", "the desktop agent", "imapsync-bridge agent sync --config agent.ini"
    ).add_subparsers(dest="action", required=True)
    p = command(
        agent, "pair", "pair with the server using a one-time code",
        "imapsync-bridge agent pair --config agent.ini --code 'CODE FROM server add-user'",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("--code", required=True)
    p.set_defaults(func=cmd_agent_pair)
    p = command(
        agent, "sync", "one sync session now; exit 0 only if it completed",
        "imapsync-bridge agent sync --config agent.ini",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="carry out a mass delete the breaker stopped",
    )
    p.set_defaults(func=cmd_agent_sync)
    p = command(
        agent, "run", "the service: periodic sync, IMAP IDLE and server push, trigger mail",
        "imapsync-bridge agent run --config agent.ini",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_agent_run)
    p = command(
        agent, "status",
        "the service, last sync and its result, pending actions, window, quarantine",
        "imapsync-bridge agent status --config agent.ini --json",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="one JSON document (fields: README)")
    p.set_defaults(func=cmd_agent_status)
    p = command(
        agent, "check",
        "check the set-up step by step (config, secrets, IMAP, SMTP, server); changes nothing",
        "imapsync-bridge agent check --config agent.ini",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_agent_check)
    p = command(
        agent, "login", "OAuth2 sign-in (device or browser) for [imap] or [smtp] (auth = oauth2)",
        "imapsync-bridge agent login --config agent.ini imap",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("role", choices=["imap", "smtp"])
    p.add_argument(
        "--no-browser", action="store_true",
        help="browser flow: only print the address, even on a desktop",
    )  # fmt: skip
    p.set_defaults(func=cmd_agent_login)

    p = command(
        top, "set-password",
        "store the IMAP or SMTP password in the OS keyring; stdin when not a terminal",
        "imapsync-bridge set-password --config agent.ini imap",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("role", choices=["imap", "smtp"])
    p.set_defaults(func=cmd_set_password)

    p = command(
        top, "phone", "act as the phone user",
        "imapsync-bridge phone --config server.ini --user alice list",
    )  # fmt: skip
    p.add_argument("--config", required=True)
    p.add_argument("--user", required=True)
    verbs = p.add_subparsers(dest="verb", required=True)
    example = "imapsync-bridge phone --config server.ini --user alice"
    v = command(verbs, "list", "the phone inbox and trash", f"{example} list --json")
    v.add_argument("--json", action="store_true")
    v = command(
        verbs, "show", "the raw message; --json: fields, text, attachments",
        f"{example} show 12 --json",
    )  # fmt: skip
    v.add_argument("id", type=int)
    v.add_argument("--json", action="store_true")
    for verb, purpose in PHONE_CHANGES.items():
        command(verbs, verb, purpose, f"{example} {verb} 12").add_argument("id", type=int)
    command(
        verbs, "request-sync",
        "ask for a sync: pushed to a connected agent, else the trigger mail",
        f"{example} request-sync",
    )  # fmt: skip
    v = command(
        verbs, "compose", "write a message: sent now through [relay], or via the desktop",
        f"{example} compose --to bob@example.com --subject Hi --body 'See you' --via-desktop",
    )  # fmt: skip
    v.add_argument("--to", action="append", required=True, help="a recipient (repeatable)")
    v.add_argument("--subject", required=True)
    v.add_argument("--body", required=True)
    v.add_argument("--via-desktop", action="store_true", help="send via the desktop's SMTP")
    v.add_argument("--in-reply-to", type=int, help="the phone id of the message answered")
    v.add_argument("--json", action="store_true", help="print the outbox entry as JSON")
    p.set_defaults(func=cmd_phone)
    return parser


PHONE_CHANGES = {
    "delete": "move a message to the phone trash (the desktop's Trash at the next sync)",
    "restore": "bring a message back from the trash",
    "destroy": "delete a message for good, on both sides",
    "read": "mark a message read",
    "unread": "mark a message unread",
    "flag": "flag a message",
    "unflag": "remove a message's flag",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(logs.VERBOSE if args.verbose else logs.QUIET if args.quiet else logs.NORMAL)
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
