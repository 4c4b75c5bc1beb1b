"""The project's exception tree; lower-level errors are translated at the edges.

    BridgeError                   anything this project raises on purpose
    ├── ConfigError               bad configuration or usage: exit code 2, fix and rerun
    ├── TransientError            worth a retry later (network down, timeout, server busy)
    │   └── ConnectionLost        a connection dropped or timed out mid-session
    │       └── PeerClosed        the peer closed the connection (not a timeout)
    ├── ImapError                 the IMAP server refused a command (not per-message)
    ├── MailRefused               an SMTP server refused a message for good (5xx)
    ├── MessageError              one message cannot be handled: quarantine it, go on
    ├── ProtocolError             the peer broke the sync protocol (bad frame, schema)
    │   └── FrameTooLarge         a frame exceeded the size limit
    ├── AuthError                 TLS / certificate / pairing refused
    │   └── LoginRefused          the server refused the user name or password
    ├── StoreError                the local SQLite state is unusable
    └── SyncAborted               the sync stopped itself to protect data (mass delete)

The edge modules (agent/imap.py, protocol/*, the stores) catch imapclient, ssl, socket and
sqlite3 errors and raise these; the rest of the code sees only these.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(BridgeError):
    pass


class TransientError(BridgeError):
    pass


class ConnectionLost(TransientError):
    pass


class PeerClosed(ConnectionLost):
    pass


class ImapError(BridgeError):
    pass


class MailRefused(BridgeError):
    """An SMTP server answered 5xx (or refused our login): sending again as it is will
    not help. A 4xx or a dropped connection is a :class:`TransientError` instead."""


class MessageError(BridgeError):
    pass


class ProtocolError(BridgeError):
    pass


class FrameTooLarge(ProtocolError):
    pass


class AuthError(BridgeError):
    pass


class LoginRefused(AuthError):
    """An IMAP or SMTP server refused the user name or password (TLS was fine)."""


class StoreError(BridgeError):
    pass


class SyncAborted(BridgeError):
    pass
