"""`agent pair`: trade a one-time code for a client certificate, pinning the server's CA.

The code carries the first half of the CA's SHA-256 fingerprint, so the agent trusts
nothing it learned on first contact: it fetches the CA over an unverified TLS connection,
checks the fingerprint and that the server's own certificate was issued by that CA for
the configured host, and only then sends the code, over a connection verified against
the CA it just pinned.

The server's answer also carries the trigger secret (the sync phrase and the token key)
and the user's own addresses; they go into the agent state, which the trigger watch and
`agent status` read. Each pairing gets a new phrase; the trigger scan starts afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from imapsync_bridge.agent.link import AGENT_CRT, AGENT_KEY, SERVER_CA, ServerLink
from imapsync_bridge.agent.state import STATE_FILE, AgentState, make_state_dir
from imapsync_bridge.protocol import pki, schema, tls

log = logging.getLogger(__name__)


def pair(host: str, port: int, code: str, state_dir: Path, timeout: float = 30.0) -> str:
    """Pair this agent; writes agent.key (0600), agent.crt, server-ca.crt. Returns the user."""
    _token, fp_prefix = pki.parse_pairing_code(code)

    probe = tls.connect(host, port, tls.pairing_probe_context(), timeout)
    with ServerLink(probe) as link:
        ca_pem = link.request(schema.CaRequest(), schema.CaCert).pem
        pki.check_ca_fingerprint(ca_pem, fp_prefix)
        tls.verify_leaf_issued_by(probe.getpeercert(binary_form=True), ca_pem, host)

    make_state_dir(state_dir)
    ca_path = state_dir / SERVER_CA
    pki.write_public(ca_path, ca_pem)
    key_pem, csr_pem = pki.make_key_and_csr("agent")
    sock = tls.connect(host, port, tls.server_verifying_context(ca_path), timeout)
    with ServerLink(sock) as link:
        paired = link.request(schema.Pair(code=code, csr=csr_pem), schema.Paired)
    save_trigger_secret(state_dir, paired)
    pki.write_private(state_dir / AGENT_KEY, key_pem)
    pki.write_public(state_dir / AGENT_CRT, paired.certificate)
    log.info("paired as %s with %s:%s", paired.user, host, port)
    return paired.user


def save_trigger_secret(state_dir: Path, paired: schema.Paired) -> None:
    """Keep what the agent needs to judge trigger mails (meta keys ``sync_phrase``,
    ``trigger_key`` (hex), ``own_addresses`` (a JSON list, lower case)); forget the
    trigger scan position, so the first scan looks only at the newest mail."""
    own = sorted({paired.address.lower(), paired.desktop_address.lower()})
    state = AgentState(state_dir / STATE_FILE)
    try:
        state.set_many(
            {
                "user": paired.user,
                "sync_phrase": paired.sync_phrase,
                "trigger_key": paired.trigger_key,
                "own_addresses": json.dumps(own),
                "trigger_scan": None,
            }
        )
    finally:
        state.close()
