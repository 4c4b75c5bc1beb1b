"""One logged-in IMAP connection: connecting, error translation, raw UID commands,
the selected mailbox and the benchmark counters.

The plumbing under :class:`imapsync_bridge.agent.imap.ImapMailbox`, which adds the
mailbox operations and documents the error contract. Where imapclient 4.1 has no
public way, this module reaches into the imaplib connection under it (see there).
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import ssl
from collections.abc import Iterator, Sequence
from typing import Any, Self

import imapclient
from imapclient import exceptions as imap_exc

from imapsync_bridge.agent.imap_data import by_uid, chunks, msgset
from imapsync_bridge.config import is_loopback
from imapsync_bridge.errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    ImapError,
    LoginRefused,
    MessageError,
)
from imapsync_bridge.model import MailboxStatus
from imapsync_bridge.oauth2.providers import pick_mechanism

log = logging.getLogger(__name__)

SECURITY_MODES = ("tls", "starttls", "none")
_SELECT_COUNTS = ("EXISTS", "UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ")  # in SELECT's answer
_STATUS_ITEMS = re.compile(rb"\(([A-Za-z0-9 ]*)\)\s*$")  # "(MESSAGES 4 UIDNEXT 9 ...)"


class ImapSession:
    """A logged-in connection; errors are translated by :meth:`_guard`."""

    def __init__(
        self,
        client: imapclient.IMAPClient,
        *,
        host: str,
        port: int,
        count_traffic: bool = False,
    ) -> None:
        self._client: Any = client  # None once closed
        self._host = host
        self._port = port
        self._broken: str | None = None
        self._selected: str | None = None
        self._exists = 0  # messages in the selected mailbox, as its SELECT said (less ours)
        self._capabilities: frozenset[str] = frozenset()
        self._condstore = False
        #: Epoch seconds after which to reconnect: the OAuth2 access token this connection
        #: logged in with runs out (Exchange Online ends such sessions). None: password.
        self.renew_at: float | None = None
        self.round_trips = 0
        self.bytes_read = 0
        client.normalise_times = False  # aware datetimes, converted to UTC here
        if count_traffic:  # benchmarks and tests only: wraps imaplib's private methods
            self._instrument(client._imap)

    # -- connecting ------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        security: str,
        username: str,
        password: str,
        access_token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        count_traffic: bool = False,
    ) -> Self:
        """Connect, secure (``tls`` | ``starttls`` | ``none``) and log in (unless
        *username* is empty): with *access_token*, SASL OAUTHBEARER or XOAUTH2 (whichever
        the server offers), else LOGIN with *password*. ``none`` is allowed only to a
        loopback host.
        ``count_traffic``: keep :attr:`round_trips` and :attr:`bytes_read` (benchmarks,
        tests); production connections are not instrumented."""
        if security not in SECURITY_MODES:
            raise ConfigError(f"IMAP security must be one of {SECURITY_MODES}, not {security!r}")
        if security == "none" and not is_loopback(host):
            raise ConfigError(
                f"IMAP security 'none' (plain text) is only allowed to a loopback host, "
                f"not {host!r}: use tls or starttls"
            )
        if security != "none" and ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        where = f"{host}:{port}"
        try:
            client = imapclient.IMAPClient(
                host,
                port,
                ssl=security == "tls",
                ssl_context=ssl_context if security == "tls" else None,
                timeout=timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise AuthError(f"IMAP server {where}: TLS certificate not trusted: {exc}") from exc
        except (OSError, imaplib.IMAP4.error) as exc:
            raise ConnectionLost(f"cannot connect to IMAP server {where}: {exc}") from exc
        self = cls(client, host=host, port=port, count_traffic=count_traffic)
        if count_traffic:
            self.round_trips += 1  # the greeting + CAPABILITY at connect time
        try:
            with self._guard("connect"):
                if security == "starttls":
                    if b"STARTTLS" not in client.capabilities():
                        raise AuthError(
                            f"IMAP server {where} does not offer STARTTLS; "
                            "refusing to continue in plain text"
                        )
                    client.starttls(ssl_context)
                if username:
                    try:
                        if access_token is None:
                            client.login(username, password)
                        else:
                            self._oauth2_login(username, access_token, where)
                    except imap_exc.LoginError as exc:
                        raise LoginRefused(
                            f"IMAP login as {username!r} at {where} refused ({exc})"
                        ) from exc
                caps = client.capabilities()
            self._capabilities = frozenset(c.decode("ascii", "replace").upper() for c in caps)
            if "CONDSTORE" in self._capabilities and "ENABLE" in self._capabilities:
                # Dovecot tracks per-message MODSEQs only once a client enabled CONDSTORE.
                with self._guard("ENABLE CONDSTORE"):
                    self._client.enable("CONDSTORE")
                self._condstore = True
        except BaseException:
            self.close()
            raise
        return self

    def _oauth2_login(self, username: str, token: str, where: str) -> None:
        offered = {
            c.decode("ascii", "replace").upper().removeprefix("AUTH=")
            for c in self._client.capabilities()
        }
        mechanism = pick_mechanism(offered)
        if mechanism == "OAUTHBEARER":
            self._client.oauthbearer_login(username, token)
        elif mechanism == "XOAUTH2":
            self._client.oauth2_login(username, token)
        else:
            raise AuthError(f"IMAP server {where} offers neither OAUTHBEARER nor XOAUTH2")

    def _instrument(self, imap: Any) -> None:
        new_tag, read, readline = imap._new_tag, imap.read, imap.readline

        def counted_tag() -> bytes:
            self.round_trips += 1
            return new_tag()

        def counted_read(size: int) -> bytes:
            data = read(size)
            self.bytes_read += len(data)
            return data

        def counted_readline() -> bytes:
            data = readline()
            self.bytes_read += len(data)
            return data

        imap._new_tag = counted_tag
        imap.read = counted_read
        imap.readline = counted_readline

    @property
    def capabilities(self) -> frozenset[str]:
        """Upper-case capability names offered after login (e.g. ``"MOVE"``)."""
        return self._capabilities

    @property
    def condstore(self) -> bool:
        """CONDSTORE is enabled: fetches can carry MODSEQs and STOREs can be conditional."""
        return self._condstore

    def has(self, capability: str) -> bool:
        return capability.upper() in self._capabilities

    @property
    def selected(self) -> str | None:
        return self._selected

    def close(self) -> None:
        """Log out (best effort) and close the connection. Safe to call twice."""
        client, self._client = self._client, None
        if client is None:
            return
        self._broken = self._broken or "closed"
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- error translation -------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        if self._broken:
            raise ConnectionLost(f"IMAP connection to {self._host} unusable: {self._broken}")
        try:
            yield
        except (AuthError, ConfigError, ImapError, MessageError, ConnectionLost):
            raise
        except imap_exc.LoginError as exc:
            raise AuthError(f"{what}: login refused: {exc}") from exc
        except imaplib.IMAP4.readonly as exc:  # before .abort: it is a subclass
            raise ImapError(f"{what}: mailbox became read-only: {exc}") from exc
        except imaplib.IMAP4.abort as exc:
            self._broken = str(exc)
            raise ConnectionLost(f"{what}: IMAP connection to {self._host} lost: {exc}") from exc
        except ssl.SSLCertVerificationError as exc:
            self._broken = str(exc)
            raise AuthError(f"{what}: TLS certificate not trusted: {exc}") from exc
        except (OSError, EOFError) as exc:  # socket errors, timeouts, ssl.SSLError
            self._broken = str(exc) or type(exc).__name__
            raise ConnectionLost(
                f"{what}: IMAP connection to {self._host} lost: {exc or type(exc).__name__}"
            ) from exc
        except imaplib.IMAP4.error as exc:  # NO / BAD, imapclient's own errors
            raise ImapError(f"{what}: {exc}") from exc

    # -- low-level commands ----------------------------------------------------------------

    def _uid_command(self, command: str, *args: str | bytes) -> tuple[bytes, dict[str, list]]:
        """``UID <command> args``; returns (tagged OK text, untagged responses)."""
        imap = self._client._imap
        imap.untagged_responses.clear()
        tag = imap._command("UID", command, *args)
        typ, data = imap._command_complete(command, tag)
        text = data[0] if data and data[0] else b""
        if typ != "OK":
            raise ImapError(f"UID {command} failed: {text.decode('utf-8', 'replace')}")
        return text, imap.untagged_responses

    def _fetch(self, uid_set: str, items: str) -> dict[int, dict[bytes, Any]]:
        """``UID FETCH uid_set (items)`` keyed by UID.

        Not imapclient's ``fetch()``: in 4.1.0 it cannot take ``1:*`` (it runs
        ``int()`` over the set to drop unsolicited responses). Unsolicited FETCH
        responses without a UID are dropped here instead.
        """
        _text, untagged = self._uid_command("FETCH", uid_set, f"({items})")
        data = untagged.pop("FETCH", [])
        if not data:
            return {}
        return by_uid(data)

    def _store(self, uids: Sequence[int], op: str, flags: str) -> None:
        for chunk in chunks(sorted(set(uids))):
            self._uid_command("STORE", msgset(chunk), op, f"({flags})")

    def _require_selected(self) -> None:
        if self._selected is None:
            raise ImapError("no mailbox selected (call select() first)")

    def _folder(self, name: str) -> bytes:
        return self._client._normalise_folder(name)

    # -- mailboxes ---------------------------------------------------------------------------

    def status(self, mailbox: str) -> MailboxStatus:
        """One STATUS command (with HIGHESTMODSEQ when CONDSTORE is offered)."""
        what = ["MESSAGES", "UIDNEXT", "UIDVALIDITY"]
        if self.has("CONDSTORE"):
            what.append("HIGHESTMODSEQ")
        with self._guard(f"STATUS {mailbox}"):
            self._client._imap.untagged_responses.clear()
            st = self._client.folder_status(mailbox, what)
        return MailboxStatus(
            uidvalidity=int(st[b"UIDVALIDITY"]),
            uidnext=int(st[b"UIDNEXT"]),
            messages=int(st[b"MESSAGES"]),
            highestmodseq=int(st[b"HIGHESTMODSEQ"]) if b"HIGHESTMODSEQ" in st else None,
        )

    def select(self, mailbox: str) -> MailboxStatus:
        """SELECT *mailbox* read-write (CONDSTORE was ENABLEd at login when offered)."""
        with self._guard(f"SELECT {mailbox}"):
            self._selected = None
            self._client._imap.untagged_responses.clear()
            st = self._client.select_folder(mailbox)
            self._selected = mailbox
        self._exists = int(st[b"EXISTS"])
        modseq = st.get(b"HIGHESTMODSEQ") if self._condstore else None
        return MailboxStatus(
            uidvalidity=int(st[b"UIDVALIDITY"]),
            uidnext=int(st.get(b"UIDNEXT", 0)),
            messages=int(st[b"EXISTS"]),
            highestmodseq=int(modseq) if modseq is not None else None,
        )

    def current_status(self, mailbox: str) -> MailboxStatus:
        """The counts of *mailbox* as they are now, also when it is the selected one.

        Dovecot answers STATUS of the selected mailbox from the session's own view,
        which misses what other clients did since. So the selected mailbox is left first
        (UNSELECT), or, on a server without UNSELECT (CLOSE would expunge), selected
        again: its SELECT answer carries the same counts, fresh.
        """
        if self._selected == mailbox:
            if not self.has("UNSELECT"):
                return self.select(mailbox)
            with self._guard("UNSELECT"):
                self._client.unselect_folder()
            self._selected = None
        return self.status(mailbox)

    def current_statuses(self, mailboxes: Sequence[str]) -> list[MailboxStatus]:
        """:meth:`current_status` of each mailbox, pipelined: the UNSELECT it may need
        and every STATUS go out in one write, so the whole check costs one round trip
        (a running agent's no-change sync is this and nothing else). Without UNSELECT
        a selected mailbox among them is selected again, as there."""
        if self._selected in mailboxes and not self.has("UNSELECT"):
            return [self.current_status(mailbox) for mailbox in mailboxes]
        what = "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
        if not self.has("CONDSTORE"):
            what = "(MESSAGES UIDNEXT UIDVALIDITY)"
        imap = self._client._imap
        with self._guard(f"STATUS {', '.join(mailboxes)}"):
            imap.untagged_responses.clear()
            sent = []
            with _one_write(imap):
                if self._selected in mailboxes:
                    sent.append(("UNSELECT", imap._command("UNSELECT")))
                    self._selected = None
                for mailbox in mailboxes:
                    name = self._client._normalise_folder(mailbox)
                    sent.append(("STATUS", imap._command("STATUS", name, what)))
            for command, tag in sent:
                typ, data = imap._command_complete(command, tag)
                if typ != "OK":
                    text = (data[0] or b"").decode("utf-8", "replace") if data else ""
                    raise ImapError(f"{command} failed: {text}")
            lines = imap.untagged_responses.pop("STATUS", [])
        if len(lines) != len(mailboxes):
            raise ImapError(f"asked STATUS of {len(mailboxes)} mailboxes, got {len(lines)}")
        return [_status_of(line) for line in lines]

    def select_with_statuses(
        self, mailbox: str, others: Sequence[str]
    ) -> tuple[MailboxStatus, list[MailboxStatus]]:
        """SELECT *mailbox* (again when it is the selected one) and the STATUS of each
        of *others*, pipelined in one write: the counts of all of them as they are now,
        in one round trip.

        A SELECT opens the mailbox anew, so its counts are fresh, also of the selected
        mailbox (Dovecot answers its STATUS from the session's own, stale view). And the
        mailbox stays selected: an UNSELECT followed by STATUS made Dovecot open the
        inbox afresh, and the next session re-read its Maildir (100-280 ms at 50,000
        messages) where a re-SELECT of the open inbox takes ~1 ms.
        """
        what = "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
        if not self.has("CONDSTORE"):
            what = "(MESSAGES UIDNEXT UIDVALIDITY)"
        imap = self._client._imap
        with self._guard(f"SELECT {mailbox}, STATUS {', '.join(others)}"):
            self._selected = None
            imap.untagged_responses.clear()
            sent = []
            with _one_write(imap):
                sent.append(("SELECT", imap._command("SELECT", self._folder(mailbox))))
                for other in others:
                    sent.append(("STATUS", imap._command("STATUS", self._folder(other), what)))
            failed = ""
            for command, tag in sent:
                typ, data = imap._command_complete(command, tag)
                if typ != "OK" and not failed:
                    text = (data[0] or b"").decode("utf-8", "replace") if data else ""
                    failed = f"{command} failed: {text}"
            selected = imap.untagged_responses
            # imaplib's own state, as its select() would leave it (a refused SELECT
            # leaves no mailbox selected)
            imap.state = "SELECTED" if "EXISTS" in selected else "AUTH"
            if failed:
                raise ImapError(failed)
            lines = selected.pop("STATUS", [])
            try:
                counts = {
                    name: int(selected[name][-1]) for name in _SELECT_COUNTS if name in selected
                }
                inbox = MailboxStatus(
                    uidvalidity=counts["UIDVALIDITY"],
                    uidnext=counts["UIDNEXT"],
                    messages=counts["EXISTS"],
                    highestmodseq=counts.get("HIGHESTMODSEQ") if self._condstore else None,
                )
            except (KeyError, ValueError) as exc:
                raise ImapError(f"SELECT {mailbox}: incomplete answer ({exc!r})") from exc
        self._selected = mailbox
        self._exists = inbox.messages
        if len(lines) != len(others):
            raise ImapError(f"asked STATUS of {len(others)} mailboxes, got {len(lines)}")
        return inbox, [_status_of(line) for line in lines]

    def ensure_selected(self, mailbox: str) -> None:
        """SELECT *mailbox* unless it is the selected one (a SELECT right after a change
        makes Dovecot re-scan a Maildir: ~200 ms at 50,000 messages)."""
        if self._selected != mailbox:
            self.select(mailbox)


@contextlib.contextmanager
def _one_write(imap: Any) -> Iterator[None]:
    """imaplib's commands issued inside go out in one write at the end (commands
    without literals: ``_command`` returns as soon as it has sent), so a pipeline is one
    TCP segment rather than one per command that Nagle's algorithm may hold back."""
    lines: list[bytes] = []
    imap.send = lines.append
    try:
        yield
    finally:
        del imap.send  # the class's method again
    imap.send(b"".join(lines))


def _status_of(line: Any) -> MailboxStatus:
    """One untagged STATUS response. Its item list, the parenthesised numbers at its
    end, is read with a regular expression: imapclient's general parser took most of a
    running agent's own time in a no-change session. A mailbox name that came as a
    literal goes through that parser."""
    found = _STATUS_ITEMS.search(line) if isinstance(line, bytes) else None
    if found:
        words = found.group(1).upper().split()
        values: dict[bytes, Any] = dict(zip(words[::2], words[1::2], strict=True))
    else:
        parts = list(line) if isinstance(line, tuple) else [line]
        items = imapclient.response_parser.parse_response(parts)[-1]
        values = dict(zip(items[::2], items[1::2], strict=True))
    return MailboxStatus(
        uidvalidity=int(values[b"UIDVALIDITY"]),
        uidnext=int(values[b"UIDNEXT"]),
        messages=int(values[b"MESSAGES"]),
        highestmodseq=int(values[b"HIGHESTMODSEQ"]) if b"HIGHESTMODSEQ" in values else None,
    )
