"""``manage.py xoauth2_devserver``: a local mail provider for development.

One process runs the bundled OAuth2 authorization server and the XOAUTH2-only SMTP server
on loopback. Its defaults come from the ``dev`` provider's settings, so the site and the
server agree on ports without repeating them; ``connect_mailbox dev`` and the admin's
Connect button work against it unchanged.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import errno
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.devserver.oauth import OAuth2Server
from django_xoauth2_mail.devserver.tls import is_loopback_host
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.dev import DevProvider

if TYPE_CHECKING:
    from django_xoauth2_mail.devserver.smtp import ReceivedMessage, XOAuth2SMTPServer

DEFAULT_TOKEN_LIFETIME = 120  # seconds: short, so that a refresh shows up within minutes
STATE_FILE_NAME = "oauth-state.json"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PORT_ERRORS = {
    errno.EADDRINUSE: "the port is already in use",
    errno.EACCES: "you may not use that port",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's",
}


def default_data_dir() -> Path:
    """Where messages and state go: BASE_DIR/var/xoauth2-devserver, else ./xoauth2-devserver."""
    base_dir = getattr(settings, "BASE_DIR", None)
    if base_dir:
        return Path(base_dir) / "var" / "xoauth2-devserver"
    return Path.cwd() / "xoauth2-devserver"


def format_summary(message: ReceivedMessage) -> str:
    """One line per received message: time, envelope sender and recipients, subject, size."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(message.data)
    subject = str(headers.get("Subject", "(no subject)"))
    when = message.received_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    recipients = ", ".join(message.rcpt_tos)
    saved = f"  {message.eml_path.name}" if message.eml_path is not None else ""
    return (
        f"[{when}] {message.mail_from or '<>'} -> {recipients}  {subject!r}  "
        f"{len(message.data)} bytes{saved}"
    )


