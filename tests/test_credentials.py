"""The phone user's password: ``server set-password`` and the scrypt hash behind it.

Real SQLite stores from ``server init``; the CLI run in-process with a pipe as stdin, and
as a real process on a real pseudo-terminal for the prompt-twice path.
"""

from __future__ import annotations

import io
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from bridge import REPO, run_cli

from imapsync_bridge.server import credentials
from imapsync_bridge.server.app import init_server
from imapsync_bridge.server.credentials import Parameters, check_password, hash_password
from imapsync_bridge.server.store import PhoneStore


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    ini = init_server(
        tmp_path / "server", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
    )
    for user in ("alice", "bob"):
        rc, _out, err = run_cli(
            "server", "add-user", "--config", str(ini), user, "--address",
            f"{user}@phone.example", "--desktop-address", f"{user}@corp.example",
        )  # fmt: skip
        assert rc == 0, err
    return ini


def store_of(ini: Path) -> PhoneStore:
    return PhoneStore(ini.parent / "phone.sqlite3")


def set_password(ini: Path, user: str, stdin: str) -> tuple[int, str, str]:
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return run_cli("server", "set-password", "--config", str(ini), user)
    finally:
        sys.stdin = old


def test_the_hash_is_salted_scrypt_with_its_parameters() -> None:
    one, two = hash_password("correct horse"), hash_password("correct horse")
    assert one != two  # a fresh 16-byte salt each time
    assert one.startswith("$scrypt$ln=14,r=8,p=1$")
    parameters, salt, digest = credentials.parse_hash(one) or pytest.fail("unparsed")
    assert (parameters, len(salt), len(digest)) == (Parameters(14, 8, 1), 16, 32)
    assert credentials.verify_password("correct horse", one)
    assert not credentials.verify_password("correct horsE", one)
    assert not credentials.verify_password("correct horse", "$scrypt$ln=30,r=8,p=1$AAAA$AAAA")
    assert not credentials.verify_password("", "not a hash")


def test_set_password_from_stdin_then_log_in_by_name_or_address(ini: Path) -> None:
    rc, out, err = set_password(ini, "alice", "s3cret pass\n")
    assert (rc, out.strip(), err) == (0, "password of alice set", "")
    with store_of(ini) as store:
        assert check_password(store, "alice", "s3cret pass") == "alice"
        assert check_password(store, "Alice@Phone.Example", "s3cret pass") == "alice"
        assert check_password(store, "alice", "s3cret pass\n") is None
        assert check_password(store, "alice", "s3cret") is None
        assert check_password(store, "bob", "s3cret pass") is None  # bob has none yet
        assert check_password(store, "nobody", "s3cret pass") is None
        stored = store.password_hash("alice")
    assert stored is not None and "s3cret" not in stored[1]
    # a new password replaces the old one; only the first line counts
    assert set_password(ini, "alice", "second\nthird\n")[0] == 0
    with store_of(ini) as store:
        assert check_password(store, "alice", "second") == "alice"
        assert check_password(store, "alice", "s3cret pass") is None


@pytest.mark.parametrize(
    ("stdin", "reason"),
    [
        ("\n", "the password is empty"),
        ("", "the password is empty"),
        ("x" * 257 + "\n", "the password is longer than 256 characters"),
        ("a\x00b\n", "the password contains a NUL character"),
    ],
)
def test_unusable_passwords_are_refused_with_exit_2(ini: Path, stdin: str, reason: str) -> None:
    rc, out, err = set_password(ini, "alice", stdin)
    assert (rc, out, err) == (2, "", f"imapsync-bridge: {reason}\n")
    with store_of(ini) as store:
        assert store.password_hash("alice") is None


def test_unknown_user_is_exit_1(ini: Path) -> None:
    rc, _out, err = set_password(ini, "carol", "whatever\n")
    assert rc == 1 and "no such user: 'carol'" in err


def test_an_address_two_users_share_logs_in_neither(ini: Path) -> None:
    with store_of(ini) as store:
        store.add_user("carol", "shared@phone.example", "c@corp.example", 5)
        store.add_user("dave", "Shared@phone.example", "d@corp.example", 5)
        credentials.set_password(store, "carol", "pw-carol")
        credentials.set_password(store, "dave", "pw-dave")
        assert check_password(store, "shared@phone.example", "pw-carol") is None
        assert check_password(store, "carol", "pw-carol") == "carol"


def test_a_weaker_hash_is_upgraded_at_a_good_login(ini: Path) -> None:
    with store_of(ini) as store:
        store.set_password_hash("alice", hash_password("pw", Parameters(log_n=10)))
        assert check_password(store, "alice", "wrong") is None
        assert (store.password_hash("alice") or ("", ""))[1].startswith("$scrypt$ln=10,")
        assert check_password(store, "alice", "pw") == "alice"
        upgraded = (store.password_hash("alice") or ("", ""))[1]
    assert upgraded.startswith("$scrypt$ln=14,r=8,p=1$")
    assert credentials.verify_password("pw", upgraded)


def _read_until(fd: int, wanted: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {wanted!r} in {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def _on_a_terminal(ini: Path, typed: list[str]) -> tuple[int, bytes]:
    """`server set-password` as a real process on a pseudo-terminal, typing ``typed``."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the pty as its controlling terminal
        os.environ["PYTHONPATH"] = str(REPO)
        argv = ["server", "set-password", "--config", str(ini), "alice"]
        os.execv(sys.executable, [sys.executable, "-m", "imapsync_bridge.cli", *argv])
    try:
        seen = _read_until(fd, b"new password for phone user alice: ")
        os.write(fd, typed[0].encode() + b"\r")
        seen += _read_until(fd, b"again: ")
        os.write(fd, typed[1].encode() + b"\r")
        seen += _read_until(fd, b"\x00")  # no NUL ever comes: reads to the end
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen


def test_on_a_terminal_it_prompts_twice_without_echo(ini: Path) -> None:
    rc, seen = _on_a_terminal(ini, ["typed twice", "typed twice"])
    assert rc == 0, seen
    assert b"typed twice" not in seen and b"password of alice set" in seen
    with store_of(ini) as store:
        assert check_password(store, "alice", "typed twice") == "alice"


def test_on_a_terminal_two_different_passwords_change_nothing(ini: Path) -> None:
    rc, seen = _on_a_terminal(ini, ["one", "another"])
    assert rc == 2 and b"the two passwords differ; nothing changed" in seen
    with store_of(ini) as store:
        assert store.password_hash("alice") is None
