"""Certificates and TLS 1.3 on loopback: a real asyncio TLS server, real blocking clients."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imapsync_bridge.errors import AuthError, ConfigError, ConnectionLost
from imapsync_bridge.protocol import framing, pki, tls

TIMEOUT = 5.0


# --------------------------------------------------------------------------- helpers


class TLSServer:
    """An asyncio TLS server (server_context) on 127.0.0.1:0, run in a thread.

    Each connection: record the peer's serial and user, then answer each frame: ``ca`` with
    the CA certificate, anything else with ``{"type": "ok", "serial": ..., "user": ...}``.
    """

    def __init__(self, context: ssl.SSLContext, ca_pem: str = "") -> None:
        self.context = context
        self.ca_pem = ca_pem
        self.peers: list[tuple[int | None, str | None]] = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, ctx: None)  # failed handshakes are expected
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        serial = tls.peer_certificate_serial(ssl_object)
        der = ssl_object.getpeercert(binary_form=True)
        user = pki.certificate_user(der) if der else None
        self.peers.append((serial, user))
        try:
            while True:
                frame = await framing.read_frame_async(reader, 1 << 20, timeout=TIMEOUT)
                if frame["type"] == "ca":
                    reply = {"type": "ca_cert", "pem": self.ca_pem}
                else:
                    reply = {"type": "ok", "serial": serial, "user": user}
                await framing.write_frame_async(writer, reply)
        except Exception:  # noqa: BLE001 - a test server: any error ends the connection
            pass
        finally:
            writer.close()

    def __enter__(self) -> TLSServer:
        self._thread.start()
        assert self._ready.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


class Pki:
    """A server directory made by init_ca, plus helpers to make agent credentials."""

    def __init__(self, base: Path, hostname: str) -> None:
        self.dir = base
        self.hostname = hostname
        self.files = pki.init_ca(base, hostname)
        self.ca_key, self.ca_cert = pki.load_ca(base)
        self.ca_pem = self.files.ca_crt.read_text()

    def server_context(self) -> ssl.SSLContext:
        f = self.files
        return tls.server_context(f.ca_crt, f.server_crt, f.server_key)

    def agent(self, user: str = "alice", **issue_kw) -> tuple[Path, Path, int]:
        """Issue an agent certificate; returns (crt path, key path, serial)."""
        key_pem, csr_pem = pki.make_key_and_csr(user)
        cert_pem, serial, _ = pki.issue_client_cert(
            self.ca_key, self.ca_cert, csr_pem, user, **issue_kw
        )
        crt = self.dir / f"{user}-{serial}.crt"
        key = self.dir / f"{user}-{serial}.key"
        pki.write_public(crt, cert_pem)
        pki.write_private(key, key_pem)
        return crt, key, serial

    def agent_context(self, user: str = "alice", **issue_kw) -> tuple[ssl.SSLContext, int]:
        crt, key, serial = self.agent(user, **issue_kw)
        return tls.agent_context(self.files.ca_crt, crt, key), serial


@pytest.fixture
def ip_pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "server", "127.0.0.1")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "other", "127.0.0.1")


def _round_trip(sock: ssl.SSLSocket) -> dict:
    with sock:
        framing.write_frame(sock, {"type": "hello"})
        return framing.read_frame(sock)


# --------------------------------------------------------------------------- PKI files


def test_init_ca_writes_files_with_modes(ip_pki: Pki):
    for name, mode in [("ca.key", 0o600), ("server.key", 0o600), ("ca.crt", 0o644)]:
        assert stat.S_IMODE(os.stat(ip_pki.dir / name).st_mode) == mode, name
    assert (ip_pki.dir / "server.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert not [p for p in ip_pki.dir.iterdir() if p.name.endswith(".tmp")]
    assert ip_pki.files.fingerprint == pki.ca_fingerprint(ip_pki.ca_pem)
    ca = ip_pki.ca_cert
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3600) < lifetime < dt.timedelta(days=3700)


def test_init_ca_refuses_to_replace_a_ca(ip_pki: Pki):
    with pytest.raises(ConfigError, match="already exists"):
        pki.init_ca(ip_pki.dir, "127.0.0.1")


def _san(directory: Path) -> list:
    cert = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_server_certificate_names_only_the_host(tmp_path: Path, ip_pki: Pki):
    assert _san(ip_pki.dir) == [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    pki.init_ca(tmp_path / "dns", "Sync.Example.com")
    assert _san(tmp_path / "dns") == [x509.DNSName("sync.example.com")]
    pki.init_ca(tmp_path / "v6", "::1")
    assert _san(tmp_path / "v6") == [x509.IPAddress(ipaddress.ip_address("::1"))]
    with pytest.raises(ConfigError):
        pki.init_ca(tmp_path / "bad", "not a host name")


def test_write_private_is_0600_and_replaces(tmp_path: Path):
    path = tmp_path / "secret.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    pki.write_private(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fingerprint_of_pem_and_der_agree(ip_pki: Pki):
    der = ip_pki.ca_cert.public_bytes(pki.serialization.Encoding.DER)
    fp = pki.ca_fingerprint(ip_pki.ca_pem)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert pki.ca_fingerprint(der) == fp == pki.ca_fingerprint(ip_pki.ca_pem.encode())


def test_client_certificate_ignores_csr_name(ip_pki: Pki):
    _, csr = pki.make_key_and_csr("mallory")
    cert_pem, serial, not_after = pki.issue_client_cert(ip_pki.ca_key, ip_pki.ca_cert, csr, "alice")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.serial_number == serial
    assert cert.not_valid_after_utc == not_after
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert dt.timedelta(days=824) < not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=825)
    cert.verify_directly_issued_by(ip_pki.ca_cert)
    # the CA may also be given as PEM
    pem_key = (ip_pki.dir / "ca.key").read_text()
    pki.issue_client_cert(pem_key, ip_pki.ca_pem, csr, "alice", days=1)


def _self_signed(not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "far future")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC)).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def test_the_agent_reads_its_certificates_end_without_cryptography(ip_pki: Pki):
    """tls.not_valid_after (stdlib only, checked before every connection) agrees with
    cryptography: UTCTime up to 2049, GeneralizedTime from 2050 on."""
    _, csr = pki.make_key_and_csr("alice")
    for not_after in (dt.datetime(2021, 5, 6, 7, 8, 9, tzinfo=dt.UTC), None):
        pem, _serial, ends = pki.issue_client_cert(
            ip_pki.ca_key, ip_pki.ca_cert, csr, "alice", not_after=not_after
        )
        assert tls.not_valid_after(pem.encode()) == ends
    far = dt.datetime(2061, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    assert tls.not_valid_after(_self_signed(far)) == far
    garbage = b"-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n"
    for bad in (b"not a certificate", garbage):
        with pytest.raises(ValueError):
            tls.not_valid_after(bad)


def test_bad_csr_is_refused(ip_pki: Pki):
    _, csr = pki.make_key_and_csr("alice")
    lines = csr.strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    der[40] ^= 0x01  # inside the signed subject: the signature no longer matches
    tampered = "\n".join([lines[0], base64.b64encode(bytes(der)).decode(), lines[-1]])
    for bad in (tampered, "not a csr", ""):
        with pytest.raises(AuthError):
            pki.issue_client_cert(ip_pki.ca_key, ip_pki.ca_cert, bad, "alice")


# --------------------------------------------------------------------------- pairing codes


def test_pairing_code_round_trip(ip_pki: Pki):
    fp = ip_pki.files.fingerprint
    code, stored = pki.make_pairing_code(fp)
    token, prefix = pki.parse_pairing_code(f"  {code}\n")
    assert code == f"{token}.{fp[:32]}"
    assert prefix == fp[:32]
    assert stored == pki.token_hash(token) and len(stored) == 64
    assert pki.token_hash(token + "x") != stored  # the store looks codes up by this hash
    assert pki.make_pairing_code(fp)[0] != code  # one-time: a fresh token each time
    pki.check_ca_fingerprint(ip_pki.ca_pem, prefix)


def test_fingerprint_check_refuses_another_ca(ip_pki: Pki, other_pki: Pki):
    code, _ = pki.make_pairing_code(ip_pki.files.fingerprint)
    _, prefix = pki.parse_pairing_code(code)
    with pytest.raises(AuthError, match="does not match the fingerprint"):
        pki.check_ca_fingerprint(other_pki.ca_pem, prefix)
    with pytest.raises(AuthError, match="too short"):
        pki.check_ca_fingerprint(ip_pki.ca_pem, prefix[:8])


@pytest.mark.parametrize(
    "code",
    [
        "",
        "nodot",
        "tok.0123",
        "short.0123456789abcdef0123456789abcdef",
        "abcdefghijklmnopqrstuv.0123456789abcdef0123456789abcdeg",
        "abcdefghijklmnop qrstuv.0123456789abcdef0123456789abcdef",
        "a.b.0123456789abcdef0123456789abcdef",
    ],
)
def test_malformed_pairing_codes(code):
    with pytest.raises(AuthError, match="malformed pairing code") as info:
        pki.parse_pairing_code(code)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- TLS handshakes


def test_mutual_tls_server_sees_client_serial(ip_pki: Pki):
    ctx, serial = ip_pki.agent_context("alice")
    with TLSServer(ip_pki.server_context()) as server:
        sock = tls.connect("127.0.0.1", server.port, ctx, TIMEOUT)
        assert sock.version() == "TLSv1.3"
        reply = _round_trip(sock)
    assert reply == {"type": "ok", "serial": serial, "user": "alice"}
    assert server.peers == [(serial, "alice")]


def _assert_refused_after_handshake(server: TLSServer, ctx: ssl.SSLContext) -> None:
    # TLS 1.3: the client finishes its handshake before the server checks the client
    # certificate, so the refusal comes on the first read. An asyncio server drops the
    # connection without sending its alert (CPython's sslproto aborts the transport), so
    # the agent sees the connection close; the point is that the server never serves it.
    with pytest.raises((AuthError, ConnectionLost)):
        _round_trip(tls.connect("127.0.0.1", server.port, ctx, TIMEOUT))
    assert server.peers == []


def _blocking_server_refusal(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Exception:
    """A blocking stdlib server (which does send its alert): what the client's read raises."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except ssl.SSLError as exc:
            outcome.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        # read only: a write could race the server's close and fail before the alert is read
        with pytest.raises((AuthError, ConnectionLost)) as info:  # noqa: SIM117
            with tls.connect("127.0.0.1", port, client_ctx, TIMEOUT) as sock:
                framing.read_frame(sock)
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert outcome and isinstance(outcome[0], ssl.SSLError)  # the server refused it
    return info.value


