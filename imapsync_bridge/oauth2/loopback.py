"""The installed-app sign-in (RFC 8252): authorization code with PKCE (RFC 7636, S256)
and a loopback redirect, for providers whose device flow will not grant the mail scope
(Google's device flow has a short scope allow-list without ``https://mail.google.com/``).

``agent login`` listens on 127.0.0.1 on a free port and prints the authorization
address; on a desktop (a graphical session) it also opens it in the browser. On a
headless machine it opens nothing: Python's ``webbrowser`` would fall back to a console
browser in this very terminal. It then takes whichever comes first: the browser's
redirect to the listener, or the address the browser ended on pasted on stdin, for a
browser on another machine (as rclone's and gcloud's ``--no-browser`` do). ``state``
must match (CSRF) and the token endpoint checks the PKCE verifier; a failure of either
is one line, and nothing is stored.
"""

from __future__ import annotations

import contextlib
import html
import os
import queue
import secrets
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.requests_client import OAuthError as _OAuthError

from imapsync_bridge.config import MailServer
from imapsync_bridge.errors import AuthError, TransientError
from imapsync_bridge.oauth2 import tokens
from imapsync_bridge.oauth2.providers import Endpoints, endpoints

LOGIN_TIMEOUT = 600.0  # as long as a device code lives at Microsoft and Google
PAGE_TIMEOUT = tokens.HTTP_TIMEOUT + 5  # the browser waits this long for the outcome
PAGE_WRITE_TIMEOUT = 5.0  # the outcome page is written to the browser within this


@dataclass
class Redirect:
    """Where the browser was sent back to: by the listener, or pasted by the user."""

    params: dict[str, str]
    page: queue.Queue[tuple[int, str]] | None = field(default=None, repr=False)
    shown: threading.Event = field(default_factory=threading.Event, repr=False)

    def answer(self, status: int, text: str) -> None:
        """What the browser shows (nothing for a pasted address). Returns once the page
        is written, so the process ending right after cannot cut it off mid-way."""
        if self.page is not None:
            self.page.put((status, text))
            self.shown.wait(PAGE_WRITE_TIMEOUT)


def browser_login(
    server: MailServer,
    show: Callable[[str], None],
    pasted: TextIO | None = None,
    timeout: float = LOGIN_TIMEOUT,
    open_browser: bool = True,
) -> str:
    """Sign *server*'s account in through a browser; says where the grant was stored."""
    settings = tokens.settings_of(server)
    ends = endpoints(settings, server.role)
    arrivals: queue.Queue[Redirect] = queue.Queue()
    listener = _listen(arrivals)
    redirect_uri = f"http://127.0.0.1:{listener.server_address[1]}/"
    verifier = generate_token(64)  # RFC 7636: 43 to 128 characters
    try:
        options = {"redirect_uri": redirect_uri, "code_challenge_method": "S256"}
        with tokens.client(settings, ends, **options) as session:
            address, state = session.create_authorization_url(
                ends.authorization, code_verifier=verifier, login_hint=server.username,
                **dict(ends.authorize_params),
            )  # fmt: skip
            show(f"To sign in to {server.role.upper()} as {server.username}, open this address:")
            show(address)
            show(
                f"The browser then returns to {redirect_uri} on this machine. If it runs on "
                f"another machine, it ends on an address starting with {redirect_uri} that "
                "does not load: paste that whole address here and press Enter."
            )
            if open_browser and has_desktop():
                show("(opening it in your browser)")
                threading.Thread(target=_open, args=(address,), daemon=True).start()
            _read_pasted(sys.stdin if pasted is None else pasted, arrivals, show)
            redirect = _wait(arrivals, server.role, timeout)
            page = (500, "The sign-in failed: the terminal says why.")
            try:
                token = _exchange(session, ends, redirect.params, state, verifier, server.role)
                where = tokens.keep(server, token)
                page = (200, "Signed in: you can close this tab and go back to the terminal.")
            except (AuthError, TransientError) as exc:
                page = (400, f"The sign-in failed: {exc}")
                raise
            finally:
                redirect.answer(*page)  # only once the grant is stored, or it failed
    finally:
        listener.shutdown()
        listener.server_close()
    return where


