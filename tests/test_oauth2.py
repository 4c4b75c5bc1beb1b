"""OAuth2 sign-in (issue 11): `agent login` (RFC 8628 device grant) against a local
authorization server, then `agent sync` and `agent run` logging in to a real Dovecot with
OAUTHBEARER / XOAUTH2 (its oauth2 passdb introspects each token there) and to an aiosmtpd
server that checks the same tokens. The user approves through the server's own endpoint,
or (browser flow) the test plays the browser: it opens the authorization address and
follows the redirect to `agent login`'s loopback listener.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import REPO, Bridge, run_cli
from dovecot import Dovecot
from oauth_server import CLIENT_SECRET, AuthorizationServer, finish, start_browser_login
from smtp_servers import MailServer
from test_agent_run import stop_agent, wait_for

from imapsync_bridge.agent.runner import connect_imap
from imapsync_bridge.config import load_agent_config
from imapsync_bridge.errors import AuthError
from imapsync_bridge.oauth2 import tokens


@pytest.fixture(scope="module")
def authority() -> Iterator[AuthorizationServer]:
    with AuthorizationServer() as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(authority: AuthorizationServer) -> Iterator[Dovecot]:
    with Dovecot(oauth2=f"{authority.url}/introspect") as dovecot:
        yield dovecot


@pytest.fixture
def bridge(
    oauth_dovecot: Dovecot, authority: AuthorizationServer, tmp_path: Path
) -> Iterator[Bridge]:
    authority.access_ttl = 3600
    authority.require_secret = False
    b = Bridge(oauth_dovecot, tmp_path)
    b.oauth2 = authority.ini_lines()
    b.start()
    try:
        yield b
    finally:
        b.stop()


def login(
    ini: Path, authority: AuthorizationServer, user: str, role: str = "imap", **env: str
) -> str:
    """`agent login` as a real process; approves the code it shows as *user* would on
    the verification page (the authorization server's approve endpoint)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "agent", "login", "--config", str(ini), role],
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    found = re.search(r"open (\S+) on any device and enter the code (\S+)", first)
    assert found, first + proc.communicate(timeout=10)[1]
    assert found.group(1) == f"{authority.url}/verify"
    form = urllib.parse.urlencode({"user_code": found.group(2), "username": user}).encode()
    with urllib.request.urlopen(f"{authority.url}/approve", form, timeout=10) as answer:
        assert json.load(answer)["approved"]
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return first + out + err


def sync_verbose(ini: Path) -> str:
    """`agent sync -v` as a process: its debug log (every line imapclient, authlib and
    urllib3 log), after it succeeded."""
    synced = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", "-v", "agent", "sync", "--config", str(ini)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    return synced.stdout + synced.stderr


def test_login_then_sync_with_oauthbearer(bridge: Bridge, authority: AuthorizationServer) -> None:
    first = bridge.deliver(1)
    bridge.pair()
    rc, _out, err = bridge.sync()
    assert rc == 1 and "no OAuth2 sign-in" in err, err
    assert f"agent login --config {bridge.agent_ini} imap" in err
    assert "Traceback" not in err

    shown = login(bridge.agent_ini, authority, bridge.user)
    token_file = bridge.agent_ini.parent / "state" / "oauth2-imap.json"
    assert f"tokens stored in {token_file}" in shown
    assert token_file.stat().st_mode & 0o777 == 0o600
    stored = json.loads(token_file.read_text())
    assert stored["refresh_token"] in authority.refresh_tokens
    assert stored["refresh_token"] not in bridge.agent_ini.read_text()

    debug_log = sync_verbose(bridge.agent_ini)
    assert "AUTHENTICATE" in debug_log  # the debug log has the IMAP commands...
    assert not [t for t in authority.issued if t in debug_log + shown]  # ...no token
    assert bridge.phone_inbox_ids() == [first]
    assert f"user=<{bridge.user}>, method=OAUTHBEARER" in bridge.dovecot.log()
    config = load_agent_config(bridge.agent_ini)
    assert tokens.check_sign_in(config.imap.server) is None


def test_browser_sign_in_through_the_loopback_listener_then_sync(
    bridge: Bridge, authority: AuthorizationServer
) -> None:
    first = bridge.deliver(1)
    bridge.pair()
    bridge.oauth2 = authority.ini_lines("browser")
    bridge.write_agent_config(bridge.agent_ini)
    proc, address = start_browser_login(bridge.agent_ini)
    # The browser: the provider's page signs the user in and redirects to the agent.
    with urllib.request.urlopen(address, timeout=30) as page:
        assert page.url.startswith("http://127.0.0.1:") and "code=" in page.url
        assert "Signed in: you can close this tab" in page.read().decode()
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert "tokens stored in" in out
    listener = page.url.split("?")[0]
    with pytest.raises(OSError):  # the listener is gone once the sign-in is done
        urllib.request.urlopen(listener, timeout=5)

    # As Google does, the token endpoint wants the client secret with each refresh too:
    # the stored access token is dropped, so this sync refreshes first (debug log on).
    authority.require_secret = True
    tokens.forget_access_token(load_agent_config(bridge.agent_ini).imap.server)
    refreshed = authority.refreshes()
    debug_log = sync_verbose(bridge.agent_ini)
    assert authority.refreshes() == refreshed + 1
    assert bridge.phone_inbox_ids() == [first]
    assert f"user=<{bridge.user}>, method=OAUTHBEARER" in bridge.dovecot.log()
    assert not [t for t in [*authority.issued, CLIENT_SECRET] if t in out + err + debug_log]


def test_the_keyring_holds_the_sign_in_where_there_is_one(
    bridge: Bridge, authority: AuthorizationServer, tmp_path: Path
) -> None:
    # A keyring backend, as a desktop session has one (tests/file_keyring.py).
    keyring_env = {
        "PYTHON_KEYRING_BACKEND": "file_keyring.FileKeyring",
        "TEST_KEYRING_FILE": str(tmp_path / "keyring.json"),
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
    }
    first = bridge.deliver(1)
    bridge.pair()
    assert "tokens stored in the keyring" in login(
        bridge.agent_ini, authority, bridge.user, **keyring_env
    )
    assert not (bridge.agent_ini.parent / "state" / "oauth2-imap.json").exists()
    kept = json.loads((tmp_path / "keyring.json").read_text())
    grant = json.loads(kept[f"imapsync-bridge/imap-oauth2:{bridge.user}@127.0.0.1"])
    assert grant["refresh_token"] in authority.refresh_tokens
    synced = subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", "agent", "sync",
         "--config", str(bridge.agent_ini)],
        env={**os.environ, **keyring_env}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    assert bridge.phone_inbox_ids() == [first]


