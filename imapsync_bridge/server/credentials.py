"""The phone user's password: how it is hashed, stored and checked.

One password per phone user (``server set-password``), used by the submission listener
(:mod:`.submission`) and, later, the web page and the JSON API: all of them check it with
:func:`check_password`, behind one :class:`.throttle.Throttle`.

The hash is scrypt (``cryptography``'s :class:`Scrypt`): salted with 16 random bytes and
memory-hard (n = 2**14, r = 8, p = 1 costs 16 MiB and some tens of milliseconds per
check), so a stolen database is slow to brute-force on GPUs as well as on CPUs. It is
stored as a PHC-style string that carries its own parameters,
``$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` (base64 without padding), so the cost can be
raised later: a good password stored with lower parameters than :data:`PARAMETERS` is
re-hashed with the current ones at that login. The check derives with the stored
parameters and compares in constant time (``Scrypt.verify``); an unknown login costs one
derivation too, so timing does not tell whether a user exists.

The rows live in the ``passwords`` table (a migration of its own in :mod:`.store_schema`);
:class:`.store.PhoneStore` runs the row functions here inside its own transactions
(:class:`.store_api.CredentialStore`).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from imapsync_bridge.errors import ConfigError
from imapsync_bridge.server.store_api import CredentialStore
from imapsync_bridge.server.throttle import Throttle

KNOWN_PLACES = 8  # client blocks remembered per user (see Logins.check)
MAX_PASSWORD = 256  # characters: longer is a paste accident, not a password
SALT_BYTES = 16
HASH_BYTES = 32


@dataclass(frozen=True)
class Parameters:
    """scrypt's cost: n = 2**log_n (CPU and memory), r (block size), p (parallelism)."""

    log_n: int = 14
    r: int = 8
    p: int = 1

    def weaker_than(self, other: Parameters) -> bool:
        return (self.log_n, self.r, self.p) < (other.log_n, other.r, other.p)


#: what new hashes are made with; raise it and old hashes upgrade at their next login
PARAMETERS = Parameters()
# What a stored hash may ask for: a corrupted or planted row must not make one check
# take gigabytes (n * r * 128 bytes: 2**20 * 16 * 128 = 2 GiB is past any sane value).
_MAX_LOG_N, _MAX_R, _MAX_P = 20, 16, 4
_PHC = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


class BadPassword(ConfigError):
    """A password ``server set-password`` refuses (empty, too long, a NUL): exit 2."""


def validate(password: str) -> None:
    """Refuse what cannot be a usable password, with a one-line reason. A NUL could not
    be sent in AUTH PLAIN (it separates the fields)."""
    if not password:
        raise BadPassword("the password is empty")
    if len(password) > MAX_PASSWORD:
        raise BadPassword(f"the password is longer than {MAX_PASSWORD} characters")
    if "\x00" in password:
        raise BadPassword("the password contains a NUL character")


# -- the hash ----------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _kdf(salt: bytes, parameters: Parameters, length: int = HASH_BYTES) -> Scrypt:
    return Scrypt(salt=salt, length=length, n=2**parameters.log_n, r=parameters.r, p=parameters.p)


def hash_password(password: str, parameters: Parameters = PARAMETERS) -> str:
    """A new salted hash of ``password`` as a PHC-style string."""
    salt = os.urandom(SALT_BYTES)
    digest = _kdf(salt, parameters).derive(password.encode("utf-8"))
    p = parameters
    return f"$scrypt$ln={p.log_n},r={p.r},p={p.p}${_b64(salt)}${_b64(digest)}"


