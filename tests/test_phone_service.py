"""The phone service over a real SQLite PhoneStore: shapes, parsing, changes, errors."""

from __future__ import annotations

import pytest

from imapsync_bridge.server.phone import NoSuchMessage, PhoneService, html_to_text
from imapsync_bridge.server.store import PhoneStore

LISTING_FIELDS = {"id", "message_id", "subject", "from", "date", "seen", "flagged"}

MIXED = (
    b"Message-ID: <m@x>\r\nSubject: =?utf-8?q?R=C3=A9sum=C3=A9?=\r\n"
    b"From: Ann <ann@x>\r\nTo: Bob <bob@x>, carol@x\r\nCc: =?utf-8?q?J=C3=B6rg?= <j@x>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Hello \xc3\xa9\r\n"
    b"--B\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="cv.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n"
)
HTML = (
    b"Message-ID: <h@x>\r\nSubject: html\r\nFrom: a@x\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><head><style>p{color:red}</style><script>alert(1)</script></head>"
    b"<body><p>Hi &amp; <b>welcome</b></p><p>line&nbsp;two<br>three</p>"
    b"<img src=x onerror=alert(2)>&lt;script&gt;</body></html>\r\n"
)


def put(key: str, raw: bytes, day: int) -> dict:
    return {
        "kind": "put", "key": key, "message_id": key, "raw": raw,
        "internaldate": f"2024-04-{day:02d}T08:00:00Z", "seen": False, "flagged": False,
        "folder": "inbox",
    }  # fmt: skip


@pytest.fixture
def store(tmp_path):
    s = PhoneStore(tmp_path / "phone.db")
    s.add_user("alice", "alice@phone.example", "alice@corp.example", 5)
    s.add_user("bob", "bob@phone.example", "bob@corp.example", 7)
    s.apply_ops("alice", [(1, put("<m@x>", MIXED, 1)), (2, put("<h@x>", HTML, 2))])
    yield s
    s.close()


@pytest.fixture
def service(store) -> PhoneService:
    return PhoneService(store)


def ids(store: PhoneStore) -> dict[str, int]:
    return {m.key: m.id for m in store.snapshot("alice").messages}


def test_list_is_the_contract_document(service, store):
    doc = service.list("alice").as_json()
    assert set(doc) == {"user", "window", "inbox", "trash", "sent", "outbox"}
    assert (doc["user"], doc["window"], doc["trash"], doc["sent"], doc["outbox"]) == (
        "alice", 5, [], [], []
    )  # fmt: skip
    assert [m["message_id"] for m in doc["inbox"]] == ["<h@x>", "<m@x>"]  # newest first
    first = doc["inbox"][1]
    assert set(first) == LISTING_FIELDS
    assert (first["subject"], first["from"], first["date"]) == (
        "Résumé", "Ann <ann@x>", "2024-04-01T08:00:00Z"
    )  # fmt: skip
    assert service.list("bob").as_json()["inbox"] == []


def test_show_gives_recipients_text_and_attachments(service, store):
    detail = service.show("alice", ids(store)["<m@x>"])
    doc = detail.as_json()
    assert set(doc) == LISTING_FIELDS | {"to", "cc", "text", "attachments"}
    assert doc["to"] == ["Bob <bob@x>", "carol@x"]
    assert doc["cc"] == ["Jörg <j@x>"]
    assert doc["text"].strip() == "Hello é"
    assert doc["attachments"] == [{"name": "cv.pdf", "type": "application/pdf", "size": 9}]
    assert detail.raw == MIXED


def test_show_reduces_html_to_safe_text(service, store):
    text = service.show("alice", ids(store)["<h@x>"]).text
    assert text == "Hi & welcome\n\nline two\nthree\n<script>"
    assert "alert" not in text and "color" not in text


@pytest.mark.parametrize(
    "raw", [b"", b"\x00\xff", b"Content-Type: text/plain; charset=no-such\r\n\r\n\xff\xfe",
            b"To: <<<@@@\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n--\r\n"],
)  # fmt: skip
def test_show_never_fails_on_hostile_mail(service, store, raw):
    store.apply_ops("alice", [(3, put("<bad@x>", raw, 3))])
    detail = service.show("alice", ids(store)["<bad@x>"])
    assert isinstance(detail.text, str) and isinstance(detail.to, list)


def test_html_to_text_drops_markup_and_keeps_text():
    assert html_to_text("<div>a<script>x</script></div><div>b &lt;i&gt;</div>") == "a\n\nb <i>"


def test_change_verbs_return_the_message_after_the_change(service, store):
    mid = ids(store)["<m@x>"]
    result = service.read("alice", mid)
    assert result.changed is True and result.message is not None and result.message.seen
    assert service.read("alice", mid).changed is False  # nothing to change
    assert service.flag("alice", mid).as_json()["flagged"] is True
    assert service.unflag("alice", mid).changed is True
    assert service.unread("alice", mid).as_json()["seen"] is False
    assert service.delete("alice", mid).message.folder == "trash"
    assert [m.id for m in service.list("alice").trash] == [mid]
    assert service.restore("alice", mid).message.folder == "inbox"
    assert service.destroy("alice", mid).as_json() == {"id": mid, "destroyed": True}
    kinds = [a.kind for a in store.pending_actions("alice")]
    assert kinds == ["seen", "flag", "unflag", "unseen", "trash", "restore", "destroy"]
    with pytest.raises(ValueError, match="unknown phone verb"):
        service.change("alice", "explode", mid)


@pytest.mark.parametrize("verb", ["show", "delete", "restore", "destroy", "read", "flag"])
def test_another_users_id_and_an_unknown_id_look_the_same(service, store, verb):
    mid = ids(store)["<m@x>"]
    call = service.show if verb == "show" else getattr(service, verb)
    errors = []
    for user, id_ in (("bob", mid), ("alice", 10**6)):
        with pytest.raises(NoSuchMessage) as info:
            call(user, id_)
        errors.append(str(info.value).replace(str(id_), "N"))
    assert errors == ["no message N", "no message N"]
    assert store.pending_actions("alice") == [] and store.pending_actions("bob") == []


def test_request_sync_is_recorded_once_until_taken(service, store):
    first = service.request_sync("alice")
    assert service.request_sync("alice") == first  # a burst merges into the first request
    assert store.take_sync_request("bob") is None
    assert store.take_sync_request("alice") == first.requested_at
    assert store.take_sync_request("alice") is None


def test_status(service, store):
    assert service.status("alice").as_json() == {
        "last_desktop_sync": None, "pending_to_desktop": 0, "window": 5,
    }  # fmt: skip
    service.read("alice", ids(store)["<m@x>"])
    store.record_sync("alice", {"result": "ok"})
    status = service.status("alice")
    assert status.pending_to_desktop == 1 and status.last_desktop_sync is not None
