"""Where the answer to a consent request arrives when ``connect_mailbox`` runs it.

Two sources feed one :class:`AnswerInbox`, and the command takes whichever answers first:

* :class:`LoopbackServer`, a short-lived HTTP server on ``127.0.0.1`` that receives the
  provider's redirect (a loopback IP redirect, RFC 8252 section 7.3) and shows the
  browser a plain page saying the tab can be closed, or what went wrong;
* :func:`start_paste_reader`, for headless machines: the browser runs elsewhere, cannot
  reach this machine's loopback, and the person pastes the address it ended at.

Nothing here knows Django or a provider; checking the answer is the caller's job.
"""

from __future__ import annotations

import html
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from django_xoauth2_mail.consent.http_server import BackgroundHTTPServer, ServerThread

__all__ = ["Answer", "AnswerInbox", "LoopbackServer", "parse_pasted", "start_paste_reader"]

# Says what is wrong with an answer (shown in the browser), or None when it looks right.
AnswerCheck = Callable[[Mapping[str, str]], str | None]


@dataclass(frozen=True)
class Answer:
    """The authorization response's parameters (``code``/``state`` or ``error``)."""

    params: Mapping[str, str]
    source: str  # "browser" or "paste"
    # A pasted code alone carries no state; PKCE still binds it to this run's verifier.
    bare_code: bool = False


class AnswerInbox:
    """Answers, notices for the person, and exceptions from the reader threads."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Answer | str | BaseException] = queue.Queue()

    def put(self, item: Answer | str | BaseException) -> None:
        self._queue.put(item)

    def wait(self, timeout: float, on_notice: Callable[[str], None]) -> Answer:
        """The first answer; notices go to ``on_notice`` meanwhile. Raises TimeoutError,
        or what a reader thread caught (KeyboardInterrupt from a pasting terminal)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise queue.Empty
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"no answer within {timeout:g} seconds") from None
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str):
                on_notice(item)
                continue
            return item


class LoopbackServer:
    """Receives one redirect at ``http://127.0.0.1:PORT/``; ``port=0`` picks a free port.

    Only an answer carrying ``state`` (the one this run sent to the provider) is taken:
    any local process, or a web page that rebinds a DNS name to 127.0.0.1, can send
    requests here, and none of them may end the wait. Requests naming another Host than
    this address (DNS rebinding) are refused outright.
    """

    def __init__(
        self, inbox: AnswerInbox, *, state: str, port: int = 0, check: AnswerCheck
    ) -> None:
        self.inbox, self.check, self.state = inbox, check, state
        self._port = port  # the bound one once started; kept after stop()
        self._serving: ServerThread | None = None
        self._answered = threading.Event()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("The loopback server has not been started.")
        return self._port

    @property
    def redirect_uri(self) -> str:
        # The IP literal, not "localhost" (RFC 8252 section 8.3): no name resolution,
        # no chance of listening on anything but loopback.
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> LoopbackServer:
        """Listen now (OSError if the port is taken), serving from a daemon thread."""
        httpd = _HTTPServer(("127.0.0.1", self._port), self)
        self._port = httpd.server_port
        self._serving = ServerThread(httpd, "xoauth2-loopback").start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port; safe to call twice."""
        serving, self._serving = self._serving, None
        if serving is not None:
            serving.stop()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def respond(self, path: str, host: str | None) -> tuple[int, str, str, Answer | None]:
        """(status, title, message, answer to deliver) for a GET of ``path`` with the
        request's ``Host`` header."""
        if host not in (f"127.0.0.1:{self._port}", f"localhost:{self._port}"):
            return 421, "Wrong address", "This server answers only at 127.0.0.1.", None
        url = urlsplit(path)
        if url.path != "/":
            return 404, "Not found", "This address only receives the consent answer.", None
        params = _single_values(url.query)
        if "code" not in params and "error" not in params:
            return 400, "Waiting for the consent", "This address receives the consent answer.", None
        if not secrets.compare_digest(params.get("state", ""), self.state):
            # Not the answer to this run's request: refuse it and keep waiting.
            text = (
                "This answer does not belong to the consent the command is waiting for "
                "(state mismatch); it was ignored."
            )
            return 400, "Not this consent", text, None
        if self._answered.is_set():
            return 409, "Already answered", "The command already has an answer.", None
        self._answered.set()
        problem = self.check(params)
        answer = Answer(params, "browser")
        if problem:
            return 400, "The mailbox was not connected", problem, answer
        text = "The terminal finishes the connection. You can close this tab."
        return 200, "Consent received", text, answer


class _HTTPServer(BackgroundHTTPServer):
    # Browsers open spare connections they may never use; each gets its own (daemon)
    # thread, so an idle one cannot hold up the redirect.

    def __init__(self, address: tuple[str, int], app: LoopbackServer) -> None:
        self.app = app
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10  # a connection that never sends a request frees its thread

    def do_GET(self) -> None:
        status, title, message, answer = self.server.app.respond(self.path, self.headers["Host"])
        document = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
            "</body></html>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(document)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL holds the code
        self.end_headers()
        self.wfile.write(document)
        self.wfile.flush()
        if answer is not None:
            # Only now: the command stops this server once it has the answer, and the
            # browser must have its page by then.
            self.server.app.inbox.put(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line holds the authorization code


def _single_values(query: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(query, keep_blank_values=True).items()}


# Authorization codes are long (Google's "4/0A..." runs to about 70 characters); a short
# word is a mistake, not a code. "%" and "+": a code copied from an address bar.
BARE_CODE = re.compile(r"[A-Za-z0-9._~/%+-]{20,}")


def parse_pasted(text: str) -> Answer | None:
    """What a person pasted: the address the browser ended at, its query, or the code."""
    text = text.strip()
    if BARE_CODE.fullmatch(text):
        return Answer({"code": unquote(text)}, "paste", bare_code=True)
    query = urlsplit(text).query if "://" in text or text.startswith("?") else text
    params = _single_values(query)
    if "code" not in params and "error" not in params:
        return None
    return Answer(params, "paste")


NOT_AN_ANSWER = (
    "That is not the address the provider sent your browser to (it has no code= or "
    "error= in it). Paste the whole address from the browser's address bar after you "
    "clicked Allow, or just the code, then press Enter."
)


def start_paste_reader(stdin: TextIO, inbox: AnswerInbox) -> threading.Thread:
    """Read pasted lines in a daemon thread until one is an answer, or end of input.

    End of input is not an error: the browser may still reach the loopback server.
    Exceptions (KeyboardInterrupt while the terminal reads) go to the inbox, so the
    waiting thread raises them.
    """

    def read() -> None:
        try:
            for line in iter(stdin.readline, ""):
                if not line.strip():
                    continue
                answer = parse_pasted(line)
                if answer is not None:
                    inbox.put(answer)
                    return
                inbox.put(NOT_AN_ANSWER)
        except BaseException as exc:  # even KeyboardInterrupt: the waiting thread raises it
            inbox.put(exc)

    thread = threading.Thread(target=read, name="xoauth2-paste-reader", daemon=True)
    thread.start()
    return thread
