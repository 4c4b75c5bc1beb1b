"""Security end to end (issue 2, test 7): what must be refused is refused, clearly, and
changes nothing.

Real Dovecot, the real hosted server over mutual TLS 1.3, the real agent. Each test takes
a dump of everything a user could lose (the server's SQLite tables, the agent's state
database, the desktop mailboxes) before the attack and compares it after. Hostile frames
go through a raw TLS session that speaks the framing by hand.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import secrets
import sqlite3
import struct
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bridge import Bridge, Mail, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dovecot import Dovecot

from imapsync_bridge.errors import AuthError, ConnectionLost
from imapsync_bridge.protocol import framing, pki, tls
from imapsync_bridge.server.store import PhoneStore

Frames = list[tuple[str | None, dict[str, Any]]]
Rows = dict[str, list[tuple[Any, ...]]]  # table name -> all its rows


@pytest.fixture
def frames() -> Frames:
    """Every (user, frame) the server read and passed to its handler, in order."""
    return []


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path, frames: Frames) -> Iterator[Bridge]:
    """Alice paired and synced once: four messages on the desktop, all on the phone."""
    b = Bridge(dovecot, tmp_path, window=6).start(observer=lambda u, f: frames.append((u, f)))
    try:
        pair(b.agent_ini, b.code)
        for n in range(1, 5):
            b.deliver(n)
        b.sync_ok()
        yield b
    finally:
        b.stop()


def pair(agent_ini: Path, code: str) -> None:
    """`agent pair` as a user types it."""
    rc, _out, err = run_cli("agent", "pair", "--config", str(agent_ini), "--code", code)
    assert rc == 0, err


# -- what a user could lose --------------------------------------------------------------

SERVER_TABLES = ("users", "pairing_codes", "certificates", "messages", "phone_actions")
# A refused sync records its failure for `agent status`; nothing else may change.
AGENT_FAILURE_RECORD = ("last_result", "last_error")


def server_rows(bridge: Bridge) -> Rows:
    with closing(sqlite3.connect(bridge.server_dir / "phone.sqlite3")) as db:
        return {
            t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in SERVER_TABLES
        }


def agent_rows(state_dir: Path) -> Rows:
    path = state_dir / "agent.sqlite3"
    if not path.exists():
        return {}
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    rows["meta"] = [r for r in rows.get("meta", []) if r[0] not in AGENT_FAILURE_RECORD]
    return rows


@dataclass(frozen=True)
class Stores:
    server: Rows
    agent: dict[str, Rows]  # by phone user
    desktop: dict[str, list[Mail]]


def stores(bridge: Bridge, *others: Bridge) -> Stores:
    """Server tables, the agents' state dbs and the desktop mailboxes of these bridges."""
    agent: dict[str, Rows] = {}
    desktop: dict[str, list[Mail]] = {}
    for b in (bridge, *others):
        agent[b.phone_user] = agent_rows(b.agent_ini.parent / "state")
        desktop[f"{b.user} INBOX"] = b.mails("INBOX")
        desktop[f"{b.user} Trash"] = b.mails("Trash")
    return Stores(server_rows(bridge), agent, desktop)


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def one_line_error(err: str) -> str:
    """The CLI's error message: one line (stderr may also carry log lines)."""
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("imapsync-bridge: "), err
    return lines[0]


def state_dir(bridge: Bridge) -> Path:
    return bridge.agent_ini.parent / "state"


# -- a raw TLS session to the sync listener --------------------------------------------


