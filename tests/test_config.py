"""Configuration: the shipped example loads; broken files give one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from bridge import REPO, run_cli

from imapsync_bridge.config import load_agent_config, read_password_file
from imapsync_bridge.errors import ConfigError

GOOD = """\
[agent]
state_dir = state
server = 127.0.0.1:4465
[imap]
host = 127.0.0.1
port = 143
security = none
username = alice
password_file = imap.pass
"""


def write(tmp_path: Path, text: str) -> Path:
    ini = tmp_path / "agent.ini"
    ini.write_text(text)
    return ini


def test_the_example_configuration_loads() -> None:
    config = load_agent_config(REPO / "config.example.ini")
    assert config.server == ("sync.example.com", 4465)
    assert config.imap.server.security == "tls"
    assert config.mass_delete_share == 0.5
    assert (config.imap.trash, config.imap.sent, config.imap.outbox) == ("", "", "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("security = none", "security = none\nhost = imap.corp.example"), None),
        (("server = 127.0.0.1:4465", "server = nowhere"), "expected host:port"),
        (("security = none", "security = rot13"), "security must be one of"),
        (("[imap]", "[imap]\nport = many"), None),
        (("[agent]", "[agent]\nmass_delete_share = 2"), "mass_delete_share"),
        (("[imap]\n", ""), None),
    ],
    ids=["plain-to-remote", "bad-server", "bad-security", "bad-port", "bad-share", "no-imap"],
)
def test_broken_configuration_is_a_one_line_error_with_exit_2(
    tmp_path: Path, change: tuple[str, str], message: str | None
) -> None:
    ini = write(tmp_path, GOOD.replace(*change, 1))
    with pytest.raises(ConfigError) as caught:
        load_agent_config(ini)
    assert "\n" not in str(caught.value)
    if message:
        assert message in str(caught.value)
    rc, _out, err = run_cli("agent", "status", "--config", str(ini))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1


def test_plain_imap_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    ini = write(tmp_path, GOOD.replace("host = 127.0.0.1", "host = imap.corp.example"))
    with pytest.raises(ConfigError, match="only allowed for a loopback host"):
        load_agent_config(ini)


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "imap.pass"
    secret.write_text("s3cret\nsecond line ignored\n")
    secret.chmod(0o600)
    assert read_password_file(secret) == "s3cret"
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        read_password_file(secret)


def test_a_missing_file_is_exit_2(tmp_path: Path) -> None:
    rc, _out, err = run_cli("agent", "sync", "--config", str(tmp_path / "nope.ini"))
    assert rc == 2 and "no such configuration file" in err


def test_sync_before_pairing_says_to_pair(tmp_path: Path) -> None:
    ini = write(tmp_path, GOOD)
    (tmp_path / "imap.pass").write_text("x\n")
    (tmp_path / "imap.pass").chmod(0o600)
    rc, _out, err = run_cli("agent", "sync", "--config", str(ini))
    assert rc == 2 and "agent pair" in err
