"""The JSON API of the phone's mail application (issue 10), over real HTTPS.

The hosted server runs with its web listener on a free port; an aiosmtpd relay takes
send-now mail; the client is ``http.client`` verifying the server's certificate.
"""

from __future__ import annotations

import html
import http.client
import json
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.web import RouteDef
from bridge import REPO, ServerThread, run_cli
from smtp_servers import MailServer
from test_smtp_in import set_options
from web_hosted import PASSWORDS, WebHosted, add_phone_users, new_server_dir, running_server

from imapsync_bridge.protocol import pki
from imapsync_bridge.server.web import api, pages
from imapsync_bridge.server.web.pages import MAX_STREAMS_PER_USER
from imapsync_bridge.server.web.security import ID

ALICE = ("alice", PASSWORDS["alice"])
BOB = ("bob", PASSWORDS["bob"])


@pytest.fixture
def relay() -> Iterator[MailServer]:
    server = MailServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hosted(tmp_path: Path, relay: MailServer) -> Iterator[WebHosted]:
    with running_server(tmp_path, relay.port) as server:
        yield server


def test_nothing_without_credentials_and_wrong_ones_are_401(hosted: WebHosted) -> None:
    client = hosted.client()
    for method, path in [("GET", "/api/mailbox"), ("GET", "/api/messages/1"),
                         ("GET", "/api/status"), ("POST", "/api/sync"),
                         ("POST", "/api/messages/1/delete"), ("POST", "/api/compose")]:  # fmt: skip
        answer = client.request(method, path)
        assert answer.status == 401, (method, path)
        assert answer.json() == {"error": "log in first"}
        assert answer.headers["WWW-Authenticate"].startswith("Basic")
    wrong = client.request("GET", "/api/mailbox", basic=("alice", "not it"))
    assert (wrong.status, wrong.json()) == (401, {"error": "wrong user name or password"})
    assert (
        client.request("GET", "/api/mailbox", headers={"Authorization": "Basic !!"}).status == 401
    )
    for page in ("/inbox", "/trash", "/outbox", "/messages/1", "/compose", "/inbox/list"):
        answer = client.request("GET", page)
        assert (answer.status, answer.headers["Location"]) == (303, "/login"), page


def test_mailbox_message_and_changes_are_the_phone_clis_documents(hosted: WebHosted) -> None:
    mid = hosted.deliver(1, subject="Hello <b>there</b>", body="Line one\r\nLine two\r\n")
    client = hosted.client()
    mailbox = client.request("GET", "/api/mailbox", basic=ALICE)
    assert mailbox.status == 200 and mailbox.headers["Content-Type"].startswith("application/json")
    rc, out, err = run_cli(
        "phone", "--config", str(hosted.ini), "--user", "alice", "list", "--json"
    )
    assert rc == 0, err
    assert mailbox.json() == json.loads(out)
    (item,) = mailbox.json()["inbox"]
    assert (item["message_id"], item["subject"], item["seen"]) == (mid, "Hello <b>there</b>", False)
    detail = client.request("GET", f"/api/messages/{item['id']}", basic=ALICE).json()
    assert detail["text"] == "Line one\nLine two\n" and detail["to"] == ["alice@phone.example"]
    assert detail["attachments"] == [] and detail["seen"] is False  # reading the API marks nothing

    url = f"/api/messages/{item['id']}"
    assert client.request("POST", f"{url}/read", basic=ALICE).json()["seen"] is True
    assert client.request("POST", f"{url}/flag", basic=ALICE).json()["flagged"] is True
    assert client.request("POST", f"{url}/delete", basic=ALICE).status == 200
    after = client.request("GET", "/api/mailbox", basic=ALICE).json()
    assert after["inbox"] == [] and [m["id"] for m in after["trash"]] == [item["id"]]
    assert client.request("POST", f"{url}/restore", basic=ALICE).json()["id"] == item["id"]
    assert client.request("POST", f"{url}/destroy", basic=ALICE).json() == {
        "id": item["id"],
        "destroyed": True,
    }
    assert client.request("GET", url, basic=ALICE).status == 404
    assert client.request("POST", f"{url}/explode", basic=ALICE).status == 404