def parse_hash(encoded: str) -> tuple[Parameters, bytes, bytes] | None:
    """(parameters, salt, digest) of a stored hash; None when it is not one we made or
    asks for an absurd cost."""
    found = _PHC.fullmatch(encoded)
    if found is None:
        return None
    log_n, r, p = (int(found.group(i)) for i in (1, 2, 3))
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    try:
        salt, digest = _unb64(found.group(4)), _unb64(found.group(5))
    except ValueError:
        return None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        return None
    return Parameters(log_n, r, p), salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison). A hash
    that does not parse matches nothing."""
    parsed = parse_hash(encoded)
    if parsed is None:
        return False
    parameters, salt, digest = parsed
    try:
        _kdf(salt, parameters, len(digest)).verify(password.encode("utf-8"), digest)
    except InvalidKey:
        return False
    return True


# An unknown login is checked against this, so it costs what a known one costs.
_DUMMY_HASH = hash_password("not a password: no login has this hash")


# -- the service -------------------------------------------------------------------------
def set_password(store: CredentialStore, user: str, password: str) -> None:
    """Validate and store the user's new password (replacing the old one). Raises
    :class:`BadPassword`; :class:`.store_api.NoSuchUser`."""
    validate(password)
    store.set_password_hash(user, hash_password(password))


def check_password(store: CredentialStore, login: str, password: str) -> str | None:
    """The user name when ``login`` (a phone user name, or a phone address compared
    case-insensitively) has a password and ``password`` is it; else None. Slow on
    purpose (one scrypt derivation): call it in a worker thread, behind a throttle.
    A good password whose hash is weaker than :data:`PARAMETERS` is re-hashed."""
    found = store.password_hash(login) if 0 < len(login) <= 320 else None
    if found is None or len(password) > MAX_PASSWORD:
        verify_password(password[:MAX_PASSWORD], _DUMMY_HASH)
        return None
    user, encoded = found
    if not verify_password(password, encoded):
        return None
    parsed = parse_hash(encoded)
    if parsed is not None and parsed[0].weaker_than(PARAMETERS):
        store.set_password_hash(user, hash_password(password))
    return user


@dataclass(frozen=True)
class Login:
    """What :meth:`Logins.check` found: the user on a good password, else None;
    ``refused`` when the throttle refused the attempt unchecked."""

    user: str | None
    refused: bool = False


def client_block(address: str) -> str:
    """What the throttle counts a client address as: an IPv6 client by its /64 (one
    host is usually given a whole /64 to pick from), IPv4-mapped as IPv4."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class Logins:
    """Every password check of one server process, behind one :class:`.throttle.Throttle`
    (submission now; the web page and the API later share the same instance)."""

    def __init__(self, store: CredentialStore, throttle: Throttle | None = None) -> None:
        self.store = store
        self.throttle = throttle or Throttle()
        self._known: dict[str, OrderedDict[str, None]] = {}  # user: blocks she logged in from
        self._known_lock = threading.Lock()

    def check(self, login: str, password: str, address: str | None) -> Login:
        """Check ``password`` for ``login`` from client ``address`` (an IP), counting a
        bad one against the user (or the unknown login name) and the address. Blocking
        (scrypt): run it in a worker thread."""
        found = self.store.password_hash(login) if 0 < len(login) <= 320 else None
        user_subject = f"user:{found[0]}" if found else f"login:{login.lower()[:320]}"
        block = client_block(address) if address else None
        address_subjects = [f"address:{block}"] if block else []
        # where she logged in before, others' failures do not lock her out: only the
        # address's own count applies there
        known = found is not None and block is not None and self._known_place(found[0], block)
        checked = address_subjects if known else [user_subject, *address_subjects]
        if self.throttle.refused(*checked):
            return Login(None, refused=True)
        user = check_password(self.store, login, password)
        if user is None:
            self.throttle.failed(user_subject, *address_subjects)
        else:
            self.throttle.succeeded(user_subject)
            if block is not None:
                self._remember_place(user, block)
        return Login(user)

    def _known_place(self, user: str, block: str) -> bool:
        with self._known_lock:
            return block in self._known.get(user, ())

    def _remember_place(self, user: str, block: str) -> None:
        """Keep the user's last :data:`KNOWN_PLACES` client blocks of a good login."""
        with self._known_lock:
            places = self._known.setdefault(user, OrderedDict())
            places[block] = None
            places.move_to_end(block)
            while len(places) > KNOWN_PLACES:
                places.popitem(last=False)


# -- the rows (inside PhoneStore's transactions) ----------------------------------------
def save_hash(conn: sqlite3.Connection, user: str, encoded: str, now: str) -> None:
    """Insert or replace the user's hash (the caller checked the user exists)."""
    conn.execute(
        "INSERT INTO passwords (user_name, hash, changed) VALUES (?, ?, ?)"
        " ON CONFLICT (user_name) DO UPDATE SET hash = excluded.hash, changed = excluded.changed",
        (user, encoded, now),
    )


def load_hash(conn: sqlite3.Connection, login: str) -> tuple[str, str] | None:
    """(user, hash) for a user name, else for a phone address (case-insensitively; an
    address two users share logs in neither: it names no one); None without a password."""
    row = conn.execute(
        "SELECT u.name, p.hash FROM users u JOIN passwords p ON p.user_name = u.name"
        " WHERE u.name = ?",
        (login,),
    ).fetchone()
    if row is None:
        rows = conn.execute(
            "SELECT u.name, p.hash FROM users u JOIN passwords p ON p.user_name = u.name"
            " WHERE lower(u.address) = lower(?) LIMIT 2",
            (login,),
        ).fetchall()
        row = rows[0] if len(rows) == 1 else None
    return None if row is None else (str(row[0]), str(row[1]))
