"""A ``ThreadingHTTPServer`` served from a named daemon thread, started and stopped reliably.

Shared by the development OAuth2 server (oauth.py) and ``connect_mailbox``'s loopback
redirect receiver (``django_xoauth2_mail.consent.loopback``): both listen at once, so the port is
known before anyone is told to use it, and serve from daemon threads, so a server left
running never keeps the process alive. Plain stdlib, like the rest of ``devserver``.
"""

from __future__ import annotations

import socketserver
import threading
from http.server import ThreadingHTTPServer

__all__ = ["BackgroundHTTPServer", "ServerThread"]

# shutdown() waits for serve_forever's next poll: a short interval keeps stop() fast.
POLL_INTERVAL = 0.05
# The serving thread is a daemon: if it does not end in time, it cannot hold up exit.
JOIN_TIMEOUT = 5.0


class BackgroundHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that binds without a DNS lookup and never blocks exit."""

    # Each request gets a daemon thread: an idle connection (browsers open spare ones) or
    # an in-flight, delayed response cannot hold up stop() or the process's exit.
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query that can stall start().
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class ServerThread:
    """Serves ``httpd`` (already listening) from a daemon thread named ``name``."""

    def __init__(
        self, httpd: socketserver.BaseServer, name: str, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self.httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(poll_interval,), name=name, daemon=True
        )

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop serving, close the listening socket and wait for the thread to end."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=timeout)
