"""Throttling of bad passwords (DESIGN.md: 10 in a row for a user or from an address).

The throttle alone with a clock the test turns, and :class:`Logins` over a real store
with real scrypt hashes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imapsync_bridge.server import credentials
from imapsync_bridge.server.credentials import Login, Logins
from imapsync_bridge.server.store import PhoneStore
from imapsync_bridge.server.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_ten_in_a_row_lock_the_subject_for_the_lockout(clock: Clock) -> None:
    throttle = Throttle(clock=clock)
    for _ in range(9):
        throttle.failed("user:alice")
    assert not throttle.refused("user:alice")
    throttle.failed("user:alice")
    assert throttle.refused("user:alice") and throttle.refused("address:x", "user:alice")
    assert not throttle.refused("user:bob")
    clock.now += 299
    assert throttle.refused("user:alice")
    clock.now += 2
    assert not throttle.refused("user:alice")
    throttle.failed("user:alice")  # a fresh streak after the lockout
    assert not throttle.refused("user:alice")


def test_a_good_password_resets_and_an_old_streak_is_forgotten(clock: Clock) -> None:
    throttle = Throttle(clock=clock)
    for _ in range(9):
        throttle.failed("user:alice")
    throttle.succeeded("user:alice")
    for _ in range(9):
        throttle.failed("user:alice")
    assert not throttle.refused("user:alice")
    clock.now += 301  # a streak that old no longer counts
    throttle.failed("user:alice")
    assert not throttle.refused("user:alice")


def test_the_table_is_bounded(clock: Clock) -> None:
    throttle = Throttle(limit=2, clock=clock, max_subjects=3)
    throttle.failed("login:a")
    throttle.failed("login:a")
    for name in "bcd":
        throttle.failed(f"login:{name}")
    assert not throttle.refused("login:a")  # dropped first: least recently failed


@pytest.fixture
def logins(tmp_path: Path, clock: Clock) -> Logins:
    store = PhoneStore(tmp_path / "phone.sqlite3")
    for user in ("alice", "bob"):
        store.add_user(user, f"{user}@phone.example", f"{user}@corp.example", 5)
        credentials.set_password(store, user, f"pw-{user}")
    return Logins(store, Throttle(clock=clock))


def test_ten_bad_passwords_refuse_even_the_right_one_until_the_lockout_ends(
    logins: Logins, clock: Clock
) -> None:
    for n in range(10):  # from ten addresses: it is the user's count that locks
        assert logins.check("alice", "guess", f"10.0.0.{n}") == Login(None)
    assert logins.check("alice", "pw-alice", "10.0.1.1") == Login(None, refused=True)
    assert logins.check("ALICE@phone.example", "pw-alice", None) == Login(None, refused=True)
    assert logins.check("bob", "pw-bob", "10.0.0.1") == Login("bob")
    clock.now += 301
    assert logins.check("alice@phone.example", "pw-alice", "10.0.1.1") == Login("alice")


def test_an_address_spraying_users_is_refused_and_a_good_login_does_not_reset_it(
    logins: Logins, clock: Clock
) -> None:
    for n in range(5):
        assert logins.check("bob", "guess", "192.0.2.7").user is None
        assert logins.check(f"user{n}", "guess", "192.0.2.7").user is None
    assert logins.check("alice", "pw-alice", "192.0.2.7") == Login(None, refused=True)
    assert logins.check("alice", "pw-alice", "192.0.2.8") == Login("alice")
    # the user's own count: nine bad, one good, nine bad: never refused
    for _ in range(9):
        logins.check("alice", "typo", "198.51.100.1")
    assert logins.check("alice", "pw-alice", "198.51.100.2") == Login("alice")
    for _ in range(9):
        logins.check("alice", "typo", "198.51.100.3")
    assert logins.check("alice", "pw-alice", "198.51.100.4") == Login("alice")


def test_an_ipv6_client_counts_by_its_64_block(logins: Logins) -> None:
    """One IPv6 host can pick any address of its /64: counting each would let it guess
    without end. An IPv4-mapped address is the IPv4 address."""
    for n in range(5):
        assert logins.check("bob", "guess", f"2001:db8:1:2::{n + 1:x}").user is None
        assert logins.check(f"user{n}", "guess", f"2001:db8:1:2:{n}::7").user is None
    assert logins.check("alice", "pw-alice", "2001:db8:1:2:ffff::1").refused
    assert logins.check("alice", "pw-alice", "2001:db8:1:3::1") == Login("alice")
    for _ in range(10):
        logins.check("nobody", "guess", "::ffff:192.0.2.9")
    assert logins.check("alice", "pw-alice", "192.0.2.9").refused


def test_others_cannot_lock_a_user_out_of_a_network_she_logged_in_from(
    logins: Logins, clock: Clock
) -> None:
    """Anyone can lock a user for 5 minutes, again and again; not where she has logged
    in before (per process): there only the address's own count applies."""
    assert logins.check("alice", "pw-alice", "2001:db8:aa:1::5") == Login("alice")
    for n in range(10):
        assert logins.check("alice", "guess", f"10.0.0.{n}") == Login(None)
    assert logins.check("alice", "pw-alice", "10.0.1.1").refused  # a new place: locked
    assert logins.check("alice", "pw-alice", "2001:db8:aa:1::77") == Login("alice")  # her /64
    for _ in range(10):  # her own network guessing: its own count still locks it
        logins.check("alice", "typo", "2001:db8:aa:1::5")
    assert logins.check("alice", "pw-alice", "2001:db8:aa:1::5").refused
    clock.now += 301
    assert logins.check("alice", "pw-alice", "10.0.1.1") == Login("alice")
