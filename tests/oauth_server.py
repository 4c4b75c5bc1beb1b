"""A local OAuth2 authorization server for the OAuth2 tests, on loopback (plain HTTP).

Endpoints (form-encoded POSTs, JSON answers, as RFC 6749, 7662 and 8628 say):

``/device``      device authorization: device_code, user_code, verification_uri, interval
``/authorize``   (GET) the browser sign-in: checks the client, a loopback redirect_uri and
                 an S256 code_challenge, signs in as ``login_hint`` (or ``username``)
                 and redirects there with a one-use code and the ``state`` echoed
``/token``       the authorization_code grant (the client secret, redirect_uri and
                 PKCE verifier checked; a code is burnt by its first use), the
                 device_code grant (authorization_pending until approved) and the
                 refresh_token grant, which *rotates*: every refresh issues a new refresh
                 token and the old one is dead (reusing it is ``invalid_grant``)
``/introspect``  token introspection, which the test Dovecot calls: ``active`` and
                 ``username`` for a valid, unexpired access token
``/approve``     what the user does on the verification page: ``user_code`` + ``username``
                 (:meth:`AuthorizationServer.deny` declines instead)
``/revoke``      an administrator revoking a user's sessions: their refresh tokens die;
                 access tokens already issued live until they expire (as with Entra)

Access tokens are real HS256 JWTs (joserfc) signed with a key made at start, lasting
``access_ttl`` seconds. :meth:`AuthorizationServer.user_of` checks one in-process (the
test SMTP server uses it), :attr:`log` records every token request (grant type, outcome).

:func:`start_browser_login` runs ``agent login`` with ``oauth2_flow = browser`` as a
process, and :func:`redirect_of` is what a browser does with its address.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

CLIENT_ID = "imapsync-bridge-test"
CLIENT_SECRET = "installed-app-secret-GOCSPX-test"  # as Google's Desktop clients have one
SCOPES = "mail.imap mail.smtp offline_access"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Device:
    user_code: str
    expires: float
    username: str | None = None  # set on approval
    denied: bool = False  # the user said no


@dataclass
class _Code:
    username: str
    redirect_uri: str
    challenge: str
    expires: float


def s256(verifier: str) -> str:
    """RFC 7636's S256 code challenge of *verifier*."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class AuthorizationServer:
    access_ttl: float = 3600.0
    interval: int = 1
    require_secret: bool = False  # refreshes need the client secret too (as at Google)
    devices: dict[str, _Device] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)  # authorization codes
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # live token -> username
    log: list[tuple[str, str]] = field(default_factory=list)  # (grant type, outcome)
    issued: list[str] = field(default_factory=list)  # every token given out (leak checks)
    _key: OctKey = field(default_factory=lambda: OctKey.import_key(secrets.token_bytes(32)))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _http: ThreadingHTTPServer | None = None

    # -- what tests call ---------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def ini_lines(self, flow: str = "device") -> list[str]:
        """The [imap] / [smtp] keys of an agent that signs in here (*flow*: ``device``,
        or ``browser`` with the installed app's client secret)."""
        lines = [
            "auth = oauth2", "oauth2_provider = generic", f"client_id = {CLIENT_ID}",
            f"device_authorization_endpoint = {self.url}/device",
            f"token_endpoint = {self.url}/token", f"scopes = {SCOPES}",
        ]  # fmt: skip
        if flow == "browser":
            lines += ["oauth2_flow = browser", f"client_secret = {CLIENT_SECRET}",
                      f"authorization_endpoint = {self.url}/authorize"]  # fmt: skip
        return lines

    def user_of(self, token: str) -> str | None:
        """The user a valid, unexpired access token was issued to; None otherwise."""
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"]).claims
            jwt.JWTClaimsRegistry(exp={"essential": True}).validate(claims)
        except (JoseError, ValueError):
            return None
        return str(claims["sub"])

    def refreshes(self, outcome: str = "ok") -> int:
        with self._lock:
            return sum(1 for grant, result in self.log if grant == "refresh" and result == outcome)

    def revoke(self, username: str) -> None:
        with self._lock:
            for token in [t for t, u in self.refresh_tokens.items() if u == username]:
                del self.refresh_tokens[token]

    def deny(self) -> bool:
        """The user declines every pending sign-in; whether there was one."""
        with self._lock:
            for device in self.devices.values():
                device.denied = True
            return bool(self.devices)

    def approve(self, user_code: str, username: str) -> bool:
        with self._lock:
            for device in self.devices.values():
                if device.user_code == user_code and device.expires > time.time():
                    device.username = username
                    return True
        return False

    # -- the endpoints -----------------------------------------------------------------
    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """The browser's GET of /authorize: (302, where to) after the user "signs in",
        or (400, why) for a request that may not be redirected anywhere."""
        redirect = query.get("redirect_uri", "")
        where = urllib.parse.urlsplit(redirect)
        if query.get("client_id") != CLIENT_ID:
            return 400, "unknown client_id"
        if where.scheme != "http" or where.hostname != "127.0.0.1" or not where.port:
            return 400, "redirect_uri must be a loopback address (RFC 8252)"
        answer = {"state": query.get("state", "")}
        user = query.get("username") or query.get("login_hint")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            answer["error"] = "invalid_request"
            answer["error_description"] = "PKCE with S256 is required"
        elif query.get("response_type") != "code" or not user:
            answer["error"] = "invalid_request"
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self.codes[code] = _Code(user, redirect, query["code_challenge"], time.time() + 60)
            answer["code"] = code
        return 302, f"{redirect}?{urllib.parse.urlencode(answer)}"

    def _access_token(self, username: str) -> dict[str, Any]:
        now = int(time.time())
        claims = {"sub": username, "iat": now, "exp": now + int(self.access_ttl),
                  "jti": secrets.token_hex(8), "client_id": CLIENT_ID}  # fmt: skip
        refresh = secrets.token_urlsafe(32)
        access = jwt.encode({"alg": "HS256"}, claims, self._key)
        self.refresh_tokens[refresh] = username
        self.issued += [access, refresh]
        return {
            "token_type": "Bearer", "access_token": access,
            "expires_in": int(self.access_ttl), "refresh_token": refresh, "scope": SCOPES,
        }  # fmt: skip

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if path == "/device":
                if form.get("client_id") != CLIENT_ID:
                    return 400, {"error": "invalid_client"}
                code = secrets.token_urlsafe(24)
                user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
                self.devices[code] = _Device(user_code, time.time() + 600)
                return 200, {
                    "device_code": code, "user_code": user_code,
                    "verification_uri": f"{self.url}/verify",
                    "verification_uri_complete": f"{self.url}/verify?user_code={user_code}",
                    "expires_in": 600, "interval": self.interval,
                }  # fmt: skip
            if path == "/token":
                return self._token(form)
            if path == "/introspect":
                user = self.user_of(form.get("token", ""))
                return 200, {"active": True, "username": user} if user else {"active": False}
        if path == "/approve":
            found = self.approve(form.get("user_code", ""), form.get("username", ""))
            return (200, {"approved": True}) if found else (404, {"error": "no such code"})
        if path == "/revoke":
            self.revoke(form.get("username", ""))
            return 200, {"revoked": True}
        return 404, {"error": "not found"}

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        if form.get("client_secret", CLIENT_SECRET) != CLIENT_SECRET:
            return 401, {"error": "invalid_client"}
        if grant == "authorization_code":
            return self._code_grant(form)
        if grant == DEVICE_GRANT:
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.expires < time.time():
                self.log.append(("device", "expired_token"))
                return 400, {"error": "expired_token"}
            if device.denied:
                return 400, {"error": "access_denied"}
            if device.username is None:
                return 400, {"error": "authorization_pending"}
            del self.devices[form["device_code"]]
            self.log.append(("device", "ok"))
            return 200, self._access_token(device.username)
        if grant == "refresh_token":
            if self.require_secret and "client_secret" not in form:
                self.log.append(("refresh", "invalid_client"))
                return 401, {"error": "invalid_client", "error_description": "no client secret"}
            username = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if username is None:
                self.log.append(("refresh", "invalid_grant"))
                why = "the refresh token expired or was revoked"
                return 400, {"error": "invalid_grant", "error_description": why}
            self.log.append(("refresh", "ok"))
            return 200, self._access_token(username)
        return 400, {"error": "unsupported_grant_type"}

    def _code_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        code = self.codes.pop(form.get("code", ""), None)  # one use, even a failed one
        why = ""
        if form.get("client_secret") != CLIENT_SECRET:
            self.log.append(("authorization_code", "invalid_client"))
            return 401, {"error": "invalid_client", "error_description": "no client secret"}
        if code is None or code.expires < time.time():
            why = "the code is unknown, used or expired"
        elif form.get("redirect_uri") != code.redirect_uri:
            why = "redirect_uri differs from the authorization request's"
        elif s256(form.get("code_verifier", "")) != code.challenge:
            why = "the PKCE code_verifier does not match the code_challenge"
        if code is None or why:
            self.log.append(("authorization_code", "invalid_grant"))
            return 400, {"error": "invalid_grant", "error_description": why}
        self.log.append(("authorization_code", "ok"))
        return 200, self._access_token(code.username)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> AuthorizationServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urllib.parse.urlsplit(self.path)
                status, text = 404, "not found"
                if url.path == "/authorize":
                    status, text = server.authorize(dict(urllib.parse.parse_qsl(url.query)))
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", text)
                self.send_header("Content-Length", str(len(text.encode())))
                self.end_headers()
                self.wfile.write(text.encode())

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size).decode()
                form = dict(urllib.parse.parse_qsl(body))
                status, answer = server.handle(self.path.split("?")[0], form)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> AuthorizationServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_browser_login(ini: Path, *options: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`agent login` (browser flow) as a process on a headless machine (no DISPLAY or
    WAYLAND_DISPLAY unless *env* gives one), stdin a pipe for a pasted address; returns
    it and the authorization address it printed (:func:`finish` ends it)."""
    repo = Path(__file__).resolve().parent.parent
    headless = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imapsync_bridge.cli", "agent", "login", "--config", str(ini),
         "imap", *options],
        env={**headless, "PYTHONPATH": str(repo), **env}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    shown = []
    for line in proc.stdout:
        shown.append(line)
        if line.startswith("http"):
            return proc, line.strip()
    raise AssertionError("no authorization address: " + "".join(shown) + proc.communicate()[1])


def finish(proc: subprocess.Popen[str], pasted: str = "") -> tuple[str, str]:
    """Paste *pasted* on the `agent login` of :func:`start_browser_login`, close its
    stdin and wait for it; its stdout (all of it: also what the reading of the address
    left in the pipe's buffer) and stderr."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(pasted)
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.stdout.read(), proc.stderr.read()


def redirect_of(address: str) -> str:
    """Where the authorization endpoint sends the browser (not followed): the Location."""
    url = urllib.parse.urlsplit(address)
    connection = HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.request("GET", f"{url.path}?{url.query}")
        answer = connection.getresponse()
        assert answer.status == 302, (answer.status, answer.read())
        return answer.headers["Location"]
    finally:
        connection.close()


def fake_browser(directory: Path) -> tuple[Path, Path]:
    """An executable for $BROWSER that does what a browser does with an address (GET it,
    follow the redirect to the loopback listener) and writes the address to a record
    file; returns (the executable, the record file)."""
    script, record = directory / "browser", directory / "browser-opened"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, urllib.request\n"
        f"open({str(record)!r}, 'w').write(sys.argv[1])\n"
        "urllib.request.urlopen(sys.argv[1], timeout=30).read()\n"
    )
    script.chmod(0o700)
    return script, record