def test_xoauth2_where_only_that_is_offered_and_a_refused_token(
    authority: AuthorizationServer, tmp_path: Path
) -> None:
    with Dovecot(oauth2=f"{authority.url}/introspect", mechanisms=("xoauth2",)) as dovecot:
        b = Bridge(dovecot, tmp_path)
        b.oauth2 = authority.ini_lines()
        b.start()
        try:
            login(b.agent_ini, authority, b.user)
            config = load_agent_config(b.agent_ini)
            with connect_imap(config) as imap:
                assert imap.select("INBOX").messages == 0
            assert f"user=<{b.user}>, method=XOAUTH2" in dovecot.log()
            # Approved as someone else: Dovecot refuses the token (its user differs).
            login(b.agent_ini, authority, "mallory")
            with pytest.raises(AuthError) as refused:
                connect_imap(config)
            stored = json.loads((b.agent_ini.parent / "state" / "oauth2-imap.json").read_text())
            assert stored["access_token"] == ""  # forgotten: the next try refreshes first
            assert stored["refresh_token"] not in str(refused.value)
        finally:
            b.stop()


def test_via_desktop_mail_goes_out_over_smtp_with_oauth2(
    bridge: Bridge, authority: AuthorizationServer
) -> None:
    with MailServer(
        bridge.dovecot, oauth2=authority.user_of, options={"auth_require_tls": False}
    ) as smtp:
        bridge.smtp_port = smtp.port
        bridge.write_agent_config(bridge.agent_ini)
        bridge.pair()
        login(bridge.agent_ini, authority, bridge.user, "imap")
        login(bridge.agent_ini, authority, bridge.user, "smtp")
        bridge.phone("compose", "--to", "carol@example.net", "--subject", "From the phone",
                     "--body", "sent via the desktop", "--via-desktop")  # fmt: skip
        bridge.sync_ok()
        assert [r.rcpt_tos for r in smtp.received] == [["carol@example.net"]]
        assert smtp.logins == [("OAUTHBEARER", bridge.user)]
        assert (bridge.agent_ini.parent / "state" / "oauth2-smtp.json").exists()


