"""The hosted server with its web listener, and a small real HTTPS client for it.

Shared by the web tests (``tests/test_web_*.py``): ``server init`` with every port 0,
users alice and bob with their phone passwords, ``server run`` in a thread
(:class:`bridge.ServerThread`), and :class:`WebClient`: ``http.client`` over TLS,
verifying the server's certificate against the CA of ``server init``, with a cookie jar
of its own and the login form's CSRF dance, as a browser does it.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import smtplib
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from bridge import ServerThread, run_cli
from test_submission import set_password

from imapsync_bridge.protocol import pki
from imapsync_bridge.server.app import init_server

PASSWORDS = {"alice": "Alice phone pass", "bob": "Bob phone pass"}
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def add_phone_users(ini: Path, window: int = 6, users: tuple[str, ...] = ("alice", "bob")) -> None:
    for user in users:
        rc, _out, err = run_cli(
            "server", "add-user", "--config", str(ini), user, "--address",
            f"{user}@phone.example", "--desktop-address", f"{user}@corp.example",
            "--window", str(window),
        )  # fmt: skip
        assert rc == 0, err
        set_password(ini, user, PASSWORDS[user])


def new_server_dir(root: Path, relay_port: int | None = None) -> Path:
    ini = init_server(
        root / "server", "127.0.0.1", sync_port=0, smtp_port=0, submission_port=0, web_port=0
    )
    if relay_port is not None:
        text = ini.read_text().replace("port = 25\n", f"port = {relay_port}\n")
        ini.write_text(text.replace("host = localhost", "host = 127.0.0.1"))
    return ini


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class WebClient:
    """A real HTTPS client of the web listener, with its own cookies."""

    port: int
    ca: Path
    source: str = "127.0.0.1"
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        basic: tuple[str, str] | None = None,
    ) -> Answer:
        context = ssl.create_default_context(cafile=str(self.ca))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=context, timeout=15, source_address=(self.source, 0)
        )
        sent = dict(headers or {})
        if isinstance(body, dict):
            body, sent["Content-Type"] = json.dumps(body), "application/json"
        if basic is not None:
            token = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            sent["Authorization"] = f"Basic {token}"
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            answer = Answer(response.status, response.headers, response.read())
        finally:
            conn.close()
        for line in answer.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(line).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return answer

    def form(self, path: str, fields: dict[str, str]) -> Answer:
        return self.request(
            "POST", path, urllib.parse.urlencode(fields),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip

    def csrf(self, path: str) -> str:
        """The CSRF token of the form on the page at ``path``."""
        page = self.request("GET", path)
        assert page.status in (200, 401, 429), page.status
        found = _CSRF.search(page.text)
        assert found, page.text
        return found.group(1)

    def login(self, user: str = "alice", password: str | None = None) -> Answer:
        token = self.csrf("/login")
        return self.form(
            "/login",
            {"csrf": token, "user": user, "password": password or PASSWORDS[user]},
        )


@dataclass
class WebHosted:
    ini: Path
    thread: ServerThread

    @property
    def port(self) -> int:
        return self.thread.ports["web"]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.ini.parent / pki.CA_CRT

    def client(self, source: str = "127.0.0.1") -> WebClient:
        return WebClient(self.port, self.ca, source)

    def deliver(self, n: int, to: str = "alice@phone.example", **parts: str) -> str:
        """Mail message n to the phone through SMTP in; its Message-ID."""
        mid = f"<web{n}.{time.monotonic_ns()}@example.net>"
        headers = {
            "From": parts.get("sender", "Carol <carol@example.net>"),
            "To": to,
            "Subject": parts.get("subject", f"inbound {n}"),
            "Message-ID": mid,
            "Date": "Mon, 02 Dec 2024 10:00:00 +0000",
            "MIME-Version": "1.0",
            "Content-Type": parts.get("content_type", "text/plain; charset=utf-8"),
        }
        if "reply_to" in parts:
            headers["Reply-To"] = parts["reply_to"]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        text = head + "\r\n" + parts.get("body", f"hello {n}\r\n")
        raw = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        with smtplib.SMTP("127.0.0.1", self.thread.ports["smtp"], timeout=10) as client:
            assert client.sendmail("carol@example.net", [to], raw) == {}
        return mid


@contextmanager
def running_server(
    root: Path, relay_port: int | None = None, users: tuple[str, ...] = ("alice", "bob")
) -> Iterator[WebHosted]:
    """``server init`` in *root* with the phone *users*, ``server run`` in a thread for
    the time of the block (the web tests' ``hosted`` fixtures)."""
    ini = new_server_dir(root, relay_port)
    add_phone_users(ini, users=users)
    thread = ServerThread(ini).start()
    try:
        yield WebHosted(ini, thread)
    finally:
        thread.stop()
