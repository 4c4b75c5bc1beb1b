"""`make demo` runs in CI: scripts/demo.py, run the way the Makefile runs it, must walk the
whole story, print both inboxes after every step, exit 0 within a minute and leave nothing
behind — also when it is stopped half-way."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(REPO / "scripts" / "demo.py")]  # $(PY) scripts/demo.py
HEADER = re.compile(r"^\s+slot\s+desktop INBOX\s+read flag\s+phone inbox\s+read flag\s+mapped$")


def left_behind(output: str) -> list[str]:
    """The demo's temp directories still on disk, or named by a running process."""
    where = re.search(r"^demo workspace: (\S+) \(Dovecot in (\S+)\)$", output, flags=re.M)
    assert where, output  # it says where it works
    roots = list(where.groups())
    found = [root for root in roots if Path(root).exists()]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        found += [f"{cmdline.parent.name}: {root}" for root in roots if root in text]
    return found


def tables(output: str) -> list[list[str]]:
    """Each printed side-by-side table, as its rows (header left out)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if HEADER.match(line)]
    found = []
    for start in starts:
        rows = []
        for line in lines[start + 1 :]:
            if line.startswith("  desktop Trash:"):
                break
            rows.append(line.split())
        found.append(rows)
    return found


def test_make_demo_walks_the_story_and_exits_0() -> None:
    started = time.monotonic()
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 60
    out = done.stdout
    chapters = re.findall(r"^== \d\. (.*)$", out, flags=re.M)
    assert len(chapters) == 7 and "trigger" not in chapters[0]
    assert out.count("✓ invariants hold") == 7
    assert "demo complete" in out
    shown = tables(out)
    assert len(shown) >= 9  # one after each step, and before the syncs of steps 5 and 6
    first = shown[0]
    assert [row[:3] for row in first[:7]] == [
        ["1", "Message", "15"], ["2", "Message", "14"], ["3", "Message", "13"],
        ["4", "Message", "12"], ["5", "Message", "11"], ["6", "Message", "10"],
        ["-", "Message", "9"],
    ]  # fmt: skip
    assert all(row[-1] == "yes" for row in first[:6]) and first[6][-1] == "no"
    # step 2: the desktop read 15 (read on the phone too) and deleted 13
    assert shown[1][0] == ["1", "Message", "15", "yes", "-", "Message", "15", "yes", "-", "yes"]
    assert "desktop Trash: Message 13   phone trash: Message 13" in out
    # step 5: inbound mail on the phone at once, on the desktop after the sync
    assert ["1", "Lunch", "at", "noon?", "-", "-", "no"] in shown[4]
    assert ["1", "Lunch", "at", "noon?", "-", "-", "Lunch", "at", "noon?", "-", "-", "yes"] in (
        shown[5]
    )
    assert "trigger mail UID" not in out  # the agent's log stays out of the story
    assert "corporate SMTP got it from" in out
    assert left_behind(out) == []


def test_a_stopped_demo_leaves_nothing_running() -> None:
    demo = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    seen = []
    for line in demo.stdout:
        seen.append(line)
        if line.startswith("== 2."):
            break
    demo.send_signal(signal.SIGTERM)
    out, err = demo.communicate(timeout=30)
    output = "".join(seen) + out
    assert demo.returncode == 130, output + err
    assert "demo interrupted (SIGTERM); everything it started is stopped" in err
    assert "== 3." not in output and "demo complete" not in output  # it stopped there
    assert left_behind(output) == []
