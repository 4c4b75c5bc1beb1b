"""OAuth2 set-up without a mail server: the built-in endpoints, configuration errors,
a declined sign-in, and a refresh token handed in as a systemd credential (read-only:
rotations are kept in state_dir). Real HTTP to tests/oauth_server.py on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import run_cli
from oauth_server import AuthorizationServer
from smtp_servers import MailServer

from imapsync_bridge import smtp_out
from imapsync_bridge.config import OAuth2Settings, load_agent_config
from imapsync_bridge.errors import ConfigError
from imapsync_bridge.oauth2 import tokens
from imapsync_bridge.oauth2.providers import endpoints
from imapsync_bridge.sync.outgoing import Outcome


@pytest.fixture
def authority() -> Iterator[AuthorizationServer]:
    with AuthorizationServer() as server:
        yield server


def agent_ini(tmp_path: Path, imap_lines: list[str]) -> Path:
    ini = tmp_path / "agent.ini"
    lines = ["[agent]", "state_dir = state", "server = 127.0.0.1:4465", "[imap]",
             "host = 127.0.0.1", "security = none", *imap_lines]  # fmt: skip
    ini.write_text("\n".join(lines) + "\n")
    return ini


def settings(provider: str, **keys: str) -> OAuth2Settings:
    fields = dict.fromkeys(
        ("client_id", "tenant", "device_authorization_endpoint", "token_endpoint", "scopes"), ""
    )
    return OAuth2Settings(provider=provider, **(fields | keys))


def test_built_in_endpoints_and_scopes() -> None:
    ms = endpoints(settings("microsoft"), "imap")
    assert ms.device_authorization == (
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
    )
    assert ms.token == "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    assert ms.scope == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    smtp = endpoints(settings("microsoft", tenant="corp.example"), "smtp")
    assert smtp.token.startswith("https://login.microsoftonline.com/corp.example/")
    assert smtp.scope == "https://outlook.office.com/SMTP.Send offline_access"
    google = endpoints(settings("google"), "smtp")
    assert (google.token, google.scope) == (
        "https://oauth2.googleapis.com/token",
        "https://mail.google.com/",
    )
    proxied = endpoints(settings("microsoft", token_endpoint="https://login.corp/token"), "imap")
    assert proxied.token == "https://login.corp/token"


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["auth = oauth2", "username = a", "oauth2_provider = microsoft"], ["needs client_id"]),
        (["auth = oauth2", "username = a", "client_id = x"], ["generic", "needs"]),
        (
            [
                "auth = oauth2",
                "username = a",
                "client_id = x",
                "device_authorization_endpoint = http://login.example/d",
                "token_endpoint = https://login.example/t",
                "scopes = s",
            ],
            ["device_authorization_endpoint", "https"],
        ),  # fmt: skip
        (["auth = oauth2", "oauth2_provider = google", "client_id = x"], ["needs username"]),
    ],
)
def test_oauth2_configuration_errors(tmp_path: Path, keys: list[str], words: list[str]) -> None:
    ini = agent_ini(tmp_path, keys)
    with pytest.raises(ConfigError) as error:
        load_agent_config(ini)
    message = str(error.value)
    assert "\n" not in message and str(ini) in message and "[imap]" in message
    assert all(word in message for word in words), message


def test_a_declined_sign_in_is_one_line_and_stores_nothing(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    ini = agent_ini(tmp_path, ["username = alice", *authority.ini_lines()])

    def decline() -> None:
        deadline = time.monotonic() + 10
        while not authority.deny() and time.monotonic() < deadline:
            time.sleep(0.05)

    threading.Thread(target=decline, daemon=True).start()
    rc, out, err = run_cli("agent", "login", "--config", str(ini), "imap")
    assert rc == 1 and err.strip().splitlines() == [
        "imapsync-bridge: [imap] the sign-in was declined"
    ]
    assert "enter the code" in out
    assert not (tmp_path / "state" / "oauth2-imap.json").exists()
    rc, _out, err = run_cli("agent", "login", "--config", str(agent_ini(tmp_path, [])), "imap")
    assert rc == 2 and "auth is not oauth2" in err


def test_a_systemd_credential_and_its_rotations(
    tmp_path: Path, authority: AuthorizationServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    handed_in = authority._access_token("alice")["refresh_token"]
    (credentials / "imap-oauth2").write_text(handed_in + "\n")
    (credentials / "imap-oauth2").chmod(0o400)
    credentials.chmod(0o500)  # read-only, as systemd makes it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    server = load_agent_config(agent_ini(tmp_path, ["username = alice", *authority.ini_lines()]))
    imap = server.imap.server
    authority.access_ttl = 1  # each access token is used up at once: every use refreshes

    assert tokens.check_sign_in(imap) is None  # refreshed with the credential's token
    kept = tmp_path / "state" / "oauth2-imap.json"
    rotated = json.loads(kept.read_text())["refresh_token"]
    assert rotated != handed_in and rotated in authority.refresh_tokens
    assert kept.stat().st_mode & 0o777 == 0o600
    assert tokens.access_token(imap).value  # refreshed with the kept, rotated one
    assert authority.refreshes() == 2 and authority.refreshes("invalid_grant") == 0

    # The administrator revokes it; a new credential is installed and wins over the file.
    authority.revoke("alice")
    error = tokens.check_sign_in(imap) or ""
    assert "invalid_grant" in error and "agent login --config" in error
    credentials.chmod(0o700)
    (credentials / "imap-oauth2").chmod(0o600)
    (credentials / "imap-oauth2").write_text(authority._access_token("alice")["refresh_token"])
    assert tokens.check_sign_in(imap) is None
    assert not [t for t in authority.issued if t in error]


def approve_pending(authority: AuthorizationServer, user: str) -> threading.Thread:
    """Approves the next device sign-in as *user* (the tests' user at the browser)."""

    def approve() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            codes = [d.user_code for d in list(authority.devices.values())]
            if codes and authority.approve(codes[0], user):
                return
            time.sleep(0.05)

    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    return thread


def test_smtp_xoauth2_and_a_refused_token(tmp_path: Path, authority: AuthorizationServer) -> None:
    with MailServer(
        oauth2=authority.user_of,  # XOAUTH2 only: the mechanism Microsoft offers
        options={"auth_require_tls": False, "auth_exclude_mechanism": ["OAUTHBEARER"]},
    ) as smtp:
        ini = agent_ini(tmp_path, ["username = alice", "password_file = imap.pass"])
        smtp_lines = ["[smtp]", "host = 127.0.0.1", f"port = {smtp.port}", "security = none",
                      "username = alice", *authority.ini_lines()]  # fmt: skip
        ini.write_text(ini.read_text() + "\n".join(smtp_lines) + "\n")
        approve_pending(authority, "alice")
        assert run_cli("agent", "login", "--config", str(ini), "smtp")[0] == 0
        config = load_agent_config(ini)
        assert config.smtp is not None
        raw = b"From: alice@corp.example\r\nSubject: hi\r\n\r\nhello\r\n"
        sent = smtp_out.send(config.smtp, "alice@corp.example", ["bob@example.net"], raw)
        assert sent.accepted and smtp.logins == [("XOAUTH2", "alice")]

        approve_pending(authority, "mallory")  # a token for someone else: refused
        assert run_cli("agent", "login", "--config", str(ini), "smtp")[0] == 0
        refused = smtp_out.send(config.smtp, "alice@corp.example", ["bob@example.net"], raw)
        assert refused.outcome is Outcome.TEMPORARY and refused.code == 535
        assert len(smtp.received) == 1
        stored = json.loads((tmp_path / "state" / "oauth2-smtp.json").read_text())
        assert stored["access_token"] == ""  # the next attempt refreshes first


def test_set_password_is_refused_for_an_oauth2_role(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    ini = agent_ini(tmp_path, ["username = alice", *authority.ini_lines()])
    rc, _out, err = run_cli("set-password", "--config", str(ini), "imap")
    assert rc == 2 and "auth = oauth2 takes no password: run `agent login`" in err