def _expired_context(pki_: Pki) -> ssl.SSLContext:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    crt, key, _ = pki_.agent("alice", not_after=past)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # agent_context would refuse to build it
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki_.files.ca_crt)
    ctx.load_cert_chain(crt, key)
    return ctx


def test_client_cert_from_another_ca_is_refused(ip_pki: Pki, other_pki: Pki):
    crt, key, _ = other_pki.agent("alice")
    ctx = tls.agent_context(ip_pki.files.ca_crt, crt, key)  # pins the right CA
    with TLSServer(ip_pki.server_context()) as server:
        _assert_refused_after_handshake(server, ctx)
    # where the server's alert arrives, the agent reports it as a refused certificate
    refusal = _blocking_server_refusal(ip_pki.server_context(), ctx)
    assert isinstance(refusal, AuthError), refusal
    assert "refused our certificate" in str(refusal)


def test_expired_client_cert_is_refused(ip_pki: Pki):
    with TLSServer(ip_pki.server_context()) as server:
        _assert_refused_after_handshake(server, _expired_context(ip_pki))
    refusal = _blocking_server_refusal(ip_pki.server_context(), _expired_context(ip_pki))
    assert isinstance(refusal, AuthError), refusal


def test_agent_context_refuses_own_expired_certificate(ip_pki: Pki):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    crt, key, _ = ip_pki.agent("alice", not_after=past)
    with pytest.raises(AuthError, match="expired.*pair the agent again"):
        tls.agent_context(ip_pki.files.ca_crt, crt, key)