def has_desktop() -> bool:
    """Whether a browser can open beside this terminal: macOS, Windows, or a Linux/BSD
    session with a display (an SSH login to a server has none)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open(address: str) -> None:
    """In a thread of its own: some browsers return only when they are closed."""
    import webbrowser

    with contextlib.suppress(webbrowser.Error, OSError):
        webbrowser.open(address)


def parse_redirect(text: str) -> dict[str, str] | None:
    """The parameters of a redirected address (or of just its ``?query``); None when it
    carries neither ``code`` nor ``error``: not the address the browser ended on."""
    text = text.strip()
    query = urllib.parse.urlsplit(text).query if "://" in text else text.lstrip("?")
    params = dict(urllib.parse.parse_qsl(query))
    return params if "code" in params or "error" in params else None


def _exchange(
    session: OAuth2Session,
    ends: Endpoints,
    params: dict[str, str],
    state: str,
    verifier: str,
    role: str,
) -> dict[str, Any]:
    """The token for a redirect's code, once its state is this sign-in's."""
    if "error" in params:
        if params["error"] == "access_denied":
            raise AuthError(f"[{role}] the sign-in was declined")
        detail = " ".join(params.get("error_description", "").split())[:200]
        raise AuthError(f"[{role}] sign-in refused: {params['error']} {detail}".rstrip())
    if not secrets.compare_digest(params.get("state", "").encode(), state.encode()):
        raise AuthError(
            f"[{role}] the redirected address is not from this sign-in (its state does not "
            "match: an old or forged address); nothing stored, run `agent login` again"
        )
    try:
        token: dict[str, Any] = session.fetch_token(
            ends.token, grant_type="authorization_code", code=params["code"],
            code_verifier=verifier, timeout=tokens.HTTP_TIMEOUT,
        )  # fmt: skip
    except _OAuthError as exc:
        raise AuthError(f"[{role}] sign-in refused: {tokens.describe(exc)}") from None
    except requests.RequestException as exc:
        raise TransientError(
            f"[{role}] cannot reach the token endpoint {ends.token}: {type(exc).__name__}"
        ) from None
    return token


def _wait(arrivals: queue.Queue[Redirect], role: str, timeout: float) -> Redirect:
    try:
        return arrivals.get(timeout=timeout)
    except queue.Empty:
        raise AuthError(
            f"[{role}] no sign-in came back within {timeout / 60:.0f} minutes; "
            "run `agent login` again"
        ) from None


def _read_pasted(
    lines: TextIO, arrivals: queue.Queue[Redirect], show: Callable[[str], None]
) -> None:
    """Hands the first pasted redirected address to :func:`browser_login`; stdin at its
    end (a service, ``< /dev/null``) leaves only the browser's way."""

    def read() -> None:
        for line in lines:
            if not line.strip():
                continue
            params = parse_redirect(line)
            if params is not None:
                arrivals.put(Redirect(params))
                return
            show("That is not the address the browser ended on (it has no code=): paste it whole.")

    threading.Thread(target=read, name="oauth2-paste", daemon=True).start()


def _listen(arrivals: queue.Queue[Redirect]) -> ThreadingHTTPServer:
    """The loopback listener: a GET of ``/`` with ``code`` or ``error`` is the redirect;
    anything else (a favicon) is a 404. The browser's page says how the sign-in went."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            params = parse_redirect(url.query) if url.path == "/" else None
            if params is None:
                self._page(404, "This is not the sign-in's redirect.")
                return
            page: queue.Queue[tuple[int, str]] = queue.Queue(maxsize=1)
            redirect = Redirect(params, page)
            arrivals.put(redirect)
            try:
                status, text = page.get(timeout=PAGE_TIMEOUT)
            except queue.Empty:
                status, text = 409, "Another answer already completed this sign-in."
            try:
                self._page(status, text)
            finally:
                redirect.shown.set()

        def _page(self, status: int, text: str) -> None:
            body = (
                "<!doctype html><meta charset=utf-8><title>imapsync-bridge sign-in</title>"
                f"<p>{html.escape(text)}</p>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the request line holds the code: never logged

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, name="oauth2-loopback", daemon=True).start()
    return server