def test_another_users_ids_are_404_like_unknown_ones(hosted: WebHosted) -> None:
    hosted.deliver(1)
    client = hosted.client()
    (item,) = client.request("GET", "/api/mailbox", basic=ALICE).json()["inbox"]
    for method, path in [("GET", f"/api/messages/{item['id']}"),
                         ("POST", f"/api/messages/{item['id']}/delete"),
                         ("GET", "/api/messages/999999")]:  # fmt: skip
        answer = client.request(method, path, basic=BOB)
        assert (answer.status, answer.json()) == (404, {"error": "no such message"}), path
    assert client.request("GET", "/api/mailbox", basic=ALICE).json()["inbox"] == [item]
    client.login("bob")
    assert client.request("GET", f"/messages/{item['id']}").status == 404


def test_compose_send_now_reaches_the_relay_and_via_desktop_waits(
    hosted: WebHosted, relay: MailServer
) -> None:
    client = hosted.client()
    body = {"to": ["carol@example.net"], "subject": "From the API", "body": "Hi Carol"}
    now = client.request("POST", "/api/compose", {**body, "via_desktop": False}, basic=ALICE)
    assert now.status == 201, now.text
    assert now.json()["state"] == "sent" and now.json()["to"] == ["carol@example.net"]
    (received,) = relay.received
    assert received.mail_from == "alice@phone.example" and b"Hi Carol" in received.raw
    later = client.request("POST", "/api/compose", {**body, "via_desktop": True}, basic=ALICE)
    assert (later.status, later.json()["state"]) == (201, "queued")
    outbox = client.request("GET", "/api/mailbox", basic=ALICE).json()["outbox"]
    assert [(m["subject"], m["state"]) for m in outbox] == [("From the API", "queued")]
    assert len(relay.received) == 1  # the desktop sends that one


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"to": "carol@example.net"}', b'{"to": []}',
     b'{"to": ["a@b"], "via_desktop": "yes"}', b'{"to": ["a@b"], "subject": 3}',
     b'{"to": ["a@b"], "in_reply_to": "x"}', b'{"to": ["a@b"], "in_reply_to": 424242}',
     b'{"to": ["a@b"], "in_reply_to": 100000000000000000000000}', b'{"to": [1]}'],
)  # fmt: skip
def test_a_malformed_compose_is_400_with_a_reason(hosted: WebHosted, body: bytes) -> None:
    answer = hosted.client().request("POST", "/api/compose", body, basic=ALICE)
    assert answer.status in (400, 404), answer.text
    assert set(answer.json()) == {"error"} and answer.json()["error"]
    assert hosted.client().request("GET", "/api/mailbox", basic=ALICE).json()["outbox"] == []


def test_session_cookie_writes_need_the_csrf_header(hosted: WebHosted) -> None:
    hosted.deliver(1)
    client = hosted.client()
    assert client.login().status == 303
    mailbox = client.request("GET", "/api/mailbox")
    assert mailbox.status == 200
    (item,) = mailbox.json()["inbox"]
    url = f"/api/messages/{item['id']}/flag"
    answer = client.request("POST", url)
    assert (answer.status, answer.json()) == (403, {"error": "missing or wrong CSRF token"})
    assert client.request("POST", url, headers={"X-CSRF-Token": "guess"}).status == 403
    token = client.csrf("/inbox")
    assert client.request("POST", url, headers={"X-CSRF-Token": token}).json()["flagged"]
    # the page's forms: without the token nothing changes either
    assert client.form(f"/messages/{item['id']}/delete", {}).status == 403
    assert client.form("/sync", {"csrf": "wrong"}).status == 403
    assert client.request("GET", "/api/mailbox").json()["inbox"][0]["id"] == item["id"]
    # logging out ends the session for the API too
    assert client.form("/logout", {"csrf": token}).status == 303
    assert client.request("GET", "/api/mailbox").status == 401


