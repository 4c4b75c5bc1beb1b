"""Folder discovery as real servers name their folders: one row per server situation."""

from __future__ import annotations

import pytest

from imapsync_bridge.agent.folders import OUTBOX, SENT, TRASH, Choice, Listed, choose


def listing(*entries: str | tuple[str, str]) -> list[Listed]:
    """Folders as LIST returns them: a name, or (name, attributes)."""
    out = []
    for entry in entries:
        name, attrs = (entry, "") if isinstance(entry, str) else entry
        out.append(Listed.of(name, attrs.split()))
    return out


DOVECOT = listing("INBOX", ("Trash", "\\Trash"), ("Sent", "\\Sent"), "Drafts")
EXCHANGE = listing("INBOX", "Deleted Items", "Sent Items", "Drafts", "Junk Email")
CYRUS = listing("INBOX", "INBOX.Trash", "INBOX.Sent", "INBOX.Drafts")
GMAIL = listing("INBOX", ("[Gmail]", "\\Noselect"), "[Gmail]/Trash", "[Gmail]/Sent Mail")

ROWS = {
    # role, folders, configured, prefix, separator -> choice
    "dovecot-special-use": (TRASH, DOVECOT, "", "", "/", Choice("Trash", True, "special-use")),
    "attribute-beats-name": (
        TRASH,
        listing("INBOX", "Trash", ("Papierkorb", "\\Trash")),
        "",
        "",
        "/",
        Choice("Papierkorb", True, "special-use"),
    ),
    "attribute-case-insensitive": (
        SENT,
        listing("INBOX", ("Gesendet", "\\SENT")),
        "",
        "",
        "/",
        Choice("Gesendet", True, "special-use"),
    ),
    "exchange-deleted-items": (
        TRASH, EXCHANGE, "", "", "/", Choice("Deleted Items", True, "usual name")
    ),
    "exchange-sent-items": (SENT, EXCHANGE, "", "", "/", Choice("Sent Items", True, "usual name")),
    "cyrus-under-prefix": (
        TRASH, CYRUS, "", "INBOX.", ".", Choice("INBOX.Trash", True, "usual name")
    ),
    "cyrus-outbox-created-under-prefix": (
        OUTBOX, CYRUS, "", "INBOX.", ".", Choice("INBOX.Outbox", False, "created")
    ),
    "gmail-trash": (TRASH, GMAIL, "", "", "/", Choice("[Gmail]/Trash", True, "usual name")),
    "gmail-sent": (SENT, GMAIL, "", "", "/", Choice("[Gmail]/Sent Mail", True, "usual name")),
    "name-case-differs": (
        TRASH, listing("INBOX", "TRASH"), "", "", "/", Choice("TRASH", True, "usual name")
    ),
    "nothing-found-created-top-level": (
        TRASH, listing("INBOX"), "", "", "/", Choice("Trash", False, "created")
    ),
    "configured-existing": (
        TRASH, EXCHANGE, "Junk Email", "", "/", Choice("Junk Email", True, "configured")
    ),
    "configured-missing-is-created-as-given": (
        TRASH, CYRUS, "INBOX.Papierkorb", "INBOX.", ".",
        Choice("INBOX.Papierkorb", False, "configured"),
    ),
    "noselect-name-is-skipped": (
        TRASH,
        listing("INBOX", ("Trash", "\\Noselect"), "Deleted Items"),
        "",
        "",
        "/",
        Choice("Deleted Items", True, "usual name"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_choose(row) -> None:
    role, folders, configured, prefix, separator, want = row
    assert choose(role, folders, configured, prefix, separator) == want