def test_missing_credentials_are_config_errors(ip_pki: Pki, tmp_path: Path):
    with pytest.raises(ConfigError, match="paired"):
        tls.agent_context(ip_pki.files.ca_crt, tmp_path / "no.crt", tmp_path / "no.key")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("nope")
    with pytest.raises(ConfigError):
        tls.server_context(garbage, ip_pki.files.server_crt, ip_pki.files.server_key)


def test_client_pinning_another_ca_refuses_server(ip_pki: Pki, other_pki: Pki):
    crt, key, _ = ip_pki.agent("alice")
    ctx = tls.agent_context(other_pki.files.ca_crt, crt, key)
    with (
        TLSServer(ip_pki.server_context()) as server,
        pytest.raises(AuthError, match="not issued by the pinned CA"),
    ):
        tls.connect("127.0.0.1", server.port, ctx, TIMEOUT)


def test_hostname_mismatch_is_refused(tmp_path: Path):
    named = Pki(tmp_path / "named", "sync.example.com")
    ctx, _ = named.agent_context()
    with TLSServer(named.server_context()) as server:
        with pytest.raises(AuthError, match="127.0.0.1"):
            tls.connect("127.0.0.1", server.port, ctx, TIMEOUT)
        # the name it was made for works (connecting to loopback, checking that name)
        sock = tls.connect(
            "127.0.0.1", server.port, ctx, TIMEOUT, server_hostname="sync.example.com"
        )
        assert _round_trip(sock)["user"] == "alice"


