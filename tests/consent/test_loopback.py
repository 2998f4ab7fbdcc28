"""loopback.py: the redirect receiver and the pasted answers, over real HTTP and pipes."""

from __future__ import annotations

import io
import socket

import pytest
import requests

from django_xoauth2_mail.consent.loopback import (
    Answer,
    AnswerInbox,
    LoopbackServer,
    parse_pasted,
    start_paste_reader,
)


@pytest.mark.parametrize(
    ("text", "params", "bare"),
    [
        ("http://127.0.0.1:5000/?code=abc&state=xyz", {"code": "abc", "state": "xyz"}, False),
        ("  http://127.0.0.1:5000/?state=s&error=access_denied\n", None, False),
        ("?code=abc&state=xyz", {"code": "abc", "state": "xyz"}, False),
        ("code=4%2F0Ab&state=xyz", {"code": "4/0Ab", "state": "xyz"}, False),
        ("4/0AeaYSHC-abc_def_ghi", {"code": "4/0AeaYSHC-abc_def_ghi"}, True),
        ("4%2F0AeaYSHC-abc_def_ghi", {"code": "4/0AeaYSHC-abc_def_ghi"}, True),
        ("hello", "none", False),
        ("https://accounts.example.com/authorize?client_id=x&state=y", "none", False),
        ("what now?", "none", False),
        ("", "none", False),
    ],
)
def test_parse_pasted(text, params, bare):
    answer = parse_pasted(text)
    if params == "none":
        assert answer is None
        return
    assert answer is not None and answer.source == "paste" and answer.bare_code is bare
    if params is None:  # the error case
        assert answer.params["error"] == "access_denied"
    else:
        assert dict(answer.params) == params


def test_loopback_server_pages_and_single_answer():
    inbox = AnswerInbox()
    server = LoopbackServer(inbox, state="s", check=lambda params: None).start()
    base = server.redirect_uri
    try:
        assert requests.get(base + "favicon.ico", timeout=5).status_code == 404
        assert requests.get(base, timeout=5).status_code == 400  # no answer in it
        page = requests.get(base + "?code=c&state=s", timeout=5)
        assert page.status_code == 200 and "You can close this tab" in page.text
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert requests.get(base + "?code=d&state=s", timeout=5).status_code == 409
        answer = inbox.wait(1, on_notice=print)
        assert answer == Answer({"code": "c", "state": "s"}, "browser")
    finally:
        server.stop()
        server.stop()  # twice is fine
    assert server.redirect_uri == base  # still known after stop, for the code exchange
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
        pass


def test_a_refused_answer_is_explained_in_the_browser():
    inbox = AnswerInbox()
    with LoopbackServer(inbox, state="s", check=lambda params: "It went <wrong>.") as server:
        page = requests.get(server.redirect_uri + "?error=access_denied&state=s", timeout=5)
    assert page.status_code == 400 and "It went &lt;wrong&gt;." in page.text
    assert inbox.wait(1, on_notice=print).params == {"error": "access_denied", "state": "s"}


def test_answers_for_another_state_are_ignored_and_the_wait_goes_on():
    inbox = AnswerInbox()
    with LoopbackServer(inbox, state="ours", check=lambda params: None) as server:
        base = server.redirect_uri
        # Any local process (or a rebinding web page) can send these.
        for query in ("?code=x&state=theirs", "?error=access_denied", "?code=x", "?state=ours"):
            assert requests.get(base + query, timeout=5).status_code == 400
        with pytest.raises(TimeoutError):
            inbox.wait(0.2, on_notice=print)

        page = requests.get(base + "?code=c&state=ours", timeout=5)

    assert page.status_code == 200
    assert inbox.wait(1, on_notice=print).params == {"code": "c", "state": "ours"}


def test_a_foreign_host_is_refused():
    inbox = AnswerInbox()
    with LoopbackServer(inbox, state="s", check=lambda params: None) as server:
        url = server.redirect_uri + "?code=c&state=s"
        # A page on attacker.example whose name now resolves to 127.0.0.1 (DNS rebinding).
        rebound = {"Host": f"attacker.example:{server.port}"}
        assert requests.get(url, headers=rebound, timeout=5).status_code == 421
        with pytest.raises(TimeoutError):
            inbox.wait(0.2, on_notice=print)
        named = {"Host": f"localhost:{server.port}"}
        assert requests.get(url, headers=named, timeout=5).status_code == 200
    assert inbox.wait(1, on_notice=print).params == {"code": "c", "state": "s"}


def test_inbox_timeout_and_notices():
    inbox = AnswerInbox()
    with pytest.raises(TimeoutError):
        inbox.wait(0.1, on_notice=print)
    notices: list[str] = []
    start_paste_reader(io.StringIO("\nhello\ncode=x&state=y\n"), inbox).join(5)
    assert inbox.wait(1, on_notice=notices.append).params == {"code": "x", "state": "y"}
    assert len(notices) == 1 and "That is not the address" in notices[0]


def test_end_of_input_is_not_an_answer():
    inbox = AnswerInbox()
    start_paste_reader(io.StringIO(""), inbox).join(5)
    with pytest.raises(TimeoutError):
        inbox.wait(0.1, on_notice=print)
