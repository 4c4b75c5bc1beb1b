"""Shared pytest fixtures. Keep this small; helpers live in their own modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from browser import chromium, playwright  # noqa: E402, F401 (session fixtures, defined once)
from dovecot import FULL, PROFILES, Dovecot  # noqa: E402


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One real Dovecot (plain IMAP + an implicit-TLS listener) for the whole session.

    Fails (never skips) when Dovecot cannot start: `make test` installs dovecot-imapd.
    """
    server = Dovecot(tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imap_user(dovecot: Dovecot) -> str:
    """A fresh user name: its own empty mailbox (INBOX, Trash, Sent)."""
    return dovecot.new_user()


@pytest.fixture(scope="session", params=PROFILES, ids=[p.name for p in PROFILES])
def profiled_dovecot(request: pytest.FixtureRequest) -> Iterator[Dovecot]:
    """A real Dovecot playing each server profile in turn (full Dovecot, Exchange-like,
    Cyrus/Courier-like; see docs/compat.md). Fails, never skips, when it cannot start."""
    if request.param is FULL:
        yield request.getfixturevalue("dovecot")
        return
    server = Dovecot(profile=request.param)
    server.start()
    try:
        yield server
    finally:
        server.stop()
