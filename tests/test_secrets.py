"""Where the agent's IMAP and SMTP passwords come from, and where they never go.

A real keyring backend (tests/file_keyring.py through keyring's backend API), real
systemd-style credential files, real 0600 rules; the leak test runs a whole product
session (first sync, send via desktop, status, check, a failed login, `agent run` as a
process with --verbose) with distinctive passwords and greps everything it printed,
logged or stored for them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
import smtp_servers
from aiosmtpd.smtp import AuthResult, LoginPassword
from bridge import REPO, Bridge, run_cli
from dovecot import Dovecot
from file_keyring import FileKeyring
from keyring.backends import fail

from imapsync_bridge.config import KEYRING_SERVICE, find_secret, keyring_account
from imapsync_bridge.errors import ConfigError

IMAP_PASSWORD = "imap-Pw-7Qx!93kz"
SMTP_PASSWORD = "smtp-Pw-4Lm#21vd"


@pytest.fixture
def file_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real keyring backend storing in a file under tmp_path (set for this process;
    a child process gets it through the environment, see run_agent_a_while)."""
    before = keyring.get_keyring()  # the default, chosen without this backend
    path = tmp_path / "keyring" / "keyring.json"
    path.parent.mkdir()
    monkeypatch.setenv("TEST_KEYRING_FILE", str(path))
    keyring.set_keyring(FileKeyring())
    try:
        yield path
    finally:
        keyring.set_keyring(before)


def set_password(ini: Path, role: str, password: str) -> tuple[int, str, str]:
    old = sys.stdin
    sys.stdin = io.StringIO(password + "\n")
    try:
        return run_cli("set-password", "--config", str(ini), role)
    finally:
        sys.stdin = old


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def agent_ini(tmp_path: Path, password_file: str | None) -> Path:
    line = f"password_file = {password_file}\n" if password_file else ""
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nstate_dir = state\nserver = 127.0.0.1:9\n[imap]\nhost = 127.0.0.1\n"
        f"port = 143\nsecurity = none\nusername = alice\n{line}"
    )
    return ini


# -- the lookup order: password_file, keyring, $CREDENTIALS_DIRECTORY ---------------------
def test_the_lookup_order(
    file_keyring: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    private(creds / "imap", "from-credential", 0o400)  # as systemd's LoadCredential= leaves it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    keyring.set_password(KEYRING_SERVICE, keyring_account("imap", "alice", "h"), "from-keyring")
    password_file = private(tmp_path / "imap.pass", "from-file")

    assert find_secret("imap", "alice", "h", password_file) == (
        "from-file",
        f"password_file {password_file}",
    )
    assert find_secret("imap", "alice", "h", None) == (
        "from-keyring",
        "the OS keyring (service imapsync-bridge, imap:alice@h)",
    )
    keyring.delete_password(KEYRING_SERVICE, keyring_account("imap", "alice", "h"))
    assert find_secret("imap", "alice", "h", None) == (
        "from-credential",
        f"the systemd credential {creds / 'imap'}",
    )
    # a set password_file never falls through to the others, even when it is missing
    with pytest.raises(ConfigError, match="cannot read password file: No such file"):
        find_secret("imap", "alice", "h", tmp_path / "gone.pass")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError) as nothing:
        find_secret("imap", "alice", "h", None)
    assert str(nothing.value) == (
        "no imap password for alice@h: set password_file in [imap], run `imapsync-bridge "
        "set-password --config <agent.ini> imap`, or pass a systemd credential named imap"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_secrets_readable_by_others_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    creds = tmp_path / "credentials"
    private(creds / "imap", "from-credential", mode)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    keyring_before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())  # a headless machine: no keyring at all
    try:
        with pytest.raises(ConfigError) as refused:
            find_secret("imap", "alice", "h", None)
    finally:
        keyring.set_keyring(keyring_before)
    assert str(refused.value) == (
        f"{creds / 'imap'}: password file is readable by group or others; chmod 600 it"
    )
    private(tmp_path / "imap.pass", "x", mode)
    rc, _out, err = run_cli("agent", "status", "--config", str(agent_ini(tmp_path, "imap.pass")))
    assert rc == 2
    assert err.endswith("is readable by group or others; chmod 600 it\n")


def test_set_password_stores_in_the_keyring(file_keyring: Path, tmp_path: Path) -> None:
    ini = agent_ini(tmp_path, None)
    rc, out, err = set_password(ini, "imap", "typed-Pw-55")
    assert (rc, out, err) == (
        0,
        "stored the imap password for alice@127.0.0.1 in the keyring\n",
        "",
    )
    account = keyring_account("imap", "alice", "127.0.0.1")
    assert keyring.get_password(KEYRING_SERVICE, account) == "typed-Pw-55"
    assert oct(file_keyring.stat().st_mode & 0o777) == "0o600"
    rc, _out, err = set_password(ini, "smtp", "x")
    assert (rc, err) == (2, f"imapsync-bridge: {ini}: no [smtp] section\n")