def test_dns_name_hostname_works(tmp_path: Path):
    local = Pki(tmp_path / "local", "localhost")
    ctx, serial = local.agent_context()
    with TLSServer(local.server_context()) as server:
        assert _round_trip(tls.connect("localhost", server.port, ctx, TIMEOUT))["serial"] == serial


def test_ip_address_hostname_works(ip_pki: Pki):
    ctx, serial = ip_pki.agent_context()
    with TLSServer(ip_pki.server_context()) as server:
        assert _round_trip(tls.connect("127.0.0.1", server.port, ctx, TIMEOUT))["serial"] == serial


def test_tls12_only_client_is_refused(ip_pki: Pki):
    crt, key, _ = ip_pki.agent()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ip_pki.files.ca_crt)
    ctx.load_cert_chain(crt, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        TLSServer(ip_pki.server_context()) as server,
        pytest.raises((AuthError, ConnectionLost)),  # asyncio closes without an alert
    ):
        tls.connect("127.0.0.1", server.port, ctx, TIMEOUT)
    assert server.peers == []
    refusal = _blocking_server_refusal(ip_pki.server_context(), ctx)
    assert isinstance(refusal, AuthError), refusal  # a protocol-version alert


def test_contexts_are_tls13_only(ip_pki: Pki):
    crt, key, _ = ip_pki.agent()
    for ctx in (
        ip_pki.server_context(),
        tls.agent_context(ip_pki.files.ca_crt, crt, key),
        tls.pairing_probe_context(),
        tls.server_verifying_context(ip_pki.files.ca_crt),
    ):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    agent = tls.agent_context(ip_pki.files.ca_crt, crt, key)
    assert agent.check_hostname and agent.verify_mode == ssl.CERT_REQUIRED
    assert len(agent.get_ca_certs()) == 1  # the pinned CA, no system store
    assert ip_pki.server_context().verify_mode == ssl.CERT_OPTIONAL


def test_connection_refused_is_connection_lost(ip_pki: Pki):
    ctx, _ = ip_pki.agent_context()
    with TLSServer(ip_pki.server_context()) as server:
        port = server.port
    with pytest.raises(ConnectionLost, match="cannot connect"):
        tls.connect("127.0.0.1", port, ctx, TIMEOUT)


def test_read_timeout_over_tls_is_connection_lost(ip_pki: Pki):
    ctx, _ = ip_pki.agent_context()
    with (
        TLSServer(ip_pki.server_context()) as server,
        tls.connect("127.0.0.1", server.port, ctx, 0.3) as sock,
        pytest.raises(ConnectionLost, match="timed out"),
    ):
        framing.read_frame(sock)


# --------------------------------------------------------------------------- pairing flow


