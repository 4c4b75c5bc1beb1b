"""The hosted server's own certificate authority, pairing codes and agent certificates.

``server init`` makes a CA and a server certificate (:func:`init_ca`). ``server add-user``
makes a one-time pairing code (:func:`make_pairing_code`): a random token plus the first
32 hex digits of the CA's SHA-256 fingerprint, so the agent can check the server on first
contact without trusting it blindly. ``agent pair`` makes a key and a CSR
(:func:`make_key_and_csr`); the server checks the token and issues a client certificate
(:func:`issue_client_cert`) whose CN is the user, whatever the CSR says.

Keys are ECDSA P-256 (signatures SHA-256): fast, small, and handled by every OpenSSL that
Python's ``ssl`` links against, in TLS 1.3. Certificates carry the extensions a strict
RFC 5280 verifier wants (critical basicConstraints and keyUsage, SKI/AKI, EKU), so both
OpenSSL's and ``cryptography``'s verifiers accept them.

PEM text is returned as ``str``; inputs accept ``str`` or ``bytes``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imapsync_bridge.errors import AuthError, ConfigError

CA_DAYS = 3650
SERVER_DAYS = 3650
CLIENT_DAYS = 825
BACKDATE = dt.timedelta(hours=1)  # tolerate clocks a little behind ours
FINGERPRINT_PREFIX = 32  # hex digits of the CA fingerprint carried by a pairing code

CA_KEY, CA_CRT, SERVER_KEY, SERVER_CRT = "ca.key", "ca.crt", "server.key", "server.crt"

PemLike = str | bytes


@dataclass(frozen=True)
class CaFiles:
    """What :func:`init_ca` wrote."""

    ca_key: Path
    ca_crt: Path
    server_key: Path
    server_crt: Path
    fingerprint: str  # hex SHA-256 of the CA certificate (DER)


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _pem_text(data: PemLike) -> bytes:
    return data.encode("ascii") if isinstance(data, str) else bytes(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def write_private(path: str | os.PathLike[str], data: PemLike) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    _write_atomic(Path(path), _pem_text(data), 0o600)


def write_public(path: str | os.PathLike[str], data: PemLike) -> None:
    """Write ``data`` to ``path`` with mode 0644, atomically (for certificates)."""
    _write_atomic(Path(path), _pem_text(data), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)  # mkstemp makes it 0600; set the final mode before any data
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_private_key(data: PemLike) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_pem_text(data), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key")
    return key


def load_certificate(data: PemLike) -> x509.Certificate:
    """A certificate from PEM (str/bytes) or DER (bytes)."""
    raw = _pem_text(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise AuthError(f"unreadable certificate: {exc}") from None


def load_ca(
    directory: str | os.PathLike[str],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate that :func:`init_ca` wrote in ``directory``."""
    base = Path(directory)
    try:
        key = load_private_key((base / CA_KEY).read_bytes())
        cert = load_certificate((base / CA_CRT).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the CA in {base}: {exc.strerror or exc}") from None
    return key, cert


def host_name(hostname: str) -> x509.DNSName | x509.IPAddress:
    """SubjectAlternativeName entry for a DNS name or an IP address."""
    host = hostname.strip().strip("[]")  # accept "[::1]"
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii").lower().rstrip(".")
    except UnicodeError:
        raise ConfigError(f"invalid hostname {hostname!r}") from None
    label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
    if len(ascii_host) > 253 or not re.fullmatch(rf"{label}(\.{label})*", ascii_host):
        raise ConfigError(f"invalid hostname {hostname!r}: not a DNS name or an IP address")
    return x509.DNSName(ascii_host)


# --------------------------------------------------------------------------- CA + server


def init_ca(directory: str | os.PathLike[str], hostname: str) -> CaFiles:
    """Create a CA and a server certificate for ``hostname`` (DNS name or IP) in directory.

    Writes ``ca.key`` and ``server.key`` (0600), ``ca.crt`` and ``server.crt``. Refuses
    (ConfigError) when a CA is already there: a new CA would orphan every paired agent.
    """
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    if (base / CA_KEY).exists():
        raise ConfigError(f"{base / CA_KEY} already exists; not replacing the server's CA")
    san = host_name(hostname)
    now = _now()

    ca_key = _new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imapsync-bridge"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"imapsync-bridge CA {secrets.token_hex(4)}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key()
    server_cert = _leaf(
        ca_key,
        ca_cert,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _cn_text(san))]),
        public_key=server_key.public_key(),
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        not_after=min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc),
        san=san,
    )

    files = CaFiles(
        ca_key=base / CA_KEY,
        ca_crt=base / CA_CRT,
        server_key=base / SERVER_KEY,
        server_crt=base / SERVER_CRT,
        fingerprint=ca_fingerprint(_cert_pem(ca_cert)),
    )
    write_private(files.ca_key, _key_pem(ca_key))
    write_public(files.ca_crt, _cert_pem(ca_cert))
    write_private(files.server_key, _key_pem(server_key))
    write_public(files.server_crt, _cert_pem(server_cert))
    return files


