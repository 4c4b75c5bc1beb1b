"""Which desktop folder plays Trash, Sent and Outbox, the way real servers name them.

Servers differ: Dovecot and Cyrus flag folders with SPECIAL-USE attributes (RFC 6154),
Exchange names them "Deleted Items" and "Sent Items", Cyrus and Courier keep personal
folders under the namespace prefix ``INBOX.`` and refuse a top-level ``Trash``. The
order of preference is the user's ``[imap]`` setting, then a SPECIAL-USE attribute (also
when the server lists it without advertising the capability), then the usual names
(under the personal namespace prefix or at the top), and only then a new folder, created
under the personal prefix. :func:`choose` is that rule over plain data; the IMAP calls
are in :meth:`imapsync_bridge.agent.imap.ImapMailbox.resolve_folders`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """One special folder the agent uses."""

    name: str  # as in the [imap] section and in `agent status`: trash, sent, outbox
    attribute: str | None  # its SPECIAL-USE attribute, e.g. "\\Trash"
    usual: tuple[str, ...]  # names servers give it, the first one is created when missing


TRASH = Role("trash", "\\Trash", ("Trash", "Deleted Items", "Deleted Messages", "[Gmail]/Trash"))
SENT = Role("sent", "\\Sent", ("Sent", "Sent Items", "Sent Messages", "[Gmail]/Sent Mail"))
OUTBOX = Role("outbox", None, ("Outbox",))
ROLES = (TRASH, SENT, OUTBOX)


@dataclass(frozen=True)
class Listed:
    """One folder of the LIST answer."""

    name: str
    attributes: frozenset[str]  # lower-case, e.g. {"\\trash", "\\hasnochildren"}

    @classmethod
    def of(cls, name: str, attributes: Iterable[bytes | str]) -> Listed:
        names = {a.decode("ascii", "replace") if isinstance(a, bytes) else a for a in attributes}
        return cls(name, frozenset(a.lower() for a in names))


@dataclass(frozen=True)
class Choice:
    """The folder for a role: an existing one, or the name to create."""

    name: str
    exists: bool
    how: str  # why this one: "configured", "special-use", "usual name", "created"


def choose(
    role: Role, folders: Sequence[Listed], configured: str | None, prefix: str, separator: str
) -> Choice:
    """The folder for *role* among *folders* (see the module docstring).

    *prefix* and *separator* are those of the personal namespace (``"INBOX."``, ``"."``);
    a configured name is taken as given (it may already carry the prefix).
    """
    by_name = {folder.name.lower(): folder for folder in folders}
    if configured:
        found = by_name.get(configured.lower())
        return Choice(found.name if found else configured, found is not None, "configured")
    if role.attribute is not None:
        wanted = role.attribute.lower()
        for folder in folders:
            if wanted in folder.attributes:
                return Choice(folder.name, True, "special-use")
    for usual in role.usual:
        local = usual.replace("/", separator) if separator else usual
        for name in (prefix + local, usual):
            found = by_name.get(name.lower())
            if found is not None and "\\noselect" not in found.attributes:
                return Choice(found.name, True, "usual name")
    return Choice(prefix + role.usual[0], False, "created")
