"""The phone's web page and JSON API (issue 10): how fast `server run` answers them.

A real `server run` process with only its web listener on, a phone user whose window
holds 500 messages (stored through the store's inbound path, as SMTP in stores them),
and aiohttp clients over HTTPS (the server's certificate checked against its CA) with a
logged-in session cookie, the page's way in; the Basic-auth way pays one scrypt
derivation (~tens of ms) per request on purpose and is not what a page does.

- p50 / p99 of ``GET /inbox`` (the rendered page) and ``GET /api/mailbox`` (the JSON
  document), one request at a time;
- requests per second with 50 concurrent clients for each, on this machine's 2 cores
  (the clients run in this process and take their share of them).

``python bench/web.py`` prints the figures; ``bench.py`` adds them to its report.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from processes import REPO, cli, free_port, python_env, stop_process, wait_for_port

sys.path.insert(0, str(REPO))

from imapsync_bridge.protocol import pki  # noqa: E402
from imapsync_bridge.server.credentials import set_password  # noqa: E402
from imapsync_bridge.server.smtp_in import message_identity  # noqa: E402
from imapsync_bridge.server.store import PhoneStore  # noqa: E402

WEB_HEADING = (
    "\n## The phone's web page and API (issue 10)\n\nThe real `server run` with its web"
    " listener on loopback (`bench/web.py`), a phone window of 500 messages, HTTPS with a"
    " logged-in session: one request at a time for the latencies, then 50 concurrent"
    " aiohttp clients (in the bench process, sharing the 2 cores) for the rate.\n\n"
)
WINDOW = 500
USER = "alice"
PASSWORD = "bench phone password"
SEQUENTIAL = 200
CONCURRENT = 50
SECONDS = 5.0
PATHS = ("/inbox", "/api/mailbox")


def _server(root: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    """server init, a user with WINDOW messages and a password, `server run`."""
    web_port = free_port()
    cli("server", "init", "--data-dir", str(root / "server"), "--hostname", "127.0.0.1",
        "--sync-port", str(free_port()))  # fmt: skip
    ini = root / "server" / "server.ini"
    text = ini.read_text()
    for key, value in {"smtp_listen": "", "submission_listen": "",
                       "web_listen": f"127.0.0.1:{web_port}"}.items():  # fmt: skip
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    ini.write_text(text)
    cli("server", "add-user", "--config", str(ini), USER, "--address", "alice@phone.example",
        "--desktop-address", "alice@corp.example", "--window", str(WINDOW))  # fmt: skip
    with PhoneStore(root / "server" / "phone.sqlite3") as store:
        set_password(store, USER, PASSWORD)
        for n in range(WINDOW):
            raw = (
                f"From: Sender {n} <sender{n}@example.net>\r\nTo: alice@phone.example\r\n"
                f"Subject: message number {n} of the window\r\n"
                f"Message-ID: <web{n}@bench.example>\r\n\r\nbody {n}\r\n"
            ).encode()
            key, message_id = message_identity(raw)
            store.deliver(USER, key, message_id, raw)
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config", str(ini)],
        env=python_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(web_port, process, "the web listener")
    return process, root / "server" / pki.CA_CRT, web_port


async def _session(base: str, ca: Path) -> aiohttp.ClientSession:
    """A logged-in client (the login form's CSRF token, then the session cookie)."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)), limit=0)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies from an IP address (loopback)
    session = aiohttp.ClientSession(base, connector=connector, cookie_jar=jar)
    async with session.get("/login") as page:
        token = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert token is not None
    form = {"csrf": token.group(1), "user": USER, "password": PASSWORD}
    async with session.post("/login", data=form, allow_redirects=False) as answer:
        if answer.status != 303:
            raise RuntimeError(f"login failed: {answer.status}")
    return session


async def _latencies(session: aiohttp.ClientSession, path: str) -> tuple[list[float], int]:
    """SEQUENTIAL requests one at a time: their times, sorted, and the answer's size."""
    times, size = [], 0
    for _ in range(SEQUENTIAL):
        started = time.perf_counter()
        async with session.get(path) as answer:
            size = len(await answer.read())
            assert answer.status == 200, answer.status
        times.append(time.perf_counter() - started)
    return sorted(times), size


async def _rate(session: aiohttp.ClientSession, path: str) -> float:
    """Requests per second from CONCURRENT clients asking in a loop for SECONDS."""
    done = 0
    stop = time.perf_counter() + SECONDS

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with session.get(path) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENT)))
    return done / (time.perf_counter() - started)


async def _measure(base: str, ca: Path) -> dict[str, dict[str, float]]:
    session = await _session(base, ca)
    figures: dict[str, dict[str, float]] = {}
    try:
        for path in PATHS:
            times, size = await _latencies(session, path)
            figures[path] = {
                "bytes": float(size),
                "p50_ms": statistics.median(times) * 1000,
                "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
                "per_s": await _rate(session, path),
            }
    finally:
        await session.close()
    return figures


def web_figures() -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        process, ca, port = _server(Path(tmp))
        try:
            return asyncio.run(_measure(f"https://127.0.0.1:{port}", ca))
        finally:
            stop_process(process)


def report(figures: dict[str, dict[str, float]]) -> str:
    rows = ["| request (500-slot window) | size | p50 | p99 | 50 concurrent clients |",
            "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for path, f in figures.items():
        rows.append(
            f"| `GET {path}` | {f['bytes'] / 1024:.0f} KiB | {f['p50_ms']:.1f} ms "
            f"| {f['p99_ms']:.1f} ms | {f['per_s']:.0f} requests/s |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(report(web_figures()))
