"""The page's sessions and login-form tokens (pure: no network, a clock of our own)."""

from __future__ import annotations

from imapsync_bridge.server.web.security import Sessions, basic_credentials, same_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lasts_its_time_and_logout_ends_it() -> None:
    clock = Clock()
    sessions = Sessions(ttl=60, clock=clock)
    token, session = sessions.new("alice")
    assert sessions.get(token) == session and session.user == "alice"
    assert session.csrf != token and len(token) >= 43  # 256 random bits
    clock.now += 59
    assert sessions.get(token) == session
    clock.now += 2
    assert sessions.get(token) is None  # expired: gone
    token, _ = sessions.new("alice")
    sessions.drop(token)
    assert sessions.get(token) is None
    assert sessions.get(None) is None and sessions.get("made up") is None


def test_one_user_cannot_push_the_others_out() -> None:
    sessions = Sessions(limit=10, per_user=3)
    bob, _ = sessions.new("bob")
    alice = [sessions.new("alice")[0] for _ in range(50)]
    assert sessions.get(bob) is not None
    assert [t for t in alice if sessions.get(t)] == alice[-3:]  # her newest three
    carol = [sessions.new(f"user{n}")[0] for n in range(20)]
    assert [t for t in carol if sessions.get(t)] == carol[-10:]  # the whole bound holds


def test_login_form_tokens_are_bound_to_the_browser_and_the_process() -> None:
    sessions, other = Sessions(), Sessions()
    token = sessions.anonymous_csrf("cookie-a")
    assert same_token(token, sessions.anonymous_csrf("cookie-a"))
    assert not same_token(token, sessions.anonymous_csrf("cookie-b"))
    assert not same_token(token, other.anonymous_csrf("cookie-a"))
    assert not same_token(None, token) and not same_token("", token)


def test_basic_credentials() -> None:
    assert basic_credentials("Basic YWxpY2U6cHc6d2l0aDpjb2xvbnM=") == ("alice", "pw:with:colons")
    assert basic_credentials("basic YWxpY2U6") == ("alice", "")
    for header in ("Bearer abc", "Basic !!!", "Basic YWxpY2U=", "Basic", "Basic //79"):
        assert basic_credentials(header) is None, header