class Command(BaseCommand):
    help = (
        "Run a local OAuth2 server and an SMTP server that accepts only AUTH XOAUTH2 with "
        "the tokens it issued: a stand-in for Gmail or Microsoft 365 during development. "
        "The 'dev' provider points at it by default."
    )
    # The servers do not use the site's models; a broken setting elsewhere must not stop them.
    requires_system_checks: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # For code that runs the command in a thread (tests, an embedding script): ``ready``
        # is set once both servers listen (``servers`` holds them); ``stop`` ends the command.
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.servers: tuple[OAuth2Server, XOAuth2SMTPServer] | None = None

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host",
            help="Address to listen on (default: the host of the dev provider's BASE_URL, "
            "127.0.0.1). Only loopback addresses unless --allow-non-loopback.",
        )
        parser.add_argument(
            "--oauth-port", type=int, help="OAuth2 server port (default: BASE_URL's, 8765; 0: any)"
        )
        parser.add_argument(
            "--smtp-port", type=int, help="SMTP server port (default: SMTP_PORT, 2525; 0: any)"
        )
        parser.add_argument(
            "--maildir",
            type=Path,
            help="Folder that receives one .eml file per message "
            "(default: BASE_DIR/var/xoauth2-devserver/mail, else ./xoauth2-devserver/mail).",
        )
        parser.add_argument(
            "--state-file",
            type=Path,
            help="JSON file that keeps clients and tokens across restarts "
            f"(default: {STATE_FILE_NAME} next to the maildir).",
        )
        parser.add_argument(
            "--token-lifetime",
            type=int,
            default=DEFAULT_TOKEN_LIFETIME,
            help=f"Seconds an access token lives (default: {DEFAULT_TOKEN_LIFETIME}).",
        )
        parser.add_argument(
            "--auto-approve",
            action="store_true",
            help="Approve a consent request at once when it names the account (login_hint), "
            "as connect_mailbox --email does: for demos and CI.",
        )
        parser.add_argument(
            "--allow-non-loopback",
            action="store_true",
            help="Let --host be an address other machines can reach. The server accepts a "
            "published client secret and keeps tokens in clear: never on a shared network.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["token_lifetime"] < 1:
            raise CommandError("--token-lifetime must be at least 1 second.")
        provider = DevProvider()
        maildir = options["maildir"] or default_data_dir() / "mail"
        maildir.mkdir(parents=True, exist_ok=True)  # there to look at before the first message
        state_file = options["state_file"] or maildir.resolve().parent / STATE_FILE_NAME
        with _signals_set(self.stop):
            try:
                oauth, smtp = self._start_servers(provider, options, maildir, state_file)
            except ConfigurationError as error:  # e.g. a misspelt SMTP_SECURITY: one line
                raise CommandError(str(error)) from None
            try:
                self._print_banner(provider, oauth, smtp, options, state_file)
                self.servers = (oauth, smtp)
                self.ready.set()
                # A timeout, so that the main thread runs the signal handlers promptly.
                while not self.stop.wait(0.5):
                    pass
            finally:
                smtp.stop()
                oauth.stop()
        self.stdout.write("Stopped.")

    def _start_servers(
        self, provider: DevProvider, options: dict[str, Any], maildir: Path, state_file: Path
    ) -> tuple[OAuth2Server, XOAuth2SMTPServer]:
        host, oauth_port, smtp_port = self._addresses(provider, options)
        smtp_class = _smtp_server_class()
        try:
            oauth = OAuth2Server(
                host,
                oauth_port,
                access_token_lifetime=options["token_lifetime"],
                state_file=state_file,
                auto_approve=options["auto_approve"],
                allow_non_loopback=True,  # checked by _addresses, with the command's wording
                verbose=options["verbosity"] >= 2,
            )
        except ValueError as error:  # an unreadable state file; the message says what to do
            raise CommandError(str(error)) from error
        _start(oauth, "OAuth2", "--oauth-port")
        # Any loopback redirect: connect_mailbox's port changes every run, and the admin's
        # callback is on loopback under runserver.
        oauth.add_client(provider.client_id, provider.client_secret, None)
        smtp = smtp_class(
            oauth.validate_access_token,
            host,
            smtp_port,
            security="none",
            maildir=maildir,
            on_message=self._print_summary,
            allow_non_loopback=True,
            # Named in OAUTHBEARER's error challenge, as RFC 7628 section 3.2.2 suggests.
            openid_configuration=f"{oauth.base_url}/.well-known/openid-configuration",
        )
        try:
            _start(smtp, "SMTP", "--smtp-port")
        except CommandError:
            oauth.stop()
            raise
        return oauth, smtp

    def _addresses(self, provider: DevProvider, options: dict[str, Any]) -> tuple[str, int, int]:
        base = urlsplit(provider.base_url)
        if base.scheme != "http":
            raise CommandError(
                f"The dev provider's BASE_URL is {provider.base_url}, but the development "
                "server speaks plain HTTP on loopback: set XOAUTH2_MAIL['PROVIDERS']['dev']"
                "['BASE_URL'] to an http:// address such as http://127.0.0.1:8765."
            )
        host = options["host"] or base.hostname or "127.0.0.1"
        oauth_port = options["oauth_port"] if options["oauth_port"] is not None else base.port
        smtp_port = options["smtp_port"]
        if smtp_port is None:
            smtp_port = provider.smtp_endpoint.port
        if not is_loopback_host(host):
            if not options["allow_non_loopback"]:
                raise CommandError(
                    f"Refusing to listen on {host}: other machines could reach the development "
                    "server, which accepts a published client secret and keeps tokens in "
                    "clear. Use --host 127.0.0.1 (or ::1), or add --allow-non-loopback if "
                    "you really mean to expose it."
                )
            self.stderr.write(
                self.style.WARNING(
                    f"WARNING: listening on {host}, reachable from other machines. This is a "
                    "development server: it accepts the published client secret, keeps tokens "
                    "in clear and sends SMTP without TLS. Never use it with real accounts; "
                    "senders must set XOAUTH2_MAIL['ALLOW_INSECURE_SMTP'] = True to reach it."
                )
            )
        return host, oauth_port if oauth_port is not None else 80, smtp_port

    def _print_banner(
        self,
        provider: DevProvider,
        oauth: OAuth2Server,
        smtp: XOAuth2SMTPServer,
        options: dict[str, Any],
        state_file: Path,
    ) -> None:
        consent = (
            "approved at once when the request names the account (--auto-approve)"
            if options["auto_approve"]
            else "an Allow / Deny page"
        )
        smtp_host = f"[{smtp.host}]" if ":" in smtp.host else smtp.host
        rows = [
            ("OAuth2 server", f"{oauth.base_url}  (/authorize, /token, /revoke, /userinfo)"),
            ("Metadata", f"{oauth.base_url}/.well-known/oauth-authorization-server (and OIDC)"),
            ("SMTP server", f"{smtp_host}:{smtp.port}  (AUTH XOAUTH2 or OAUTHBEARER, no TLS)"),
            ("OAuth2 client", f"{provider.client_id} / {provider.client_secret}"),
            ("Consent", consent),
            ("Access tokens", f"expire after {oauth.access_token_lifetime} s; refresh rotates"),
            ("Messages", f"{smtp.maildir}  (one .eml file each)"),
            ("State", f"{state_file}  (tokens survive a restart)"),
        ]
        self.stdout.write(self.style.MIGRATE_HEADING("django_xoauth2_mail development server"))
        for label, value in rows:
            self.stdout.write(f"  {label:<14} {value}")
        self._print_settings_hint(provider, oauth, smtp)
        self._print_skew_hint(oauth.access_token_lifetime)
        self.stdout.write("Connect a mailbox: python manage.py connect_mailbox dev --email ADDRESS")
        self.stdout.write("Quit with CONTROL-C.")
        self.stdout.flush()

    def _print_settings_hint(
        self, provider: DevProvider, oauth: OAuth2Server, smtp: XOAuth2SMTPServer
    ) -> None:
        """Say which settings reach this server when the site's point elsewhere."""
        endpoint = provider.smtp_endpoint
        if (provider.base_url, endpoint.host, endpoint.port, endpoint.security) == (
            oauth.base_url,
            smtp.host,
            smtp.port,
            "none",
        ):
            return
        wanted = {"BASE_URL": oauth.base_url, "SMTP_PORT": smtp.port}
        if smtp.host != urlsplit(oauth.base_url).hostname:
            wanted["SMTP_HOST"] = smtp.host
        self.stdout.write(
            self.style.WARNING(
                "This site's 'dev' provider points elsewhere. To send through this server, set\n"
                f"    XOAUTH2_MAIL['PROVIDERS']['dev'] = {wanted!r}"
            )
        )

    def _print_skew_hint(self, lifetime: int) -> None:
        skew = conf.TOKEN_REFRESH_SKEW
        if skew < lifetime:
            return
        self.stdout.write(
            self.style.WARNING(
                f"This site refreshes a token {skew:g} s before it expires "
                f"(XOAUTH2_MAIL['TOKEN_REFRESH_SKEW']), and these tokens live {lifetime} s: "
                "it will refresh before every send. To see a token reused and then refreshed, "
                f"set TOKEN_REFRESH_SKEW to about a quarter of the lifetime ({lifetime // 4 or 1})."
            )
        )

    def _print_summary(self, message: ReceivedMessage) -> None:
        # Runs on the SMTP server's thread; one write per line keeps lines whole.
        self.stdout.write(format_summary(message))
        self.stdout.flush()


def _smtp_server_class() -> type[XOAuth2SMTPServer]:
    try:
        from django_xoauth2_mail.devserver.smtp import XOAuth2SMTPServer
    except ImportError as error:
        raise CommandError(
            f"The development SMTP server needs aiosmtpd ({error}). Install it with "
            "`pip install 'django-xoauth2-mail[testing]'`."
        ) from error
    return XOAuth2SMTPServer


def _start(server: OAuth2Server | XOAuth2SMTPServer, what: str, option: str) -> None:
    try:
        server.start()
    except OSError as error:
        reason = _PORT_ERRORS.get(error.errno or 0, str(error))
        raise CommandError(
            f"Cannot start the {what} server on {server.host}:{server.port}: {reason}. Stop "
            f"whatever uses it (another xoauth2_devserver?), or choose another port with "
            f"{option} (0 picks a free one) and point the dev provider's settings at it."
        ) from error


@contextlib.contextmanager
def _signals_set(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM set ``stop`` while the block runs.

    Installed before anything starts, so a signal that arrives while the servers start or
    the banner prints still ends in a clean stop rather than a traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install handlers; ``stop`` still works
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {number: signal.signal(number, request_stop) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
