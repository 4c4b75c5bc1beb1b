"""`agent check` against real servers: the test Dovecot, an aiosmtpd SMTP server with
AUTH, the hosted server over mutual TLS, and for OAuth2 a Dovecot introspecting tokens at
tests/oauth_server.py. Every line is what the user reads; the check
must change nothing (no folder created, no state written)."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import smtp_servers
from aiosmtpd.smtp import AuthResult, LoginPassword
from bridge import REPO, Bridge, run_cli
from dovecot import Dovecot, Profile
from oauth_server import AuthorizationServer
from test_oauth2 import authority, login, oauth_dovecot  # noqa: F401 (fixtures)

SMTP_PASSWORD = "smtp-pass-4711"
#: A server whose Trash the agent would have to create (no \\Trash, no usual name).
NO_TRASH = Profile("no-trash", None, "", "/", {"Sent": "\\Sent"})


def check(ini: Path) -> tuple[int, list[str], str]:
    rc, out, err = run_cli("agent", "check", "--config", str(ini))
    return rc, out.splitlines(), err


def line(lines: list[str], what: str) -> str:
    found = [text for text in lines if text[2:].startswith(what + ":")]
    assert len(found) == 1, f"no single {what!r} line in {lines}"
    return found[0]


def folder_names(dovecot: Dovecot, user: str) -> set[str]:
    with dovecot.client(user) as client:
        return {name for _flags, _sep, name in client.list_folders()}


def authenticator(server, session, envelope, mechanism, data):  # type: ignore[no-untyped-def]
    assert isinstance(data, LoginPassword)
    return AuthResult(success=data.password == SMTP_PASSWORD.encode(), handled=False)


@pytest.fixture
def bridge(dovecot: Dovecot, tmp_path: Path) -> Iterator[Bridge]:
    """A paired agent with [smtp] (AUTH, password_file) on the stock test Dovecot."""
    options = {"authenticator": authenticator, "auth_require_tls": False}
    with smtp_servers.MailServer(dovecot, options=options) as smtp:
        b = Bridge(dovecot, tmp_path, window=6)
        b.smtp_port = smtp.port
        b.start()
        b.pair()
        text = b.agent_ini.read_text()
        b.agent_ini.write_text(
            re.sub(
                r"^username = ?$", "username = agent\npassword_file = smtp.pass", text, flags=re.M
            )
        )
        write_private(b.agent_ini.parent / "smtp.pass", SMTP_PASSWORD)
        try:
            yield b
        finally:
            b.stop()


def write_private(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    path.chmod(0o600)


def plain_agent_ini(root: Path, port: int, user: str, password: str) -> Path:
    """An unpaired agent with IMAP only (the hosted server is not the point here)."""
    root.mkdir(parents=True, exist_ok=True)
    write_private(root / "imap.pass", password)
    ini = root / "agent.ini"
    ini.write_text(
        "[agent]\nstate_dir = state\nserver = 127.0.0.1:9\n"
        f"[imap]\nhost = 127.0.0.1\nport = {port}\nsecurity = none\nusername = {user}\n"
        "password_file = imap.pass\n"
    )
    return ini


def test_a_good_set_up_passes_every_check_and_changes_nothing(bridge: Bridge) -> None:
    state = bridge.agent_ini.parent / "state"
    state_before = sorted(os.listdir(state))
    folders_before = folder_names(bridge.dovecot, bridge.user)
    rc, lines, err = check(bridge.agent_ini)
    assert rc == 0, lines
    assert err == ""
    assert all(text.startswith("✓ ") for text in lines), lines
    assert line(lines, "imap password").endswith(
        f"found in password_file {bridge.agent_ini.parent}/imap.pass"
    )
    assert line(lines, "IMAP login") == f"✓ IMAP login: logged in as {bridge.user}"
    for capability in ("CONDSTORE", "IDLE", "MOVE", "SPECIAL-USE"):
        assert line(lines, f"IMAP {capability}").startswith(f"✓ IMAP {capability}: offered: ")
    assert line(lines, "mailbox") == "✓ mailbox: INBOX (0 messages)"
    assert line(lines, "trash folder") == "✓ trash folder: Trash (special-use)"
    assert line(lines, "sent folder") == "✓ sent folder: Sent (special-use)"
    assert (
        line(lines, "outbox folder") == "✓ outbox folder: Outbox (missing: made at the first sync)"
    )
    assert "logged in as agent" in line(lines, "SMTP")
    assert line(lines, "hosted server").startswith(
        f"✓ hosted server: 127.0.0.1:{bridge.server.port if bridge.server else 0} verified "
        "with the pinned CA, this agent is alice"
    )
    # nothing was created or stored: no Outbox, the state directory as it was
    assert folder_names(bridge.dovecot, bridge.user) == folders_before
    assert "Outbox" not in folders_before
    assert sorted(os.listdir(state)) == state_before
    # a wrong SMTP password is the SMTP line's ✗, with what to do; exit 1
    write_private(bridge.agent_ini.parent / "smtp.pass", "not-it")
    rc, lines, _err = check(bridge.agent_ini)
    assert rc == 1
    smtp = line(lines, "SMTP")
    assert smtp.startswith("✗ SMTP: 127.0.0.1:") and "refused the login as 'agent': 535" in smtp
    assert "set-password --config agent.ini smtp" in smtp
    assert "not-it" not in "\n".join(lines)


def test_the_state_directory_and_the_agent_key(bridge: Bridge) -> None:
    state = bridge.agent_ini.parent / "state"
    user = pwd.getpwuid(os.geteuid()).pw_name
    _rc, lines, _err = check(bridge.agent_ini)
    assert line(lines, "state directory") == f"✓ state directory: {state} is writable by {user}"
    assert line(lines, "agent key") == f"✓ agent key: {state}/agent.key is private (mode 0600)"
    (state / "agent.key").chmod(0o640)
    rc, lines, _err = check(bridge.agent_ini)
    assert rc == 1
    assert line(lines, "agent key") == (
        f"✗ agent key: {state}/agent.key is open to group or others (mode 0640) — "
        f"chmod 600 {state}/agent.key: anyone who reads it can act as this agent"
    )


def test_a_state_directory_that_is_missing_or_cannot_be_made(tmp_path: Path) -> None:
    port = smtp_servers.free_port()  # the IMAP lines do not matter here
    ini = plain_agent_ini(tmp_path, port, "someone", "secret-1")
    _rc, lines, _err = check(ini)
    state = tmp_path / "state"
    assert (
        line(lines, "state directory") == f"✓ state directory: {state} (missing: made at pairing)"
    )
    assert not state.exists(), "the check created it"
    fix = (
        "create it for the user the agent runs as (`install -d -m 700 -o USER {}`; systemd's "
        "StateDirectory= does it), or set [agent] state_dir"
    )
    ini.write_text(ini.read_text().replace("state_dir = state", "state_dir = imap.pass/state"))
    rc, lines, _err = check(ini)
    assert rc == 1
    blocked = tmp_path / "imap.pass" / "state"
    assert line(lines, "state directory") == (
        f"✗ state directory: {blocked} cannot be created: {tmp_path}/imap.pass is not a "
        f"directory — {fix.format(blocked)}"
    )
    for command in ("sync", "status"):  # the commands that use it: one line, not a traceback
        rc, out, err = run_cli("agent", command, "--config", str(ini))
        assert (rc, out) == (1, ""), err
        assert err == (
            f"imapsync-bridge: cannot create the state directory {blocked}: Not a directory; "
            "`agent check` says what to do\n"
        )


def test_a_state_directory_the_service_user_cannot_write() -> None:
    """`agent check` run as the service's user (nobody here, through util-linux's
    setpriv) on a root-owned 0700 directory."""
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's tmp_path is 0700
        root = Path(shared)
        root.chmod(0o755)
        (root / "state").mkdir(mode=0o700)
        ini = root / "agent.ini"
        ini.write_text(
            "[agent]\nstate_dir = state\nserver = 127.0.0.1:9\n[imap]\nhost = 127.0.0.1\n"
            f"port = {smtp_servers.free_port()}\nsecurity = none\nusername =\n"
        )
        ini.chmod(0o644)
        nobody = pwd.getpwnam("nobody")
        as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
        done = subprocess.run(
            [*as_nobody, "--clear-groups", sys.executable, "-m", "imapsync_bridge.cli",
             "agent", "check", "--config", str(ini)],
            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/",
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert line(done.stdout.splitlines(), "state directory").startswith(
        f"✗ state directory: {root}/state is not writable by nobody — create it for the user"
    )


def test_a_wrong_password_is_the_login_line(tmp_path: Path) -> None:
    with Dovecot() as dovecot:  # its own: a failed login slows later ones (auth penalty)
        user = dovecot.new_user()
        ini = plain_agent_ini(tmp_path, dovecot.port, user, "wrong-password-123")
        rc, lines, _err = check(ini)
    assert rc == 1
    assert line(lines, "IMAP connection").startswith("✓ ")
    login = line(lines, "IMAP login")
    assert login.startswith(f"✗ IMAP login: IMAP login as {user!r} at 127.0.0.1:{dovecot.port}")
    assert login.endswith(
        "— check [imap] username and the password: `imapsync-bridge set-password "
        "--config agent.ini imap` stores a new one (docs/secrets.md)"
    )
    assert "wrong-password-123" not in "\n".join(lines)
    assert not [text for text in lines if text[2:].startswith(("IMAP CONDSTORE", "trash"))]
    hosted = line(lines, "hosted server")
    assert hosted.startswith("✗ hosted server: this agent is not paired")
    assert "agent pair --config agent.ini --code CODE" in hosted


def test_a_wrong_port_is_the_connection_line(dovecot: Dovecot, tmp_path: Path) -> None:
    port = smtp_servers.free_port()  # nothing listens there
    ini = plain_agent_ini(tmp_path, port, dovecot.new_user(), dovecot.password)
    rc, lines, _err = check(ini)
    assert rc == 1
    connection = line(lines, "IMAP connection")
    assert connection.startswith(
        f"✗ IMAP connection: cannot connect to IMAP server 127.0.0.1:{port}"
    )
    assert "Connection refused" in connection
    assert connection.endswith(
        "— check [imap] host, port and security (993 for tls, 143 for starttls) "
        "and that this machine may connect there"
    )
    assert not [text for text in lines if text[2:].startswith("IMAP login")]


def test_a_missing_trash_is_named_with_the_setting_to_use(tmp_path: Path) -> None:
    with Dovecot(profile=NO_TRASH) as dovecot:
        user = dovecot.new_user()
        ini = plain_agent_ini(tmp_path, dovecot.port, user, dovecot.password)
        rc, lines, _err = check(ini)
        assert "Trash" not in folder_names(dovecot, user)  # the check created nothing
    assert rc == 1
    assert line(lines, "IMAP login").startswith("✓ ")
    assert line(lines, "sent folder") == "✓ sent folder: Sent (special-use)"
    assert line(lines, "trash folder") == (
        "✗ trash folder: none found (no \\Trash attribute, none of the usual names); "
        "a sync would create Trash — set [imap] trash = <the trash folder your mail client "
        "uses>, or create Trash there if that is the one you want"
    )


def test_a_configured_folder_that_does_not_exist(dovecot: Dovecot, tmp_path: Path) -> None:
    ini = plain_agent_ini(tmp_path, dovecot.port, dovecot.new_user(), dovecot.password)
    ini.write_text(ini.read_text() + "trash = Papierkorb\n")
    rc, lines, _err = check(ini)
    assert rc == 1
    assert line(lines, "trash folder") == (
        "✗ trash folder: [imap] trash = Papierkorb: no such folder — set [imap] trash to a "
        "folder that exists, or empty to find it"
    )


def test_a_broken_config_is_the_only_line_and_exit_2(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nstate_dir = state\nserver = nowhere\n[imap]\nhost = x\n")
    rc, lines, _err = check(ini)
    assert rc == 2
    assert lines == [
        f"✗ config: {ini}: [agent] server: expected host:port, got 'nowhere' — fix the "
        "setting named, then run this again"
    ]


def test_each_server_profile_passes_with_its_own_folders_and_fall_backs(
    profiled_dovecot: Dovecot, tmp_path: Path
) -> None:
    """Exchange-like and Cyrus-like servers lack capabilities: the agent falls back, so
    those lines pass and say how; their Trash and Sent are found by name."""
    profile = profiled_dovecot.profile
    bridge = Bridge(profiled_dovecot, tmp_path).start()
    try:
        bridge.pair()
        rc, lines, _err = check(bridge.agent_ini)
    finally:
        bridge.stop()
    assert rc == 0 and all(text.startswith("✓ ") for text in lines), lines
    how = "special-use" if profile.name == "full" else "usual name"
    assert line(lines, "trash folder") == f"✓ trash folder: {profile.trash} ({how})"
    assert line(lines, "sent folder") == f"✓ sent folder: {profile.sent} ({how})"
    condstore = line(lines, "IMAP CONDSTORE")
    if profile.name == "full":
        assert condstore.startswith("✓ IMAP CONDSTORE: offered: ")
    else:
        assert condstore == (
            "✓ IMAP CONDSTORE: not offered: each sync compares every message's flags "
            "(slower on a big inbox)"
        )


def test_tls_untrusted_then_trusted(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dovecot.tls_port is not None and dovecot.cert_path is not None
    user = dovecot.new_user()
    ini = plain_agent_ini(tmp_path, dovecot.tls_port, user, dovecot.password)
    ini.write_text(ini.read_text().replace("security = none", "security = tls"))
    rc, lines, _err = check(ini)
    assert rc == 1
    connection = line(lines, "IMAP connection")
    assert connection.startswith(
        f"✗ IMAP connection: IMAP server 127.0.0.1:{dovecot.tls_port}: TLS certificate not trusted"
    )
    assert connection.endswith(
        "— the server's certificate is not trusted here: install its CA in the system store "
        "(or SSL_CERT_FILE), and use the name it carries as [imap] host"
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert_path))
    rc, lines, _err = check(ini)
    assert line(lines, "IMAP connection") == (
        f"✓ IMAP connection: 127.0.0.1:{dovecot.tls_port} (tls) answered"
    )
    assert line(lines, "IMAP login") == f"✓ IMAP login: logged in as {user}"


def test_the_oauth2_sign_in_line_before_after_and_once_revoked(
    oauth_dovecot: Dovecot,  # noqa: F811 (the fixtures imported above)
    authority: AuthorizationServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    user = oauth_dovecot.new_user()
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nstate_dir = state\nserver = 127.0.0.1:9\n[imap]\nhost = 127.0.0.1\n"
        f"port = {oauth_dovecot.port}\nsecurity = none\nusername = {user}\n"
        + "\n".join(authority.ini_lines())
        + "\n"
    )
    again = f"run `imapsync-bridge agent login --config {ini} imap` — see docs/oauth2.md"
    rc, lines, _err = check(ini)
    assert rc == 1
    assert line(lines, "imap OAuth2 sign-in") == (
        f"✗ imap OAuth2 sign-in: [imap] no OAuth2 sign-in for {user}@127.0.0.1 yet: {again}"
    )
    assert not [text for text in lines if text[2:].startswith("IMAP")]  # no login tried

    authority.access_ttl = 4  # renewed after 3 s: the revocation shows soon
    login(ini, authority, user)
    rc, lines, _err = check(ini)
    assert line(lines, "imap OAuth2 sign-in") == (
        f"✓ imap OAuth2 sign-in: an access token for {user}@127.0.0.1"
    )
    assert line(lines, "IMAP login") == f"✓ IMAP login: logged in as {user}"
    assert line(lines, "mailbox") == "✓ mailbox: INBOX (0 messages)"

    # An administrator revokes the sign-in; once the access token is used up, ✗.
    authority.revoke(user)
    stored = json.loads((tmp_path / "state" / "oauth2-imap.json").read_text())
    time.sleep(max(0.0, stored["expires_at"] - 1 - time.time()) + 0.1)
    rc, lines, _err = check(ini)
    assert rc == 1
    assert line(lines, "imap OAuth2 sign-in") == (
        f"✗ imap OAuth2 sign-in: [imap] the OAuth2 sign-in of {user}@127.0.0.1 no longer "
        f"works (invalid_grant: the refresh token expired or was revoked): {again}"
    )
    assert not [text for text in lines if text[2:].startswith("IMAP")]
    assert not [t for t in authority.issued if t in "\n".join(lines)]