def test_agent_run_refreshes_keeps_rotated_tokens_and_recovers_from_a_revocation(
    bridge: Bridge, authority: AuthorizationServer
) -> None:
    authority.access_ttl = 4  # renewed 1 s before it lapses: a new login every ~3 s
    bridge.pair()
    login(bridge.agent_ini, authority, bridge.user)
    token_file = bridge.agent_ini.parent / "state" / "oauth2-imap.json"
    refreshed_before = authority.refreshes()
    bridge.write_agent_config(bridge.agent_ini, sync_interval="1")
    agent = bridge.run_agent()
    outputs: list[str] = []
    try:
        ids = [bridge.deliver(1)]
        wait_for(lambda: bridge.phone_inbox_ids() == ids, 15, "the first sync")
        # Three access-token lifetimes: the IDLE connection and the sync connection
        # renew their logins; every sync succeeds.
        for n in (2, 3, 4):
            time.sleep(3)
            ids.insert(0, bridge.deliver(n))
            wait_for(lambda: bridge.phone_inbox_ids() == ids, 15, f"message {n} on the phone")
        status = bridge.agent_status()
        outputs.append(json.dumps(status))
        assert status["last_result"] == "ok", status
        assert authority.refreshes() - refreshed_before >= 2
        assert authority.refreshes("invalid_grant") == 0  # no rotated token used twice
        stored = json.loads(token_file.read_text())["refresh_token"]
        assert stored in authority.refresh_tokens  # the latest rotated one was kept

        # An administrator revokes the sign-in: once the access token lapses, the
        # documented error; `agent login` again and the running agent syncs again.
        authority.revoke(bridge.user)
        status = wait_for(
            lambda: "agent login" in str((s := bridge.agent_status())["last_error"]) and s,
            20, "the sign-in error in agent status",
        )  # fmt: skip
        outputs.append(json.dumps(status))
        assert "invalid_grant" in status["last_error"]
        assert f"agent login --config {bridge.agent_ini} imap" in status["last_error"]
        time.sleep(2)  # the service and the watcher wait for a new sign-in, no retry storm
        assert authority.refreshes("invalid_grant") <= 2
        outputs.append(login(bridge.agent_ini, authority, bridge.user))
        ids.insert(0, bridge.deliver(5))
        wait_for(lambda: bridge.phone_inbox_ids() == ids, 20, "syncing again after login")
        wait_for(lambda: bridge.agent_status()["last_result"] == "ok", 10, "last_result ok")
        bridge.assert_in_sync()
    finally:
        stop_agent(bridge, agent)
    outputs.append(bridge.agent_log())
    outputs.append(run_cli("agent", "status", "--config", str(bridge.agent_ini))[1])
    assert "the OAuth2 access token is used up; reconnecting" in bridge.agent_log()
    secrets = authority.issued
    assert len(secrets) >= 6
    for text in outputs:
        leaked = [s for s in secrets if s in text]
        assert not leaked, "a token in the output"
