"""`agent pair`: trade a one-time code for a client certificate, pinning the server's CA.

The code carries the first half of the CA's SHA-256 fingerprint, so the agent trusts
nothing it learned on first contact: it fetches the CA over an unverified TLS connection,
checks the fingerprint and that the server's own certificate was issued by that CA for
the configured host, and only then sends the code, over a connection verified against
the CA it just pinned.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from imapsync_bridge.errors import AuthError, ProtocolError
from imapsync_bridge.protocol import framing, pki, schema, tls

log = logging.getLogger(__name__)


def _exchange(sock: ssl.SSLSocket, frame: dict[str, Any], expected: str) -> dict[str, Any]:
    framing.write_frame(sock, frame)
    reply = schema.validate(framing.read_frame(sock), "to_agent")
    if reply["type"] == "error":
        raise AuthError(f"server refused pairing: {reply['message']}")
    if reply["type"] != expected:
        raise ProtocolError(f"expected '{expected}', got '{reply['type']}'")
    return reply


def pair(host: str, port: int, code: str, state_dir: Path, timeout: float = 30.0) -> str:
    """Pair this agent; writes agent.key (0600), agent.crt, server-ca.crt. Returns the user."""
    _token, fp_prefix = pki.parse_pairing_code(code)

    probe = tls.connect(host, port, tls.pairing_probe_context(), timeout)
    try:
        ca_pem = _exchange(probe, {"type": "ca"}, "ca_cert")["pem"]
        pki.check_ca_fingerprint(ca_pem, fp_prefix)
        tls.verify_leaf_issued_by(probe.getpeercert(binary_form=True), ca_pem, host)
    finally:
        probe.close()

    state_dir.mkdir(parents=True, exist_ok=True)
    ca_path = state_dir / "server-ca.crt"
    pki.write_public(ca_path, ca_pem)
    key_pem, csr_pem = pki.make_key_and_csr("agent")
    context = tls.server_verifying_context(ca_path)
    sock = tls.connect(host, port, context, timeout)
    try:
        paired = _exchange(sock, {"type": "pair", "code": code, "csr": csr_pem}, "paired")
    finally:
        sock.close()
    pki.write_private(state_dir / "agent.key", key_pem)
    pki.write_public(state_dir / "agent.crt", paired["certificate"])
    log.info("paired as %s with %s:%s", paired["user"], host, port)
    return str(paired["user"])
