"""Configuration: the shipped example loads; broken files give one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from bridge import REPO, run_cli

from imapsync_bridge.config import load_agent_config, load_server_config, read_password_file
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


# -- every key is checked when the file is loaded, before anything else ------------------
FULL_AGENT = """\
[agent]
state_dir = state
server = 127.0.0.1:4465
server_timeout = 60
sync_interval = 300
idle = false
sync_on_change = false
poll_interval = 30
mass_delete_share = 0.5
max_message_size = 26214400
[imap]
host = 127.0.0.1
port = 143
security = none
username = alice
password_file = imap.pass
mailbox = INBOX
trash =
sent =
outbox =
auth = oauth2
oauth2_provider = microsoft
client_id = 0000-1111
tenant = corp.example
device_authorization_endpoint = https://login.example/devicecode
token_endpoint = https://login.example/token
scopes = https://outlook.office.com/IMAP.AccessAsUser.All offline_access
[smtp]
host = 127.0.0.1
port = 587
security = none
username = alice
password_file = smtp.pass
from_address = alice@corp.example
auth = password
[trigger]
max_age = 600
min_interval = 10
"""


def test_every_documented_agent_key_loads(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, FULL_AGENT))
    assert (config.idle, config.sync_on_change, config.poll_interval) == (False, False, 30)
    assert config.imap.server.auth == "oauth2"
    assert config.imap.server.oauth2 is not None
    assert config.imap.server.oauth2.provider == "microsoft"
    assert config.smtp is not None and config.smtp.auth == "password"
    assert config.smtp_from_address == "alice@corp.example"
    assert (config.trigger_max_age, config.trigger_min_interval) == (600, 10)


def _private(path: Path, mode: int = 0o600) -> Path:
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


# (edit of GOOD, words the one line must hold besides the file name)
BAD_AGENT = [
    (("[agent]\n", "[agent]\nsyncinterval = 60\n"), ["[agent]", "syncinterval", "unknown key"]),
    (("[imap]\n", "[imap]\nmailbx = INBOX\n"), ["[imap]", "mailbx", "did you mean mailbox"]),
    (("[imap]\n", "[imap]\npassword = hunter2\n"), ["[imap]", "password", "never read"]),
    (
        (
            "password_file = imap.pass\n",
            "password_file = imap.pass\n[smtp]\nhost = 127.0.0.1\n"
            "security = none\npassword = hunter2\n",
        ),
        ["[smtp]", "password", "never read"],
    ),
    (
        ("[imap]\n", "[smtp]\nhost = 127.0.0.1\nsecurity = none\nfrom = a@b\n[imap]\n"),
        ["[smtp]", "from", "unknown key"],
    ),
    (("[imap]\n", "[trigger]\nmax_age = 10\nphrase = x\n[imap]\n"), ["[trigger]", "phrase"]),
    (("[imap]\n", "[imap]\nauth = kerberos\n"), ["[imap]", "auth", "password, oauth2"]),
    (("[imap]\n", "[imap]\noauth2_provider = yahoo\n"), ["[imap]", "oauth2_provider"]),
    (("[imap]\n", "[imap]\ntoken_endpoint = login.example\n"), ["[imap]", "token_endpoint"]),
    (("[agent]\n", "[agent]\nidle = sometimes\n"), ["[agent]", "idle", "true or false"]),
    (("[agent]\n", "[sync]\nwindow = 5\n[agent]\n"), ["unknown section [sync]"]),
    (("[agent]\n", "[DEFAULT]\nport = 1\n[agent]\n"), ["unknown section [DEFAULT]"]),
]


@pytest.mark.parametrize("command", ["status", "sync"])
@pytest.mark.parametrize(
    ("change", "words"),
    BAD_AGENT,
    ids=[
        "unknown-agent-key", "typo-hint", "imap-password", "smtp-password", "unknown-smtp-key",
        "unknown-trigger-key", "bad-auth", "bad-provider", "bad-url", "bad-bool",
        "unknown-section", "default-section",
    ],
)  # fmt: skip
def test_an_unpaired_agent_reports_the_config_problem_not_pairing(
    tmp_path: Path, command: str, change: tuple[str, str], words: list[str]
) -> None:
    _private(tmp_path / "imap.pass")
    ini = write(tmp_path, GOOD.replace(*change, 1))
    rc, _out, err = run_cli("agent", command, "--config", str(ini))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(ini) in lines[0] and "not paired" not in lines[0]
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_readable_password_file_is_refused_when_the_config_loads(
    tmp_path: Path, mode: int
) -> None:
    _private(tmp_path / "imap.pass", mode)
    ini = write(tmp_path, GOOD)
    rc, _out, err = run_cli("agent", "status", "--config", str(ini))
    assert rc == 2
    assert err.strip().splitlines() == [
        f"imapsync-bridge: {ini}: [imap] password_file {tmp_path / 'imap.pass'} is readable "
        "by group or others; chmod 600 it"
    ]


# -- server.ini ----------------------------------------------------------------------------
@pytest.fixture()
def server_ini(tmp_path: Path) -> Path:
    rc, _out, err = run_cli("server", "init", "--data-dir", str(tmp_path / "srv"))
    assert rc == 0, err
    return tmp_path / "srv" / "server.ini"


def test_server_config_reads_every_key_server_init_writes(server_ini: Path) -> None:
    config = load_server_config(server_ini)
    assert config.sync_listen == ("127.0.0.1", 4465)
    assert config.smtp_listen == ("127.0.0.1", 2525)
    assert config.submission_listen == ("127.0.0.1", 2587)
    assert config.web_listen == ("127.0.0.1", 8443)
    assert (config.default_window, config.max_frame) == (50, 67108864)
    assert (config.max_message_size, config.max_unsynced) == (25 * 1024 * 1024, 1000)
    assert config.relay is not None
    assert (config.relay.host, config.relay.port, config.relay.security) == (
        "localhost",
        25,
        "none",
    )
    assert (config.relay.username, config.relay.password_file) == ("", None)


def test_empty_listeners_are_off(server_ini: Path) -> None:
    text = server_ini.read_text().replace("web_listen = 127.0.0.1:8443", "web_listen =")
    server_ini.write_text(text)
    assert load_server_config(server_ini).web_listen is None


BAD_SERVER = [
    (("[server]\n", "[server]\nlisten = 0.0.0.0:1\n"), ["[server]", "listen", "unknown key"]),
    (("[relay]\n", "[relay]\npassword = hunter2\n"), ["[relay]", "password", "never read"]),
    (("[relay]\n", "[relay]\nfrom_address = a@b\n"), ["[relay]", "from_address", "unknown"]),
    (("[relay]\n", "[phone]\nwindow = 1\n[relay]\n"), ["unknown section [phone]"]),
    (("web_listen = 127.0.0.1:8443", "web_listen = everywhere"), ["web_listen", "host:port"]),
    (("default_window = 50", "default_window = 50\nmax_unsynced = 0"), ["max_unsynced"]),
    (("data_dir = .", "data_dir = nowhere"), ["[server] data_dir", "not a directory"]),
]


@pytest.mark.parametrize("command", [["server", "run"], ["server", "pair-code"], ["phone"]])
@pytest.mark.parametrize(
    ("change", "words"),
    BAD_SERVER,
    ids=["unknown-key", "relay-password", "unknown-relay-key", "unknown-section",
         "bad-listen", "bad-max-unsynced", "no-data-dir"],
)  # fmt: skip
def test_a_bad_server_config_is_one_line_and_exit_2(
    server_ini: Path, command: list[str], change: tuple[str, str], words: list[str]
) -> None:
    text = server_ini.read_text()
    assert change[0] in text
    server_ini.write_text(text.replace(*change, 1))
    argv = [*command, "--config", str(server_ini)]
    argv += {"pair-code": ["alice"], "phone": ["--user", "alice", "list"]}.get(command[-1], [])
    rc, _out, err = run_cli(*argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(server_ini) in lines[0]
    for word in words:
        assert word in lines[0]


def test_a_server_config_copied_elsewhere_names_the_missing_file(
    server_ini: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "server.ini"
    copy.parent.mkdir()
    copy.write_text(server_ini.read_text())
    rc, _out, err = run_cli("server", "run", "--config", str(copy))
    assert rc == 2
    assert err.strip().splitlines() == [
        f"imapsync-bridge: {copy}: [server] data_dir = .: {copy.parent / 'ca.crt'} is missing; "
        "point data_dir at the directory `server init` made (relative paths are relative "
        "to server.ini)"
    ]
    assert "None" not in err


# -- each bad agent.ini: its exact one-line message, exit 2 (issue 9) ----------------------
# (change to GOOD, the message after "imapsync-bridge: {ini}: ")
EXACT = [
    (("[agent]\n", "[agent]\nsync_interval = 0\n"),
     "[agent] sync_interval must be an integer >= 1, got '0'"),
    (("[agent]\n", "[agent]\nsync_interval = soon\n"),
     "[agent] sync_interval must be an integer >= 1, got 'soon'"),
    (("[agent]\n", "[agent]\nidle = maybe\n"), "[agent] idle must be true or false"),
    (("[agent]\n", "[agent]\nmass_delete_share = 1.5\n"),
     "[agent] mass_delete_share must be a number in [0.0, 1.0]"),
    (("[agent]\n", "[agent]\nmax_message_size = 10\n"),
     "[agent] max_message_size must be an integer >= 1024, got '10'"),
    (("server = 127.0.0.1:4465", "server = 127.0.0.1"),
     "[agent] server: expected host:port, got '127.0.0.1'"),
    (("server = 127.0.0.1:4465", "server = 127.0.0.1:99999"),
     "[agent] server: expected host:port, got '127.0.0.1:99999'"),
    (("state_dir = state\n", ""), "[agent] state_dir is required"),
    (("host = 127.0.0.1\n", ""), "[imap] host is required"),
    (("port = 143", "port = 0"), "[imap] port must be an integer >= 1, got '0'"),
    (("security = none", "security = ssl"),
     "[imap] security must be one of tls, starttls, none"),
    (("host = 127.0.0.1", "host = imap.corp.example"),
     "[imap] security = none is only allowed for a loopback host, not 'imap.corp.example'"),
    (("username = alice", "usernme = alice"),
     "[imap] usernme: unknown key (did you mean username?)"),
    (("[imap]\n", "[imap]\npassword = hunter2\n"),
     "[imap] password: a password is never read from the INI file; use password_file "
     "(mode 0600), `imapsync-bridge set-password --config agent.ini imap` (the keyring), or "
     "a systemd credential named imap"),
    (("[imap]\n", "[imap]\nauth = kerberos\n"),
     "[imap] auth must be one of password, oauth2, got 'kerberos'"),
    (("[imap]\n", "[imap]\ntoken_endpoint = ftp://login.example/token\n"),
     "[imap] token_endpoint must be an https:// URL, got 'ftp://login.example/token'"),
    (("[agent]\n", "[phone]\nwindow = 5\n[agent]\n"),
     "unknown section [phone] (expected [agent], [imap], [smtp], [trigger])"),
    (("[agent]\n", "[DEFAULT]\nport = 1\n[agent]\n"),
     "unknown section [DEFAULT] (expected [agent], [imap], [smtp], [trigger])"),
    (("[imap]\nhost = 127.0.0.1\nport = 143\nsecurity = none\nusername = alice\n"
      "password_file = imap.pass\n", ""), "missing section [imap]"),
    (("[agent]\n", ""), "unreadable configuration: File contains no section headers."),
    (("password_file = imap.pass\n", "password_file = imap.pass\n[smtp]\nhost = 127.0.0.1\n"
      "security = none\nfrom_address = alice\n"),
     "[smtp] from_address must be a mail address, got 'alice'"),
    (("password_file = imap.pass\n", "password_file = imap.pass\n[trigger]\nmax_age = 0\n"),
     "[trigger] max_age must be an integer >= 1, got '0'"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), EXACT, ids=[m for _c, m in EXACT])
def test_each_bad_agent_config_has_its_exact_message_and_exit_2(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    _private(tmp_path / "imap.pass", 0o600)
    text = GOOD.replace(*change, 1)
    assert text != GOOD
    ini = write(tmp_path, text)
    for command in (["agent", "status"], ["agent", "sync"]):
        rc, out, err = run_cli(*command, "--config", str(ini))
        assert (rc, out, err) == (2, "", f"imapsync-bridge: {ini}: {message}\n"), command
    rc, out, _err = run_cli("agent", "check", "--config", str(ini))
    assert rc == 2
    assert out == f"✗ config: {ini}: {message} — fix the setting named, then run this again\n"