def test_set_password_without_a_keyring_says_what_to_use(tmp_path: Path) -> None:
    before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        rc, out, err = set_password(agent_ini(tmp_path, None), "imap", "typed-Pw-55")
    finally:
        keyring.set_keyring(before)
    assert (rc, out) == (2, "")
    assert err.startswith("imapsync-bridge: no usable keyring (")
    assert err.endswith("; use password_file or a systemd credential instead\n")
    assert "typed-Pw-55" not in err


# -- secrets never leak: a whole session with distinctive passwords -----------------------
def smtp_authenticator(server, session, envelope, mechanism, data):  # type: ignore[no-untyped-def]
    assert isinstance(data, LoginPassword)
    return AuthResult(success=data.password == SMTP_PASSWORD.encode(), handled=False)


def test_no_secret_in_any_output_log_or_state(
    file_keyring: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dovecot = Dovecot()
    dovecot.password = IMAP_PASSWORD
    seen: list[str] = []  # every stdout and stderr of the session
    options = {"authenticator": smtp_authenticator, "auth_require_tls": False}
    with dovecot, smtp_servers.MailServer(dovecot, options=options) as smtp:
        bridge = Bridge(dovecot, tmp_path)
        bridge.smtp_port = smtp.port
        bridge.start()
        try:
            bridge.pair()
            ini = bridge.agent_ini
            # the IMAP password in the keyring (set-password), SMTP's in a password_file
            text = ini.read_text().replace("password_file = imap.pass\n", "")
            smtp_login = "username = agent\npassword_file = s"  # [smtp]'s username is empty
            ini.write_text(re.sub(r"^username = ?$", smtp_login, text, flags=re.M))
            (ini.parent / "imap.pass").unlink()
            private(ini.parent / "s", SMTP_PASSWORD)
            for role, secret in (("imap", IMAP_PASSWORD),):
                rc, out, err = set_password(ini, role, secret)
                assert rc == 0, err
                seen += [out, err]
            for n in range(1, 4):
                bridge.deliver(n)

            def cli(*argv: str) -> int:
                rc, out, err = run_cli("--verbose", *argv)
                seen.extend([out, err])
                return rc

            assert cli("agent", "sync", "--config", str(ini)) == 0
            bridge.phone(
                "compose", "--to", "bob@else.example", "--subject", "hi", "--body", "b",
                "--via-desktop",
            )  # fmt: skip
            assert cli("agent", "sync", "--config", str(ini)) == 0
            assert len(smtp.received) == 1  # sent through the corporate SMTP with AUTH
            assert cli("agent", "check", "--config", str(ini)) == 0
            assert cli("agent", "status", "--config", str(ini)) == 0
            assert cli("agent", "status", "--config", str(ini), "--json") == 0
            run_log = run_agent_a_while(bridge, file_keyring)
            # a refused login: the error, last_error and status name no password
            keyring.set_password(
                KEYRING_SERVICE, keyring_account("imap", bridge.user, "127.0.0.1"), "wrong-Pw-1"
            )
            assert cli("agent", "sync", "--config", str(ini)) == 1
            assert cli("agent", "status", "--config", str(ini), "--json") == 0
            assert "refused" in json.loads(seen[-2])["last_error"]
        finally:
            bridge.stop()
        state = b"".join(p.read_bytes() for p in (ini.parent / "state").rglob("*") if p.is_file())
    everything = "\n".join([*seen, caplog.text, run_log])
    assert "sync complete" in everything and "agent run" in run_log  # the logs were captured
    for secret in (IMAP_PASSWORD, SMTP_PASSWORD, "wrong-Pw-1"):
        assert secret not in everything
        assert secret.encode() not in state
    assert "Traceback" not in everything


def run_agent_a_while(bridge: Bridge, keyring_file: Path) -> str:
    """`agent run --verbose` as a real process (the same keyring file, through the
    environment) until it has synced once; its whole stderr."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        PYTHON_KEYRING_BACKEND="file_keyring.FileKeyring",
        TEST_KEYRING_FILE=str(keyring_file),
    )
    command = [sys.executable, "-m", "imapsync_bridge.cli", "--verbose", "agent", "run"]
    process = subprocess.Popen(
        [*command, "--config", str(bridge.agent_ini)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        shown = bridge.agent_ini.parent / "state" / "agent-run.json"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(shown.read_text())["syncs"] >= 1:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("agent run did not sync within 20 s")
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    return out.decode("utf-8", "replace")
