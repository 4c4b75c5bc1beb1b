"""TLS 1.3 contexts and connections of the sync protocol (stdlib ``ssl``).

- :func:`server_context`: the hosted listener. Client certificates are *optional* at the
  TLS layer, because a pairing agent has none yet; when one is presented it must verify
  against the server's CA (else the handshake fails). The listener itself demands a
  certificate for every frame but ``ca`` and ``pair`` (see :func:`peer_certificate_serial`)
  and checks the serial is issued to a user and not revoked.
- :func:`agent_context`: the agent after pairing. It trusts only the pinned CA (never the
  system store), checks the host name, and presents its certificate.
- :func:`server_verifying_context`: the same without a client certificate, for pairing
  step 2 (sending the code once the CA is pinned).
- :func:`pairing_probe_context`: no verification at all, used only to fetch the CA during
  pairing; the agent then checks that CA against the fingerprint in the pairing code and
  checks the server's leaf certificate with :func:`verify_leaf_issued_by` before it sends
  the pairing token or trusts anything it got.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from imapsync_bridge.errors import AuthError, ConfigError, ConnectionLost

if TYPE_CHECKING:
    from imapsync_bridge.protocol.pki import PemLike

PathLike = str | os.PathLike[str]


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@contextlib.contextmanager
def _config_files(what: str) -> Iterator[None]:
    try:
        yield
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load {what}: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot load {what}: {exc.filename}: {exc.strerror}") from None


def server_context(ca_crt: PathLike, server_crt: PathLike, server_key: PathLike) -> ssl.SSLContext:
    """The sync listener's context: TLS 1.3 only, client certificate optional but verified."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with _config_files("the server's certificates"):
        ctx.load_cert_chain(os.fspath(server_crt), os.fspath(server_key))
        ctx.load_verify_locations(cafile=os.fspath(ca_crt))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_verifying_context(ca_crt: PathLike) -> ssl.SSLContext:
    """TLS 1.3 only, the pinned CA only, host name checked, no client certificate.

    Pairing step 2: the agent has pinned the CA (fingerprint + leaf checked) but has no
    certificate yet; it sends the pairing code only over a connection verified this way.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # no default CA store
    with _config_files("the pinned server CA"):
        ctx.load_verify_locations(cafile=os.fspath(ca_crt))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def agent_context(ca_crt: PathLike, agent_crt: PathLike, agent_key: PathLike) -> ssl.SSLContext:
    """The agent's context: TLS 1.3 only, the pinned CA only, host name checked."""
    _check_not_expired(agent_crt)
    ctx = server_verifying_context(ca_crt)
    with _config_files("the agent's certificate (is the agent paired?)"):
        ctx.load_cert_chain(os.fspath(agent_crt), os.fspath(agent_key))
    return ctx


def _check_not_expired(agent_crt: PathLike) -> None:
    """AuthError when our own certificate has expired.

    The server would refuse it, but an asyncio server drops a refused TLS 1.3 client
    without an alert, so the agent would only see the connection close: say why here.
    """
    try:
        expired = not_valid_after(Path(agent_crt).read_bytes())
    except (OSError, ValueError):
        return  # load_cert_chain reports a missing or unreadable file
    if expired <= dt.datetime.now(dt.UTC):
        raise AuthError(
            f"this agent's certificate expired on {expired:%Y-%m-%d}; pair the agent again"
        )