def _cn_text(name: x509.GeneralName) -> str:
    return str(name.value)[:64]


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    subject: x509.Name,
    public_key: object,
    eku: x509.ObjectIdentifier,
    not_after: dt.datetime,
    san: x509.GeneralName | None,
) -> x509.Certificate:
    now = _now()
    not_before = min(now - BACKDATE, not_after - dt.timedelta(days=1))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


# --------------------------------------------------------------------------- fingerprints


def ca_fingerprint(ca_pem_or_der: PemLike) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    cert = load_certificate(ca_pem_or_der)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_ca_fingerprint(ca_pem_or_der: PemLike, fp_prefix: str) -> None:
    """AuthError unless the CA's fingerprint starts with ``fp_prefix`` (from the code)."""
    prefix = fp_prefix.lower()
    if len(prefix) < FINGERPRINT_PREFIX:
        raise AuthError("the pairing code carries too short a CA fingerprint")
    actual = ca_fingerprint(ca_pem_or_der)[: len(prefix)]
    if not hmac.compare_digest(actual, prefix):
        raise AuthError(
            "the server's CA certificate does not match the fingerprint in the pairing code "
            "(wrong server, or someone in between)"
        )


# --------------------------------------------------------------------------- pairing codes

_CODE = re.compile(r"([A-Za-z0-9_-]{16,64})\.([0-9a-fA-F]{32,64})")


def token_hash(token: str) -> str:
    """What the server stores for a pairing token: hex SHA-256 of it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def make_pairing_code(ca_fp: str) -> tuple[str, str]:
    """(code, token_hash): the code is ``TOKEN.FP32``; the server keeps only the hash."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", ca_fp):
        raise ValueError("ca_fp must be a hex SHA-256 fingerprint")
    token = secrets.token_urlsafe(16)
    while token.startswith("-"):  # a code is typed after --code: never like an option
        token = secrets.token_urlsafe(16)
    return f"{token}.{ca_fp[:FINGERPRINT_PREFIX].lower()}", token_hash(token)


def parse_pairing_code(code: str) -> tuple[str, str]:
    """(token, fp_prefix) of a pairing code; AuthError when it is malformed."""
    match = _CODE.fullmatch(code.strip()) if isinstance(code, str) else None
    if not match:
        raise AuthError(
            "malformed pairing code: expected TOKEN.FINGERPRINT as printed by "
            "'imapsync-bridge server add-user' or 'server pair-code'"
        )
    return match.group(1), match.group(2).lower()


def make_key_and_csr(user: str) -> tuple[str, str]:
    """(key_pem, csr_pem) for the agent of ``user`` (the server sets the final name)."""
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_user(user))]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not 1 <= len(user) <= 64 or not user.isprintable():
        raise ConfigError("a user name must be 1 to 64 printable characters")
    return user


def _acceptable_key(public_key: object) -> bool:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1)
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.key_size >= 2048
    return isinstance(public_key, ed25519.Ed25519PublicKey)


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey | PemLike,
    ca_cert: x509.Certificate | PemLike,
    csr_pem: PemLike,
    user: str,
    days: int = CLIENT_DAYS,
    *,
    not_after: dt.datetime | None = None,
) -> tuple[str, int, dt.datetime]:
    """Sign the agent's CSR: (cert_pem, serial, not_after).

    The CSR must carry a valid self-signature and a sound key (EC P-256/384/521, RSA >=
    2048, Ed25519); its subject is ignored, the certificate's CN is ``user``. The
    certificate is for client authentication only. ``not_after`` overrides ``days``
    (tests use a date in the past to make an expired certificate).
    """
    key = ca_key if isinstance(ca_key, ec.EllipticCurvePrivateKey) else load_private_key(ca_key)
    cert = ca_cert if isinstance(ca_cert, x509.Certificate) else load_certificate(ca_cert)
    try:
        csr = x509.load_pem_x509_csr(_pem_text(csr_pem))
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature):
        raise AuthError("the pairing request carries an unreadable CSR") from None
    if not signature_ok:
        raise AuthError("the pairing request's CSR signature does not verify")
    if not _acceptable_key(public_key):
        raise AuthError("the pairing request's CSR uses a key type or size we do not accept")
    if not_after is None:
        not_after = _now() + dt.timedelta(days=days)
    not_after = min(not_after.astimezone(dt.UTC), cert.not_valid_after_utc)
    issued = _leaf(
        key,
        cert,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_user(user))]),
        public_key=public_key,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_after=not_after,
        san=None,
    )
    return _cert_pem(issued), issued.serial_number, issued.not_valid_after_utc


def certificate_user(cert_pem_or_der: PemLike) -> str | None:
    """The CN of a certificate (the user of an agent certificate), or None."""
    cert = load_certificate(cert_pem_or_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
