"""config.example.ini and server.example.ini document every key the loaders accept, each
with the default they really use, and both load as they are."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bridge import run_cli

from imapsync_bridge.config import (
    AGENT_KEYS,
    SERVER_KEYS,
    load_agent_config,
    load_server_config,
)
from imapsync_bridge.errors import ConfigError
from imapsync_bridge.server.app import init_server

REPO = Path(__file__).resolve().parent.parent
AGENT_EXAMPLE = REPO / "config.example.ini"
SERVER_EXAMPLE = REPO / "server.example.ini"
NOTE = re.compile(r"\((?:default: (?P<default>[^)]*)|required[^)]*)\)$")


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    line: int  # index in the file's lines
    default: str | None  # None: required


def documented_keys(path: Path) -> list[Key]:
    """Each key line with the comment block right above it, which must end with
    "(default: X)" ("empty" for "") or "(required)"."""
    lines = path.read_text().splitlines()
    keys, section, comment = [], "", []
    for index, line in enumerate(lines):
        if line.startswith("#"):
            comment.append(line.lstrip("# "))
            continue
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
        elif key := re.match(r"(\w+) =", line):
            note = NOTE.search(" ".join(comment).strip())
            assert note, f"{path.name} [{section}] {key.group(1)}: no (default: X) or (required)"
            default = note.group("default")
            default = "" if default == "empty" else default
            keys.append(Key(section, key.group(1), index, default))
        comment = []
    return keys


def server_dir(tmp_path: Path) -> Path:
    """A data directory made by `server init`, its server.ini replaced by the example."""
    init_server(tmp_path / "server", "sync.example.com", sync_port=0)
    shutil.copy(SERVER_EXAMPLE, tmp_path / "server" / "server.ini")
    return tmp_path / "server"


@pytest.mark.parametrize(
    "example,known",
    [(AGENT_EXAMPLE, AGENT_KEYS), (SERVER_EXAMPLE, SERVER_KEYS)],
    ids=["agent", "server"],
)
def test_every_key_the_loader_accepts_is_in_the_example(
    example: Path, known: dict[str, frozenset[str]]
) -> None:
    found: dict[str, set[str]] = {}
    for key in documented_keys(example):
        assert key.name not in found.setdefault(key.section, set()), f"{key.name} twice"
        found[key.section].add(key.name)
    assert found == {section: set(keys) for section, keys in known.items()}


def test_both_examples_load_as_they_are(tmp_path: Path) -> None:
    agent = load_agent_config(AGENT_EXAMPLE)
    assert agent.server == ("sync.example.com", 4465)
    assert agent.smtp is not None and agent.smtp.security == "starttls"
    server = load_server_config(server_dir(tmp_path) / "server.ini")
    assert server.sync_listen == ("0.0.0.0", 4465)
    assert server.relay is not None and server.relay.port == 587


@pytest.mark.parametrize("which", ["agent", "server"])
def test_each_documented_default_is_the_loaders_default(which: str, tmp_path: Path) -> None:
    """Leaving a key out loads the same as writing its documented default; leaving out a
    required key is a one-line error naming it."""
    if which == "agent":
        example, load, ini = AGENT_EXAMPLE, load_agent_config, tmp_path / "agent.ini"
    else:
        example, load = SERVER_EXAMPLE, load_server_config
        ini = server_dir(tmp_path) / "server.ini"
    lines = example.read_text().splitlines()

    def loaded(text: list[str]) -> Any:
        ini.write_text("\n".join(text) + "\n")
        return load(ini)

    for key in documented_keys(example):
        without = lines[: key.line] + lines[key.line + 1 :]
        if key.default is None:
            with pytest.raises(ConfigError, match=rf"\[{key.section}\] {key.name} is required"):
                loaded(without)
            continue
        written = [*lines[: key.line], f"{key.name} = {key.default}", *lines[key.line + 1 :]]
        assert loaded(without) == loaded(written), f"[{key.section}] {key.name}"


def test_the_committed_picture_is_what_docs_parts_py_draws() -> None:
    """README's picture of the parts is generated: edit docs/parts.py, then re-run it."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import parts
    finally:
        sys.path.remove(str(REPO / "docs"))
    svg = (REPO / "docs" / "parts.svg").read_text(encoding="utf-8")
    assert svg == parts.draw(), "docs/parts.svg is stale: run python3 docs/parts.py"
    for part in ("Corporate IMAP server", "Corporate SMTP server", "Agent", "firewall",
                 "Hosted server", "Phone"):  # fmt: skip
        assert part in svg


def test_readme_documents_every_json_field(tmp_path: Path) -> None:
    """Each field `agent status --json` and `phone list --json` print is in README.md's
    field tables, so a new field cannot go undocumented."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ini = init_server(tmp_path / "server", "127.0.0.1", sync_port=0)
    code, _, err = run_cli("server", "add-user", "--config", str(ini), "alice",
                           "--address", "alice@phone.example", "--desktop-address",
                           "alice@corp.example")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli("phone", "--config", str(ini), "--user", "alice", "list", "--json")
    assert code == 0, err
    listing = json.loads(out)
    agent_ini = tmp_path / "agent.ini"
    agent_ini.write_text(
        "[agent]\nstate_dir = state\nserver = 127.0.0.1:4465\n[imap]\nhost = 127.0.0.1\n"
    )
    code, out, err = run_cli("agent", "status", "--config", str(agent_ini), "--json")
    assert code == 0, err
    status = json.loads(out)
    fields = set(listing) | set(status) | {"id", "message_id", "subject", "from", "date"}
    fields |= {"seen", "flagged", "to", "state", "reason"}  # of each message / outgoing entry
    missing = sorted(f for f in fields if f"| `{f}`" not in readme and f", `{f}`" not in readme)
    assert not missing, f"README.md does not document {missing}"