class RawSession:
    """One TLS connection to the sync listener, frames written and read by hand."""

    def __init__(self, bridge: Bridge, crt: Path, key: Path) -> None:
        assert bridge.server is not None
        context = tls.server_verifying_context(bridge.server_dir / "ca.crt")
        context.load_cert_chain(crt, key)
        self.sock = tls.connect("127.0.0.1", bridge.server.port, context, timeout=10)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: dict[str, Any]) -> None:
        framing.write_frame(self.sock, frame)

    def send_body(self, body: bytes) -> None:
        """A frame whose body is exactly these bytes (not necessarily JSON)."""
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def receive(self) -> dict[str, Any] | None:
        """The next frame, or None once the server has closed the connection."""
        try:
            return framing.read_frame(self.sock)
        except ConnectionLost as exc:
            assert "timed out" not in str(exc), "the server neither answered nor closed"
            return None
        except AuthError:  # the server's TLS alert: our certificate was refused
            return None

    def request(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        self.send(frame)
        return self.receive()

    def hello(self) -> dict[str, Any]:
        welcome = self.request({"type": "hello", "protocol": 1, "agent": "raw-test"})
        assert welcome is not None and welcome["type"] == "welcome", welcome
        return welcome


def agent_session(bridge: Bridge) -> RawSession:
    """A raw session with the agent's own certificate and key (a paired agent)."""
    return RawSession(bridge, state_dir(bridge) / "agent.crt", state_dir(bridge) / "agent.key")


def frames_answered(bridge: Bridge, crt: Path, key: Path) -> list[dict[str, Any]]:
    """What the server sends a client presenting crt/key that asks for the CA and a
    session; [] when it refuses the certificate (in the handshake or on the first read)."""
    try:
        session = RawSession(bridge, crt, key)
    except (AuthError, ConnectionLost):
        return []
    answers = []
    with session:
        for frame in ({"type": "ca"}, {"type": "hello", "protocol": 1, "agent": "raw-test"}):
            try:
                session.send(frame)
            except (AuthError, ConnectionLost):
                break
            reply = session.receive()
            if reply is None:
                break
            answers.append(reply)
    return answers


# -- certificates ------------------------------------------------------------------------


def write_key_and_cert(directory: Path, key_pem: str, cert_pem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_private(directory / "agent.key", key_pem)
    pki.write_public(directory / "agent.crt", cert_pem)
    return directory / "agent.crt", directory / "agent.key"


def foreign_certificate(tmp_path: Path, user: str, serial: int) -> tuple[str, str]:
    """(key, cert) from another CA, for ``user``, carrying ``serial`` (copied from a real
    certificate: the server must check the issuer, not only the serial)."""
    pki.init_ca(tmp_path / "other-ca", "127.0.0.1")
    ca_key, ca_cert = pki.load_ca(tmp_path / "other-ca")
    key_pem, csr_pem = pki.make_key_and_csr(user)
    public_key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def cert_serial(path: Path) -> int:
    return pki.load_certificate(path.read_bytes()).serial_number


# -- 1. a certificate from another CA ----------------------------------------------------


def use_certificate_of_another_ca(bridge: Bridge, tmp_path: Path) -> None:
    """Replace the agent's key and certificate by ones another CA issued to alice."""
    other = pki.init_ca(tmp_path / "another-ca", "127.0.0.1")
    key_pem, csr_pem = pki.make_key_and_csr("alice")
    cert_pem, _serial, _ = pki.issue_client_cert(
        other.ca_key.read_bytes(), other.ca_crt.read_bytes(), csr_pem, "alice"
    )
    write_key_and_cert(state_dir(bridge), key_pem, cert_pem)


def test_a_certificate_from_another_ca_is_refused(
    bridge: Bridge, tmp_path: Path, frames: Frames
) -> None:
    real_serial = cert_serial(state_dir(bridge) / "agent.crt")
    use_certificate_of_another_ca(bridge, tmp_path)
    before, handled = stores(bridge), len(frames)

    rc, _out, err = bridge.sync()
    assert rc == 1
    one_line_error(err)
    assert stores(bridge) == before
    assert bridge.agent_status()["last_result"] == "failed"

    # A raw client, even one copying the serial of alice's registered certificate.
    forged = write_key_and_cert(
        tmp_path / "forged", *foreign_certificate(tmp_path, "alice", real_serial)
    )
    foreign = (state_dir(bridge) / "agent.crt", state_dir(bridge) / "agent.key")
    for crt, key in (foreign, forged):
        assert frames_answered(bridge, crt, key) == []
    assert len(frames) == handled  # not one frame of theirs reached the server's handler
    assert stores(bridge) == before


def test_the_agent_says_its_certificate_was_refused(bridge: Bridge, tmp_path: Path) -> None:
    use_certificate_of_another_ca(bridge, tmp_path)
    rc, _out, err = bridge.sync()
    assert rc == 1
    assert "certificate" in one_line_error(err)


# -- 2. an expired certificate the server issued -----------------------------------------


def test_an_expired_certificate_is_refused(bridge: Bridge, tmp_path: Path) -> None:
    key_pem, csr_pem = pki.make_key_and_csr("alice")
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert_pem, serial, not_after = pki.issue_client_cert(
        (bridge.server_dir / "ca.key").read_bytes(),
        (bridge.server_dir / "ca.crt").read_bytes(),
        csr_pem,
        "alice",
        not_after=yesterday,
    )
    # Registered and not revoked: only its expiry is wrong.
    with PhoneStore(bridge.server_dir / "phone.sqlite3") as store:
        store.register_certificate("alice", serial, not_after)
    crt, key = write_key_and_cert(state_dir(bridge), key_pem, cert_pem)
    before = stores(bridge)

    rc, _out, err = bridge.sync()
    assert rc == 1
    line = one_line_error(err)
    assert "certificate expired" in line and "pair the agent again" in line
    assert stores(bridge) == before

    # The server refuses it too, for a client that does not check its own expiry.
    assert frames_answered(bridge, crt, key) == []
    assert stores(bridge) == before


# -- 3. a revoked certificate ------------------------------------------------------------


def test_a_revoked_certificate_is_refused(
    bridge: Bridge, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_serial = cert_serial(state_dir(bridge) / "agent.crt")
    rc, out, err = run_cli("server", "pair-code", "--config", str(bridge.server_ini), "alice")
    assert rc == 0, err
    fresh = copy.copy(bridge)
    fresh.agent_ini = tmp_path / "new-agent" / "agent.ini"
    fresh.write_agent_config(fresh.agent_ini)
    pair(fresh.agent_ini, out.strip().splitlines()[-1])
    before = stores(bridge)

    caplog.set_level(logging.WARNING, logger="imapsync_bridge.server.listener")
    rc, _out, err = bridge.sync()
    assert rc == 1
    assert "certificate" in one_line_error(err)
    assert f"refused certificate {old_serial:x} (unknown or revoked)" in caplog.text
    assert stores(bridge) == before
    assert frames_answered(
        bridge, state_dir(bridge) / "agent.crt", state_dir(bridge) / "agent.key"
    ) == [
        {"type": "ca_cert", "pem": (bridge.server_dir / "ca.crt").read_text()},
        {
            "type": "error",
            "code": "unauthenticated",
            "message": "a client certificate issued by this server is required",
        },
    ]
    assert stores(bridge) == before
    rc, _out, err = fresh.sync()  # the new agent works
    assert rc == 0, err


# -- 4. bad pairing codes ---------------------------------------------------------------


def _fresh_code(bridge: Bridge) -> str:
    rc, out, err = run_cli("server", "pair-code", "--config", str(bridge.server_ini), "alice")
    assert rc == 0, err
    return out.strip().splitlines()[-1]


def _wrong_token(bridge: Bridge, tmp_path: Path) -> str:
    _token, fingerprint = _fresh_code(bridge).split(".")
    return f"{secrets.token_urlsafe(16)}.{fingerprint}"


def _malformed(bridge: Bridge, tmp_path: Path) -> str:
    _fresh_code(bridge)
    return "not-a-pairing-code"


def _other_server(bridge: Bridge, tmp_path: Path) -> str:
    token, _fingerprint = _fresh_code(bridge).split(".")
    other = pki.init_ca(tmp_path / "other-ca", "127.0.0.1")
    return f"{token}.{other.fingerprint[:32]}"


def _used_twice(bridge: Bridge, tmp_path: Path) -> str:
    code = _fresh_code(bridge)
    first = tmp_path / "first-agent" / "agent.ini"
    bridge.write_agent_config(first)
    pair(first, code)
    return code


@pytest.mark.parametrize(
    ("make_code", "message", "frames_sent"),
    [
        (_wrong_token, "pairing code is wrong, used or expired", ["ca", "pair"]),
        (_malformed, "malformed pairing code", []),
        (_other_server, "does not match the fingerprint in the pairing code", ["ca"]),
        (_used_twice, "pairing code is wrong, used or expired", ["ca", "pair"]),
    ],
    ids=["wrong-token", "malformed", "other-server", "used-twice"],
)
def test_a_bad_pairing_code_is_refused(
    bridge: Bridge,
    tmp_path: Path,
    frames: Frames,
    make_code: Any,
    message: str,
    frames_sent: list[str],
) -> None:
    code = make_code(bridge, tmp_path)
    agent_ini = tmp_path / "new-agent" / "agent.ini"
    bridge.write_agent_config(agent_ini)
    before, handled = stores(bridge), len(frames)

    rc, _out, err = run_cli("agent", "pair", "--config", str(agent_ini), f"--code={code}")
    assert rc != 0
    assert message in one_line_error(err)
    assert stores(bridge) == before  # no certificate registered, no code used up
    assert not (agent_ini.parent / "state" / "agent.key").exists()
    assert not (agent_ini.parent / "state" / "agent.crt").exists()
    assert [f["type"] for _user, f in frames[handled:]] == frames_sent


# -- 5. hostile frames from a paired agent ----------------------------------------------


def test_an_oversized_frame_header_ends_only_that_session(bridge: Bridge) -> None:
    before = stores(bridge)
    with agent_session(bridge) as bystander, agent_session(bridge) as attacker:
        bystander.hello()
        attacker.hello()
        attacker.sock.sendall(struct.pack(">I", 2**32 - 1))  # 4 GiB announced, never sent
        reply = attacker.receive()
        if reply is not None:
            assert (reply["type"], reply["code"]) == ("error", "protocol"), reply
            assert "limit" in reply["message"]
        assert attacker.receive() is None  # and the server closed that session
        snapshot = bystander.request({"type": "snapshot"})
        assert snapshot is not None and snapshot["type"] == "snapshot"
        assert len(snapshot["messages"]) == 4
    assert stores(bridge) == before
    bridge.deliver(5)
    bridge.sync_ok()  # the server keeps serving
    bridge.assert_in_sync()


def _newest_key(bridge: Bridge) -> str:
    return bridge.phone_list()["inbox"][0]["message_id"]


RAW = framing.b64encode_bytes(b"Message-ID: <evil@x>\r\nSubject: evil\r\n\r\nevil\r\n")
NOW = "2024-06-01T12:00:00+00:00"


def _put(key: str, raw: str = RAW) -> dict[str, Any]:
    return {"kind": "put", "key": key, "message_id": key, "raw": raw, "internaldate": NOW,
            "seen": True, "flagged": True, "folder": "inbox"}  # fmt: skip


def _mark_read(key: str) -> dict[str, Any]:
    return {"kind": "flags", "key": key, "seen": True, "flagged": True, "since": 0}


# (name, greet first, what to send (bytes = a raw body) given (key, next seq), message)
def _batch(seq: Any, op: dict[str, Any]) -> dict[str, Any]:
    """An ``ops`` frame carrying one action."""
    return {"type": "ops", "ops": [{"seq": seq, "op": op}]}


HOSTILE_FRAMES = [
    ("not JSON", True, lambda k, s: b"{not json", "frame is not valid JSON"),
    ("a JSON array", True, lambda k, s: b'[{"type": "snapshot"}]', "frame is a JSON array"),
    ("unknown type", True, lambda k, s: {"type": "gimme"}, "unknown frame type 'gimme'"),
    (
        "bool seq",
        True,
        lambda k, s: _batch(True, _mark_read(k)),
        "field 'ops[0].seq' must be an integer",
    ),
    (
        "op before hello",
        False,
        lambda k, s: _batch(10**6, _mark_read(k)),
        "must start with 'hello'",
    ),
    (
        "put with invalid base64",
        True,
        lambda k, s: _batch(s, _put("<new@x>", raw="@@@@not base64")),
        "field 'ops[0].op.raw' must be valid base64",
    ),
    (
        "put with a 2000-character key",
        True,
        lambda k, s: _batch(s, _put("<" + "k" * 1998 + ">")),
        "field 'ops[0].op.key' must be at most 1000 characters",
    ),
]


@pytest.mark.parametrize(
    ("greet", "make_frame", "message"),
    [case[1:] for case in HOSTILE_FRAMES],
    ids=[case[0] for case in HOSTILE_FRAMES],
)
def test_a_malformed_frame_gets_a_protocol_error_and_changes_nothing(
    bridge: Bridge, greet: bool, make_frame: Any, message: str
) -> None:
    key = _newest_key(bridge)
    before = stores(bridge)
    with agent_session(bridge) as session:
        seq = session.hello()["last_seq"] + 1 if greet else 0
        frame = make_frame(key, seq)
        if isinstance(frame, bytes):
            session.send_body(frame)
        else:
            session.send(frame)
        reply = session.receive()
    assert reply is not None and reply["type"] == "error", reply
    assert reply["code"] == "protocol"
    assert message in reply["message"]
    assert "\n" not in reply["message"]
    assert stores(bridge) == before
    bridge.sync_ok()  # the agent is not disturbed


# -- 6 and 7. one user's certificate or CLI never touches another user's mailbox ---------


def add_user(bridge: Bridge, dovecot: Dovecot, tmp_path: Path, name: str) -> Bridge:
    """A second phone user with its own Dovecot user and agent, paired and synced.

    A shallow copy of ``bridge``: it shares the running server; never ``stop()`` it.
    """
    other = copy.copy(bridge)
    other.user = dovecot.new_user()
    other.phone_user = name
    other.agent_ini = tmp_path / f"{name}-agent" / "agent.ini"
    rc, out, err = run_cli(
        "server", "add-user", "--config", str(bridge.server_ini), name,
        "--address", f"{name}@phone.example", "--desktop-address", f"{other.user}@corp.example",
        "--window", "6",
    )  # fmt: skip
    assert rc == 0, err
    other.write_agent_config(other.agent_ini)
    pair(other.agent_ini, out.strip().splitlines()[-1])
    for n in range(1, 4):
        other.deliver(n)
    other.sync_ok()
    return other


def user_rows(rows: Rows, user: str) -> dict[str, list[Any]]:
    """One user's rows of the server tables (user_name is column 1, users.name column 0)."""
    mine = {t: [r for r in rows[t] if r[1] == user] for t in SERVER_TABLES if t != "users"}
    mine["users"] = [r for r in rows["users"] if r[0] == user]
    return mine


def test_a_certificate_never_touches_another_users_mailbox(
    bridge: Bridge, dovecot: Dovecot, tmp_path: Path
) -> None:
    bob = add_user(bridge, dovecot, tmp_path, "bob")
    bob_keys = bob.phone_inbox_ids()
    assert len(bob_keys) == 3 and not set(bob_keys) & set(bridge.phone_inbox_ids())
    bob_phone = bob.phone_list()
    before = stores(bridge, bob)

    with agent_session(bridge) as alice:
        seq = alice.hello()["last_seq"]
        for key in bob_keys:
            for op in (
                {"kind": "flags", "key": key, "seen": True, "flagged": True, "since": 0},
                {"kind": "move", "key": key, "folder": "trash"},
                {"kind": "evict", "key": key},
                {"kind": "destroy", "key": key},
            ):
                seq += 1
                assert alice.request(_batch(seq, op)) == {"type": "acked", "up_to": seq}
        reply = alice.request({"type": "fetch", "key": bob_keys[0]})
        assert reply is not None and reply["type"] == "error"
        assert reply["message"] == f"no phone message {bob_keys[0]}"

    after = stores(bridge, bob)
    assert bob.phone_list() == bob_phone
    assert user_rows(after.server, "bob") == user_rows(before.server, "bob")
    # Alice's mailbox did not know these keys: only her op counter moved.
    assert after.server["messages"] == before.server["messages"]
    assert after.desktop == before.desktop
    rc, _out, err = bob.sync()
    assert rc == 0, err
    assert stores(bridge, bob).desktop == before.desktop


@pytest.mark.parametrize(
    "verb", ["show", "delete", "restore", "destroy", "read", "unread", "flag", "unflag"]
)
def test_the_phone_cli_refuses_another_users_message(
    bridge: Bridge, dovecot: Dovecot, tmp_path: Path, verb: str
) -> None:
    bob = add_user(bridge, dovecot, tmp_path, "bob")
    bobs_id = bob.phone_list()["inbox"][0]["id"]
    before = stores(bridge, bob)

    rc, out, err = run_cli(
        "phone", "--config", str(bridge.server_ini), "--user", "alice", verb, str(bobs_id)
    )
    assert rc == 1
    assert out == ""
    assert one_line_error(err) == f"imapsync-bridge: no message {bobs_id}"
    assert stores(bridge, bob) == before