def test_session_cookie_is_secure_httponly_samesite(hosted: WebHosted) -> None:
    client = hosted.client()
    answer = client.login()
    assert (answer.status, answer.headers["Location"]) == (303, "/inbox")
    (cookie,) = [c for c in answer.headers.get_all("Set-Cookie") or [] if "session" in c]
    assert cookie.startswith("__Host-session=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    page = client.request("GET", "/inbox")
    assert page.status == 200
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    # a login form without its token is refused before the password is looked at
    assert hosted.client().form("/login", {"user": "alice", "password": "x"}).status == 403


def test_ten_bad_passwords_are_429_and_count_with_smtp_submission(hosted: WebHosted) -> None:
    client = hosted.client()
    for _ in range(9):
        assert client.request("GET", "/api/status", basic=("alice", "wrong")).status == 401
    # the tenth through the page's login form: the same throttle
    assert client.login("alice", "wrong").status == 401
    answer = client.request("GET", "/api/status", basic=ALICE)  # even the right password
    assert (answer.status, answer.json()) == (429, {"error": "too many failed logins, try later"})
    assert answer.headers["Retry-After"] == "300"  # at the latest: the lockout
    assert client.login("alice").status == 429
    context = ssl.create_default_context(cafile=str(hosted.ini.parent / pki.CA_CRT))
    with smtplib.SMTP("127.0.0.1", hosted.thread.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(*ALICE)
        assert refused.value.smtp_code == 454
    # bob, from another address, is not locked out by alice's streak
    assert hosted.client("127.0.0.2").request("GET", "/api/status", basic=BOB).status == 200


def test_status_and_sync_now(hosted: WebHosted) -> None:
    client = hosted.client()
    status = client.request("GET", "/api/status", basic=ALICE)
    assert status.json() == {
        "last_desktop_sync": None,
        "agent_connected": False,
        "pending_to_desktop": 0,
        "window": 6,
    }
    first = client.request("POST", "/api/sync", basic=ALICE)
    assert first.status == 202 and first.json()["requested_at"]
    again = client.request("POST", "/api/sync", basic=ALICE)  # presses merge into one request
    assert again.json() == first.json()


def test_web_cert_and_key_are_used_when_set(tmp_path: Path, hosted: WebHosted) -> None:
    other = new_server_dir(tmp_path / "other")  # another CA: stands in for certbot's
    ini = new_server_dir(tmp_path / "mine")
    set_options(ini, web_cert=other.parent / pki.SERVER_CRT, web_key=other.parent / pki.SERVER_KEY)
    add_phone_users(ini, users=("alice",))
    thread = ServerThread(ini).start()
    try:
        mine = WebHosted(ini, thread)
        client = mine.client()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.request("GET", "/api/status", basic=ALICE)  # not the server's own CA
        client.ca = other.parent / pki.CA_CRT
        assert client.request("GET", "/api/status", basic=ALICE).status == 200
    finally:
        thread.stop()
    set_options(ini, web_key="")
    rc, _out, err = run_cli("phone", "--config", str(ini), "--user", "alice", "list")
    assert rc == 2 and "web_cert and web_key go together" in err


def test_the_page_answers_odd_input_with_a_clear_page(hosted: WebHosted) -> None:
    client = hosted.client()
    client.login()
    huge = "9" * 30
    assert client.request("GET", f"/compose?reply={huge}").status == 200  # not an id: ignored
    missing = client.request("GET", "/compose?reply=424242")
    assert missing.status == 404 and "no such message" in missing.text
    assert missing.headers["Content-Type"].startswith("text/html")
    assert client.request("GET", f"/messages/{huge}").status == 404
    token = client.csrf("/compose")
    answer = client.form("/compose", {"csrf": token, "to": " , ", "subject": "s", "body": "b"})
    assert answer.status == 400 and "the message has no recipients" in answer.text
    assert 'value="s"' in answer.text  # the draft is kept
    assert client.request("GET", "/api/mailbox").json()["outbox"] == []


def test_the_compose_form_takes_names_with_commas(hosted: WebHosted, relay: MailServer) -> None:
    client = hosted.client()
    client.login()
    fields = {"csrf": client.csrf("/compose"), "subject": "names", "body": "b", "send": "now"}
    to = '"Doe, Jane" <jane@example.net>, bob@example.org'
    assert client.form("/compose", {**fields, "to": to}).status == 303
    (received,) = relay.received
    assert sorted(received.rcpt_tos) == ["bob@example.org", "jane@example.net"]
    assert b'To: "Doe, Jane" <jane@example.net>, bob@example.org' in received.raw


def test_the_event_stream_tells_of_new_mail_and_ends_with_the_server(hosted: WebHosted) -> None:
    client = hosted.client()
    client.login()
    mark = re.search(r'data-mark="(\w+)"', client.request("GET", "/inbox").text)
    assert mark is not None
    context = ssl.create_default_context(cafile=str(hosted.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", hosted.port, context=context, timeout=10)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    conn.request("GET", f"/events?since={mark.group(1)}", headers={"Cookie": cookie})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    hosted.deliver(1)
    assert stream.readline() == b"event: mailbox\n"  # within the 10 s timeout
    started = time.monotonic()
    hosted.thread.stop()  # an open stream does not hold up the server's stop
    assert time.monotonic() - started < 5
    conn.close()


def test_the_outbox_page_shows_a_refused_message_with_the_servers_reply(
    hosted: WebHosted, relay: MailServer
) -> None:
    relay.answer("rcpt", "550 5.1.1 <nobody@example.net>: no such user")
    client = hosted.client()
    client.login()
    fields = {"csrf": client.csrf("/compose"), "to": "nobody@example.net", "send": "now"}
    assert client.form("/compose", {**fields, "subject": "Bounces", "body": "b"}).status == 303
    page = client.request("GET", "/outbox").text
    assert 'class="state state-failed">failed</span>' in page
    assert "550 5.1.1 &lt;nobody@example.net&gt;: no such user" in page  # escaped
    (entry,) = client.request("GET", "/api/mailbox").json()["outbox"]
    assert (entry["subject"], entry["state"]) == ("Bounces", "failed")


def run_server(ini: Path) -> subprocess.CompletedProcess[str]:
    """`server run` as a process that is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "imapsync_bridge.cli", "server", "run", "--config", str(ini)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def test_a_bad_certificate_or_a_taken_port_is_one_line(tmp_path: Path) -> None:
    ini = new_server_dir(tmp_path)
    (ini.parent / "web.pem").write_text("not a certificate\n")
    set_options(ini, web_cert="web.pem", web_key="web.pem")
    done = run_server(ini)
    assert done.returncode == 2, done.stderr
    (last,) = [line for line in done.stderr.splitlines() if "imapsync-bridge:" in line]
    assert "web_cert/web_key: cannot load" in last and "Traceback" not in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        set_options(ini, web_cert="", web_key="", web_listen=f"127.0.0.1:{port}")
        done = run_server(ini)
    assert done.returncode == 1, done.stderr
    assert f"web listener: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# -- the security review's findings (docs/web.md "Security review") ------------------------
BCC = "Bcc: eve@evil.example"


@pytest.mark.parametrize(
    "fields",
    [{"subject": "Hi\r\nBcc: eve@evil.example"}, {"to": [f"carol@example.net\r\n{BCC}"]},
     {"to": [f"carol@example.net\n{BCC}"]}, {"subject": "lone \ud800 surrogate"},
     {"body": "lone \udfff surrogate"}, {"to": [f"carol@example.net\u2028{BCC}"]},
     {"to": ["carol\x00@example.net"]}, {"subject": "nul \x00"}, {"subject": "escape \x1b[2J"},
     {"body": "nul \x00 in the text"}],
)  # fmt: skip
def test_line_breaks_controls_and_broken_unicode_in_compose_are_400(
    hosted: WebHosted, relay: MailServer, fields: dict[str, Any]
) -> None:
    body = {"to": ["carol@example.net"], "subject": "s", "body": "b", **fields}
    answer = hosted.client().request("POST", "/api/compose", body, basic=ALICE)
    assert answer.status == 400, answer.text
    assert set(answer.json()) == {"error"} and answer.json()["error"]
    assert hosted.client().request("GET", "/api/mailbox", basic=ALICE).json()["outbox"] == []
    assert relay.received == []


def test_the_compose_form_refuses_line_breaks_with_the_draft_kept(
    hosted: WebHosted, relay: MailServer
) -> None:
    client = hosted.client()
    client.login()
    fields = {"csrf": client.csrf("/compose"), "subject": "s", "body": "b", "send": "now"}
    for hostile in ({"to": f"carol@example.net\r\n{BCC}"},
                    {"to": "carol@example.net", "subject": f"Hi\r\n{BCC}"}):  # fmt: skip
        answer = client.form("/compose", {**fields, **hostile})
        assert answer.status == 400, answer.text
        assert "line break" in answer.text and 'name="body"' in answer.text
    assert relay.received == []
    assert client.request("GET", "/api/mailbox").json()["outbox"] == []


def test_deeply_nested_json_is_400_not_a_crash(hosted: WebHosted) -> None:
    for body in (b"[" * 200_000, b'{"to": ' + b"[" * 200_000):
        answer = hosted.client().request("POST", "/api/compose", body, basic=ALICE)
        assert answer.status == 400, answer.text
        assert set(answer.json()) == {"error"}
    assert hosted.client().request("GET", "/api/status", basic=ALICE).status == 200


def test_ids_are_ascii_digits_only(hosted: WebHosted) -> None:
    hosted.deliver(1)
    client = hosted.client()
    client.login()
    (item,) = client.request("GET", "/api/mailbox").json()["inbox"]
    assert item["id"] < 10
    arabic = chr(0x0660 + item["id"])  # ARABIC-INDIC DIGIT: int() takes it, a URL should not
    for path in (f"/messages/{arabic}", f"/api/messages/{arabic}"):
        assert client.request("GET", urllib.parse.quote(path)).status == 404, path
    for odd in ("²", arabic, "-1", "1e3", "0x1"):
        answer = client.request("GET", "/compose?" + urllib.parse.urlencode({"reply": odd}))
        assert answer.status == 200 and 'name="in_reply_to" value=""' in answer.text, odd
        token = client.csrf("/compose")
        form = {"csrf": token, "to": "carol@example.net", "body": "b", "in_reply_to": odd}
        assert client.form("/compose", {**form, "send": "desktop"}).status == 303, odd
    queued = client.request("GET", "/api/mailbox").json()["outbox"]
    assert len(queued) == 5  # sent, not as replies to anything


def test_every_answer_is_uncacheable_and_strict(hosted: WebHosted) -> None:
    client = hosted.client()
    answers = [client.request("GET", "/"), client.request("GET", "/inbox"),
               client.request("GET", "/api/mailbox"), client.request("GET", "/nowhere"),
               client.login(), client.request("GET", "/inbox"),
               client.request("GET", "/static/live.js")]  # fmt: skip
    for answer in answers:
        assert answer.headers["Cache-Control"] == "no-store", answer.status
        assert answer.headers["X-Content-Type-Options"] == "nosniff", answer.status
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    context = ssl.create_default_context(cafile=str(hosted.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", hosted.port, context=context, timeout=10)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    conn.request("GET", "/events", headers={"Cookie": cookie})
    stream = conn.getresponse()
    assert stream.status == 200
    assert stream.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in stream.headers["Content-Security-Policy"]
    conn.close()


def test_logging_in_again_replaces_the_old_session(hosted: WebHosted) -> None:
    client = hosted.client()
    client.login()
    first = client.cookies["__Host-session"]
    client.login()  # the login form while logged in: a new session, the old one ended
    assert client.cookies["__Host-session"] != first
    assert client.request("GET", "/api/mailbox").status == 200
    stale = hosted.client()
    stale.cookies["__Host-session"] = first
    assert stale.request("GET", "/api/mailbox").status == 401


def _write_routes() -> list[str]:
    """Every POST route of the page and the API, an id filled in: a new one is covered."""
    paths = [route.path for table in (pages.routes, api.routes) for route in table
             if isinstance(route, RouteDef) and route.method == "POST"]  # fmt: skip
    return [p.replace(ID, "{id}").replace("{verb}", "delete") for p in paths]


def test_every_write_route_needs_the_csrf_token_with_a_session(hosted: WebHosted) -> None:
    hosted.deliver(1)
    client = hosted.client()
    client.login()
    (item,) = client.request("GET", "/api/mailbox").json()["inbox"]
    routes = [path.format(id=item["id"]) for path in _write_routes()]
    assert {"/logout", "/compose", "/api/compose", "/sync", "/api/sync"} <= set(routes)
    for path in routes:
        body = {"to": ["carol@example.net"]} if path.startswith("/api/") else {}
        assert client.request("POST", path, body).status == 403, path
        if not path.startswith("/api/"):
            assert client.form(path, {"csrf": "forged"}).status == 403, path
    assert client.request("GET", "/api/mailbox").json()["inbox"] == [item]  # nothing changed
    assert client.request("GET", "/api/mailbox").json()["outbox"] == []


def test_another_users_ids_are_404_on_every_page_route(hosted: WebHosted) -> None:
    hosted.deliver(1, subject="Alice's secret")
    alice = hosted.client()
    alice.login()
    (item,) = alice.request("GET", "/api/mailbox").json()["inbox"]
    bob = hosted.client()
    bob.login("bob")
    token = bob.csrf("/inbox")
    for path in _write_routes():
        if "{id}" in path and not path.startswith("/api/"):
            answer = bob.form(path.format(id=item["id"]), {"csrf": token})
            assert answer.status == 404 and "secret" not in answer.text, path
    for mode in ("reply", "forward"):
        answer = bob.request("GET", f"/compose?{mode}={item['id']}")
        assert answer.status == 404 and "secret" not in answer.text
    fields = {"csrf": token, "to": "carol@example.net", "body": "b", "in_reply_to": str(item["id"])}
    assert bob.form("/compose", fields).status == 400
    assert bob.request("GET", "/api/mailbox").json()["outbox"] == []
    # logging in (with its redirect) never goes anywhere a parameter says
    assert hosted.client().request("GET", "/login?next=https://evil.example/").status == 200
    answer = hosted.client().login()
    assert answer.headers["Location"] == "/inbox"
    assert alice.request("GET", "/api/mailbox").json()["inbox"] == [item]


def test_one_user_cannot_open_event_streams_without_end(hosted: WebHosted) -> None:
    """Every store commit wakes every open stream: a thousand of one user's would make
    each new mail cost the server a thousand mailbox reads."""
    client = hosted.client()
    client.login()
    context = ssl.create_default_context(cafile=str(hosted.ca))
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())

    def open_stream() -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPSConnection("127.0.0.1", hosted.port, context=context, timeout=10)
        conn.request("GET", "/events", headers={"Cookie": cookie})
        return conn, conn.getresponse()

    streams = [open_stream() for _ in range(MAX_STREAMS_PER_USER)]
    try:
        assert [response.status for _conn, response in streams] == [200] * len(streams)
        refused_conn, refused = open_stream()
        assert refused.status == 429 and "too many" in refused.read().decode()
        refused_conn.close()
        bob = hosted.client()
        bob.login("bob")
        assert bob.request("GET", "/inbox").status == 200  # others are not affected
        streams.pop()[0].close()  # a page closed: its place is free again within seconds
        deadline = time.monotonic() + 5
        while (again := open_stream())[1].status == 429 and time.monotonic() < deadline:
            again[0].close()
            time.sleep(0.1)
        streams.append(again)
        assert again[1].status == 200
    finally:
        for conn, _response in streams:
            conn.close()


def test_writes_a_browser_makes_for_another_site_are_403(hosted: WebHosted) -> None:
    client = hosted.client()
    own = f"https://127.0.0.1:{hosted.port}"
    foreign = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
               {"Origin": "https://evil.example"}, {"Origin": own.replace("s:", ":")}]  # fmt: skip
    for headers in foreign:
        answer = client.request("POST", "/api/sync", headers=headers, basic=ALICE)
        assert (answer.status, answer.json()) == (403, {"error": "cross-site request refused"})
        assert client.request("POST", "/logout", "", headers).status == 403
    for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": own}, {"Sec-Fetch-Site": "none"},
                    {"Origin": "null"}, {}):  # fmt: skip
        assert client.request("POST", "/api/sync", headers=headers, basic=ALICE).status == 202


def test_many_recipients_and_a_huge_body_are_refused_with_a_reason(
    hosted: WebHosted, relay: MailServer
) -> None:
    many = [f"r{n}@example.net" for n in range(101)]
    answer = hosted.client().request("POST", "/api/compose", {"to": many}, basic=ALICE)
    assert (answer.status, answer.json()) == (400, {"error": "101 recipients: at most 100"})
    client = hosted.client()
    client.login()
    fields = {"csrf": client.csrf("/compose"), "to": ", ".join(many), "body": "b"}
    answer = client.form("/compose", fields)
    assert answer.status == 400 and "101 recipients: at most 100" in answer.text
    huge = {"to": ["carol@example.net"], "body": "x" * (26 * 1024 * 1024)}  # over the limit
    answer = hosted.client().request("POST", "/api/compose", huge, basic=ALICE)
    assert answer.status == 413 and set(answer.json()) == {"error"}
    assert client.request("GET", "/api/mailbox").json()["outbox"] == [] and relay.received == []


def test_a_reply_goes_to_the_reply_to_address_when_the_mail_names_one(hosted: WebHosted) -> None:
    hosted.deliver(1, subject="list mail")
    hosted.deliver(2, subject="broken", reply_to="=?utf-8?q?=0D=0A?= <<<")
    hosted.deliver(
        3, subject="answers elsewhere", reply_to="=?utf-8?q?Liste_M=C3=BCller?= <l@x.org>"
    )
    client = hosted.client()
    client.login()
    inbox = client.request("GET", "/api/mailbox").json()["inbox"]
    shown = {}
    for item in inbox:
        page = client.request("GET", f"/compose?reply={item['id']}").text
        found = re.search(r'name="to" type="text" inputmode="email" value="([^"]*)"', page)
        assert found is not None
        shown[item["subject"]] = html.unescape(found.group(1))
    assert shown == {"answers elsewhere": '"Liste Müller" <l@x.org>',
                     "broken": "Carol <carol@example.net>",  # nothing usable: the sender
                     "list mail": "Carol <carol@example.net>"}  # fmt: skip


def test_direction_controls_in_names_cannot_disguise_them_on_the_page(hosted: WebHosted) -> None:
    """U+202E turns the rest of a name around: ``invoice<RLO>fdp.exe`` reads as
    ``invoiceexe.pdf``. The page shows names without bidi controls (the API keeps them)."""
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*=utf-8''invoice%E2%80%AEfdp.exe\r\n\r\n"
        f"AAAA\r\n--{boundary}--\r\n"
    )
    hosted.deliver(1, subject="=?utf-8?q?pay_=E2=80=AEnow?=", body=body,
                   content_type=f'multipart/mixed; boundary="{boundary}"')  # fmt: skip
    client = hosted.client()
    client.login()
    (item,) = client.request("GET", "/api/mailbox").json()["inbox"]
    assert item["subject"] == "pay \u202enow"  # the API gives what was sent
    for path in ("/inbox", f"/messages/{item['id']}"):
        page = client.request("GET", path).text
        assert "\u202e" not in page and "pay now" in page, path
    assert "invoicefdp.exe" in page
