"""OAuth2 set-up without a mail server: the built-in endpoints, configuration errors,
a declined sign-in, a refresh token handed in as a systemd credential (read-only:
rotations are kept in state_dir), and the browser sign-in's pasted address, forged
state and stolen code. Real HTTP to tests/oauth_server.py on loopback."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridge import run_cli
from oauth_server import (
    CLIENT_SECRET,
    AuthorizationServer,
    fake_browser,
    finish,
    redirect_of,
    start_browser_login,
)
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
    assert google.authorization == "https://accounts.google.com/o/oauth2/v2/auth"
    # without offline access and a consent prompt, a second sign-in gets no refresh token
    assert dict(google.authorize_params) == {"access_type": "offline", "prompt": "consent"}
    assert ms.authorization.endswith("/organizations/oauth2/v2.0/authorize")
    proxied = endpoints(settings("microsoft", token_endpoint="https://login.corp/token"), "imap")
    assert proxied.token == "https://login.corp/token"


def test_google_signs_in_through_the_browser_with_its_installed_app_secret(
    tmp_path: Path,
) -> None:
    keys = ["auth = oauth2", "username = alice@corp.example", "oauth2_provider = google",
            "client_id = 1234.apps.googleusercontent.com", "client_secret = GOCSPX-x"]  # fmt: skip
    google = load_agent_config(agent_ini(tmp_path, keys)).imap.server.oauth2
    assert google is not None and google.flow == "browser"
    assert "GOCSPX" not in repr(google)  # not confidential, still never in a traceback
    microsoft = ["auth = oauth2", "username = a", "oauth2_provider = microsoft", "client_id = x"]
    ms = load_agent_config(agent_ini(tmp_path, microsoft)).imap.server.oauth2
    assert ms is not None and ms.flow == "device"


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
        (
            ["auth = oauth2", "oauth2_provider = google", "client_id = x", "client_secret = s"],
            ["needs username"],
        ),
        (
            ["auth = oauth2", "username = a", "oauth2_provider = google", "client_id = x"],
            ["google needs client_secret"],
        ),
        (
            [
                "auth = oauth2",
                "username = a",
                "client_id = x",
                "oauth2_flow = browser",
                "token_endpoint = https://login.example/t",
                "scopes = s",
            ],
            ["generic needs authorization_endpoint"],
        ),  # fmt: skip
        (
            [
                "auth = oauth2",
                "username = a",
                "oauth2_provider = google",
                "client_id = x",
                "client_secret = s",
                "oauth2_flow = popup",
            ],
            ["oauth2_flow must be one of device, browser"],
        ),  # fmt: skip
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


def browser_ini(tmp_path: Path, authority: AuthorizationServer) -> Path:
    return agent_ini(tmp_path, ["username = alice", *authority.ini_lines("browser")])


def test_a_redirected_address_pasted_on_stdin_signs_in(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    """The browser runs on another machine: the user pastes where it ended up."""
    ini = browser_ini(tmp_path, authority)
    browser, opened = fake_browser(tmp_path)
    proc, address = start_browser_login(ini, BROWSER=str(browser))  # no DISPLAY: a server
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(address).query))
    assert address.startswith(f"{authority.url}/authorize?")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["login_hint"] == "alice" and query["redirect_uri"].startswith("http://127.0.0.1:")
    assert CLIENT_SECRET not in address
    landed = redirect_of(address)  # the remote browser cannot load this: it is pasted
    out, err = finish(proc, f"not an address\n{landed}\n")
    assert proc.returncode == 0, err
    assert "That is not the address the browser ended on" in out
    assert "opening it in your browser" not in out and not opened.exists()
    assert f"tokens stored in {tmp_path / 'state' / 'oauth2-imap.json'}" in out
    assert authority.log[-1] == ("authorization_code", "ok")
    imap = load_agent_config(ini).imap.server
    assert tokens.check_sign_in(imap) is None
    assert not [t for t in [*authority.issued, CLIENT_SECRET] if t in out + err]


def test_a_forged_state_or_a_declined_sign_in_is_one_line_and_stores_nothing(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    ini = browser_ini(tmp_path, authority)
    proc, address = start_browser_login(ini)
    landed = urllib.parse.urlsplit(redirect_of(address))
    forged = dict(urllib.parse.parse_qsl(landed.query)) | {"state": "attacker-state"}
    # A page elsewhere sends the browser to the listener with its own state.
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(landed._replace(query=urllib.parse.urlencode(forged)).geturl())
    assert page.value.code == 400 and b"not from this sign-in" in page.value.read()
    _out, err = finish(proc)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        "imapsync-bridge: [imap] the redirected address is not from this sign-in (its state "
        "does not match: an old or forged address); nothing stored, run `agent login` again"
    ]
    assert authority.log == []  # the code was never sent to the token endpoint

    proc, address = start_browser_login(ini)
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(address).query))["state"]
    _out, err = finish(proc, f"?error=access_denied&state={state}\n")
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["imapsync-bridge: [imap] the sign-in was declined"]
    assert not (tmp_path / "state" / "oauth2-imap.json").exists()


def test_a_stolen_code_is_useless_without_the_pkce_verifier(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    """Someone who sees the redirect (another local program) redeems the code first: the
    server wants the verifier only the agent has, and burns the code."""
    ini = browser_ini(tmp_path, authority)
    proc, address = start_browser_login(ini)
    landed = redirect_of(address)
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(landed).query))
    redirect_uri = landed.split("?")[0]
    form = {"grant_type": "authorization_code", "code": params["code"], "client_id":
            "imapsync-bridge-test", "client_secret": CLIENT_SECRET, "redirect_uri": redirect_uri,
            "code_verifier": "a-guess-" + "x" * 40}  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{authority.url}/token", urllib.parse.urlencode(form).encode())
    answer = json.load(refused.value)
    assert answer["error"] == "invalid_grant" and "code_verifier" in answer["error_description"]
    _out, err = finish(proc, landed + "\n")
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        "imapsync-bridge: [imap] sign-in refused: invalid_grant: the code is unknown, used or "
        "expired"
    ]
    assert authority.refresh_tokens == {}  # nothing was issued to anyone
    assert not (tmp_path / "state" / "oauth2-imap.json").exists()


def test_on_a_desktop_the_browser_opens_by_itself(
    tmp_path: Path, authority: AuthorizationServer
) -> None:
    ini = browser_ini(tmp_path, authority)
    browser, opened = fake_browser(tmp_path)
    proc, address = start_browser_login(ini, DISPLAY=":0", BROWSER=str(browser))
    out, err = finish(proc)  # nobody pastes: the browser comes back
    assert proc.returncode == 0, err
    assert "(opening it in your browser)" in out and opened.read_text() == address
    assert authority.log == [("authorization_code", "ok")]

    opened.unlink()
    proc, address = start_browser_login(ini, "--no-browser", DISPLAY=":0", BROWSER=str(browser))
    out, err = finish(proc, redirect_of(address) + "\n")
    assert proc.returncode == 0, err
    assert "opening it" not in out and not opened.exists()