def not_valid_after(pem: bytes) -> dt.datetime:
    """The end of a PEM certificate's validity (UTC), read with the standard library:
    the agent checks its own certificate before every connection, and cryptography
    would add ~50 ms of imports to a one-shot `agent sync`. ValueError if malformed.

    DER path (RFC 5280): Certificate > tbsCertificate > [version] serialNumber
    signature issuer validity > notAfter (UTCTime YYMMDDHHMMSSZ or GeneralizedTime).
    """
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
        (_tag, certificate), *_ = _der_items(der)
        (_tag, tbs), *_ = _der_items(certificate)
        fields = [value for tag, value in _der_items(tbs) if tag != 0xA0]  # [0] version
        _not_before, (tag, not_after) = _der_items(fields[3])[:2]
        text = not_after.decode("ascii")
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a certificate: {exc}") from None
    layout = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}.get(tag)
    if layout is None:
        raise ValueError(f"certificate time of unknown type {tag:#x}")
    return dt.datetime.strptime(text, layout).replace(tzinfo=dt.UTC)


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) of each DER element in *data*, one level deep."""
    items: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        tag, length = data[at], data[at + 1]
        at += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(data[at : at + size], "big")
            at += size
        if at + length > len(data):
            raise IndexError("DER element runs past its container")
        items.append((tag, data[at : at + length]))
        at += length
    return items


def pairing_probe_context() -> ssl.SSLContext:
    """TLS 1.3, no verification: ONLY to fetch the CA before checking it out of band."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verify_leaf_issued_by(leaf_der: bytes | None, ca_pem: PemLike, hostname: str) -> None:
    """AuthError unless ``leaf_der`` is a valid server certificate for ``hostname``
    issued by the CA ``ca_pem`` (signature, validity dates, serverAuth, name)."""
    from cryptography import x509
    from cryptography.x509 import verification

    from imapsync_bridge.protocol.pki import host_name, load_certificate

    if not leaf_der:
        raise AuthError("the server presented no certificate")
    try:
        ca = load_certificate(ca_pem)
        leaf = x509.load_der_x509_certificate(leaf_der)
        subject = host_name(hostname)
    except (ValueError, ConfigError) as exc:
        raise AuthError(f"cannot check the server certificate: {exc}") from None
    store = verification.Store([ca])
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
    try:
        verifier.verify(leaf, [])
    except verification.VerificationError as exc:
        raise AuthError(
            f"server certificate for {hostname} not issued by the pinned CA or not valid "
            f"for that name: {exc}"
        ) from None


def _peer_der(ssl_object: ssl.SSLSocket | ssl.SSLObject | None) -> bytes | None:
    if ssl_object is None:
        return None
    try:
        return ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):  # handshake not done / connection closed
        return None


def peer_certificate_serial(ssl_object: ssl.SSLSocket | ssl.SSLObject | None) -> int | None:
    """Serial of the peer's (verified) certificate, or None when it presented none.

    With :func:`server_context` a presented certificate has verified against the CA, or
    the handshake would have failed; the caller still checks the serial is not revoked.
    For asyncio: ``writer.get_extra_info("ssl_object")``.
    """
    from cryptography import x509

    der = _peer_der(ssl_object)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).serial_number


def connect(
    host: str,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    *,
    server_hostname: str | None = None,
) -> ssl.SSLSocket:
    """A TLS connection to host:port, handshake done; errors become AuthError/ConnectionLost.

    ``timeout`` bounds the TCP connect, the handshake and every later read or write on the
    socket. ``server_hostname`` (default: ``host``) is the name the certificate must carry.
    """
    where = f"{host}:{port}"
    name = server_hostname or host.strip("[]")
    try:
        raw = socket.create_connection((host.strip("[]"), port), timeout=timeout)
    except TimeoutError:
        raise ConnectionLost(f"timed out connecting to {where}") from None
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {where}: {exc.strerror or exc}") from None
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise AuthError(
            f"server certificate of {where} not issued by the pinned CA or not valid for "
            f"{name}: {exc.verify_message}"
        ) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        raw.close()
        raise ConnectionLost(f"{where} closed the connection during the TLS handshake") from None
    except ssl.SSLError as exc:
        raw.close()
        raise AuthError(f"TLS handshake with {where} refused: {exc.reason or exc}") from None
    except TimeoutError:
        raw.close()
        raise ConnectionLost(f"timed out in the TLS handshake with {where}") from None
    except OSError as exc:
        raw.close()
        raise ConnectionLost(f"connection to {where} failed: {exc.strerror or exc}") from None
