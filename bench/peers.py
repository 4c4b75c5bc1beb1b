"""Step 3: the peer tool, mbsync (Debian ``isync``) with ``MaxMessages W``, into a temp
Maildir, through its own counting proxy.

It syncs only INBOX (``Patterns INBOX``; INBOX is never under a namespace prefix), so it
reads the same messages on every server profile; its far store is still told the
profile's namespace prefix and separator, as a user would configure it for that server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from measuring import CountingProxy, Run, run_measured


def write_mbsync_config(
    root: Path, port: int, user: str, password: str, window: int, server: Any
) -> Path:
    """*server*: the tests/dovecot.py ``Profile`` of the Dovecot behind *port*."""
    maildir = root / "maildir"
    maildir.mkdir(parents=True)
    cfg = root / "mbsyncrc"
    namespace = f"PathDelimiter {server.separator}\n"
    if server.prefix:
        namespace += f"Path {server.prefix}\n"
    cfg.write_text(
        f"""IMAPAccount bench
Host 127.0.0.1
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore far
Account bench
{namespace}
MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel inbox
Far :far:
Near :near:
Patterns INBOX
Create Near
Sync All
MaxMessages {window}
ExpireUnread yes
SyncState *
"""
    )
    return cfg


def mbsync_sync(cfg: Path, proxy: CountingProxy) -> Run:
    before = proxy.counts()
    rc, wall, rss, output = run_measured(["mbsync", "-c", str(cfg), "-a"])
    if rc != 0:
        raise RuntimeError(f"mbsync failed ({rc}):\n{output}")
    traffic = proxy.counts().minus(before)
    return Run(wall, traffic.turns, traffic.commands, traffic.bytes_read, rss)


def count_maildir(root: Path) -> int:
    inbox = root / "maildir" / "INBOX"
    return sum(
        1
        for sub in ("cur", "new")
        if (inbox / sub).is_dir()
        for name in os.listdir(inbox / sub)
        if not re.search(r":2,[A-Z]*T", name)  # expired copies are marked trashed
    )