def _probe(server: TLSServer, host: str = "127.0.0.1") -> tuple[bytes, str]:
    """Pairing step 1: fetch the CA without verification; return (leaf DER, CA PEM)."""
    with tls.connect(host, server.port, tls.pairing_probe_context(), TIMEOUT) as sock:
        leaf = sock.getpeercert(binary_form=True)
        framing.write_frame(sock, {"type": "ca"})
        reply = framing.read_frame(sock)
    assert reply["type"] == "ca_cert"
    return leaf, reply["pem"]


def test_pairing_probe_then_pinned_connection(ip_pki: Pki):
    code, _ = pki.make_pairing_code(ip_pki.files.fingerprint)
    _, prefix = pki.parse_pairing_code(code)
    with TLSServer(ip_pki.server_context(), ip_pki.ca_pem) as server:
        leaf, ca_pem = _probe(server)
        assert server.peers == [(None, None)]  # a pairing connection has no client cert
        pki.check_ca_fingerprint(ca_pem, prefix)
        tls.verify_leaf_issued_by(leaf, ca_pem, "127.0.0.1")
        # step 2: pin that CA, talk over a verified connection (still no client cert)
        ca_file = ip_pki.dir / "pinned-ca.crt"
        pki.write_public(ca_file, ca_pem)
        verified = tls.connect(
            "127.0.0.1", server.port, tls.server_verifying_context(ca_file), TIMEOUT
        )
        assert _round_trip(verified) == {"type": "ok", "serial": None, "user": None}
        # the agent then gets its certificate (issued directly here) and uses it
        crt, key, serial = ip_pki.agent("alice")
        ctx = tls.agent_context(ca_file, crt, key)
        assert _round_trip(tls.connect("127.0.0.1", server.port, ctx, TIMEOUT))["serial"] == serial


def test_pairing_detects_impostor_server(ip_pki: Pki, other_pki: Pki):
    """An impostor with its own CA fails the fingerprint check; one that hands out the
    genuine CA certificate fails the leaf check."""
    _, prefix = pki.parse_pairing_code(pki.make_pairing_code(ip_pki.files.fingerprint)[0])
    with TLSServer(other_pki.server_context(), other_pki.ca_pem) as impostor:
        leaf, ca_pem = _probe(impostor)
        with pytest.raises(AuthError, match="fingerprint"):
            pki.check_ca_fingerprint(ca_pem, prefix)
        # and an agent that pinned the genuine CA refuses it at the pairing step too
        pinned = tls.server_verifying_context(ip_pki.files.ca_crt)
        with pytest.raises(AuthError, match="not issued by the pinned CA"):
            tls.connect("127.0.0.1", impostor.port, pinned, TIMEOUT)
    with TLSServer(other_pki.server_context(), ip_pki.ca_pem) as replayer:
        leaf, ca_pem = _probe(replayer)
        pki.check_ca_fingerprint(ca_pem, prefix)  # the genuine CA, copied
        with pytest.raises(AuthError, match="not issued by the pinned CA"):
            tls.verify_leaf_issued_by(leaf, ca_pem, "127.0.0.1")


def test_verify_leaf_checks_the_name(ip_pki: Pki):
    with TLSServer(ip_pki.server_context(), ip_pki.ca_pem) as server:
        leaf, ca_pem = _probe(server)
    tls.verify_leaf_issued_by(leaf, ca_pem, "127.0.0.1")
    with pytest.raises(AuthError):
        tls.verify_leaf_issued_by(leaf, ca_pem, "sync.example.com")
    with pytest.raises(AuthError):
        tls.verify_leaf_issued_by(leaf, ca_pem, "127.0.0.2")
    with pytest.raises(AuthError, match="no certificate"):
        tls.verify_leaf_issued_by(None, ca_pem, "127.0.0.1")
    with pytest.raises(AuthError):
        tls.verify_leaf_issued_by(b"garbage", ca_pem, "127.0.0.1")


def test_pairing_codes_never_look_like_a_command_line_option() -> None:
    fingerprint = "ab" * 32
    codes = [pki.make_pairing_code(fingerprint)[0] for _ in range(2000)]
    assert not [code for code in codes if code.startswith("-")]
