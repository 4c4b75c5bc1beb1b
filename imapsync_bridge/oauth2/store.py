"""Where an OAuth2 grant is kept: beside the passwords, never in the INI file or a log.

Order of lookup, for one role (``imap`` or ``smtp``) of one account:

1. the OS keyring (service ``imapsync-bridge``, account ``<role>-oauth2:<user>@<host>``);
2. ``<state_dir>/oauth2-<role>.json`` (mode 0600), where the grant goes when there is no
   usable keyring (a headless server) and where a rotated refresh token is kept when the
   first one came from systemd;
3. ``$CREDENTIALS_DIRECTORY/<role>-oauth2``: a refresh token handed in by systemd
   (``LoadCredential=``). That directory is read-only, so a rotated token lands in the
   state_dir file, which remembers a digest of the credential it replaced: when the
   administrator installs a *different* credential later, that one wins again.

A grant holds the refresh token and the current access token with its expiry, so
``agent sync`` runs and the ``agent run`` threads share one access token. Every read and
write happens under an exclusive lock (``oauth2-<role>.lock`` in state_dir): with
rotating refresh tokens, two refreshes with the same token would revoke both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from imapsync_bridge.config import KEYRING_SERVICE, read_password_file

FILE_MODE = 0o600


@dataclass(frozen=True)
class Grant:
    refresh_token: str
    access_token: str = ""
    expires_at: float = 0.0  # epoch seconds; 0 = no access token yet
    lifetime: float = 0.0  # seconds the provider gave the access token
    credential: str = ""  # digest of the systemd credential this grant grew from

    def __repr__(self) -> str:  # never a token in a log or a traceback
        return f"Grant(expires_at={self.expires_at:.0f})"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The grant of one role of one account; see the module docstring."""

    def __init__(self, role: str, username: str, host: str, state_dir: Path) -> None:
        self.role = role
        self.account = f"{role}-oauth2:{username}@{host}"
        self.state_dir = state_dir
        self.path = state_dir / f"oauth2-{role}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / f"oauth2-{self.role}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self) -> Grant | None:
        """The grant to use (call under :meth:`locked`), or None: nobody signed in."""
        stored = _keyring_get(self.account)
        if stored is not None:
            return _parse(stored)
        credential = self._credential()
        if self.path.exists():
            grant = _parse(read_password_file(self.path))
            replaced = credential and grant and grant.credential not in ("", _digest(credential))
            if grant is not None and not replaced:
                return grant
        if credential:
            return Grant(refresh_token=credential, credential=_digest(credential))
        return None

    def save(self, grant: Grant) -> str:
        """Keep *grant* (call under :meth:`locked`); says where it went."""
        text = json.dumps(asdict(grant))
        if _keyring_set(self.account, text):
            return "the keyring"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)
        return str(self.path)

    def stamp(self) -> str | None:
        """A digest of the current refresh token: changes when someone signs in again."""
        with self.locked():
            grant = self.load()
        return _digest(grant.refresh_token) if grant else None

    def _credential(self) -> str | None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        path = Path(directory) / f"{self.role}-oauth2" if directory else None
        if path is None or not path.exists():
            return None
        return read_password_file(path).strip() or None


def _parse(text: str) -> Grant | None:
    """A stored grant; a bare token (pasted by hand) is a refresh token."""
    text = text.strip()
    if not text:
        return None
    if not text.startswith("{"):
        return Grant(refresh_token=text)
    try:
        fields = json.loads(text)
        return Grant(**{k: v for k, v in fields.items() if k in Grant.__dataclass_fields__})
    except (ValueError, TypeError):
        return None


def _keyring_get(account: str) -> str | None:
    import keyring
    from keyring.errors import KeyringError

    try:
        return keyring.get_password(KEYRING_SERVICE, account)
    except (KeyringError, RuntimeError):
        return None


def _keyring_set(account: str, value: str) -> bool:
    import keyring
    from keyring.errors import KeyringError

    try:
        keyring.set_password(KEYRING_SERVICE, account, value)
    except (KeyringError, RuntimeError):
        return False
    return True
