"""What the management commands share: the loopback consent flow (a redirect to this
machine that also accepts a pasted answer), the SMTP login check, and output formatting.
The device flow is in :mod:`~django_xoauth2_mail.consent.device_flow`.

Errors are raised as :class:`~django_xoauth2_mail.exceptions.XOAuth2MailError` with a
message that says what happened and what to do; :func:`command_errors` turns them into
``CommandError``. The person sees no token, ever: only addresses, URLs, codes and times.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sys
import webbrowser
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from django.core.mail.utils import DNS_NAME
from django.core.management.base import CommandError
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.consent.flows import (
    ConsentError,
    Say,
    as_clause,
    check_issuer,
    check_state,
    make_pkce_pair,
    make_state,
)
from django_xoauth2_mail.consent.loopback import (
    Answer,
    AnswerInbox,
    LoopbackServer,
    start_paste_reader,
)
from django_xoauth2_mail.exceptions import MailboxNotFound, SMTPConnectionFailed, XOAuth2MailError
from django_xoauth2_mail.models import Mailbox, normalize_address
from django_xoauth2_mail.providers import get_provider, get_provider_class
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    GrantRevoked,
    Provider,
    SMTPEndpoint,
    TokenEndpointError,
    check_reachable,
)
from django_xoauth2_mail.sending.loop import mail_loop, run_orm
from django_xoauth2_mail.sending.session import SMTPSession


@contextmanager
def command_errors() -> Iterator[None]:
    """Report the package's errors as a CommandError (exit status 1, no traceback)."""
    try:
        yield
    except XOAuth2MailError as exc:
        raise CommandError(str(exc)) from None


def find_mailbox(address: str) -> Mailbox:
    # Tokens deferred: disconnecting must work even if they cannot be decrypted.
    found = Mailbox.objects.defer(*tokens.TOKEN_FIELDS).filter(email=normalize_address(address))
    mailbox = found.first()
    if mailbox is None:
        raise MailboxNotFound(
            f"No mailbox has the address {address}. `python manage.py list_mailboxes` shows "
            f"the ones there are; `python manage.py connect_mailbox PROVIDER --email {address}` "
            "connects it."
        )
    return mailbox


def as_sentence(error: Exception) -> str:
    """An error's text ending like a sentence, for a message that goes on after it."""
    text = str(error).rstrip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def unreachable_hint(mailbox: Mailbox, error: Exception) -> str:
    """The provider's likely cause of an SMTP server that could not be reached (e.g. the
    development server not running), followed by a space; else nothing."""
    if not isinstance(error, SMTPConnectionFailed):
        return ""
    hint = get_provider_class(mailbox.provider).unreachable_hint
    return f"{hint} " if hint else ""


# The loopback flow ----------------------------------------------------------------


@dataclass(frozen=True)
class LoopbackOptions:
    port: int  # 0: any free port
    timeout: float  # seconds to wait for the answer
    open_browser: bool
    read_paste: bool  # also accept the answer pasted on ``stdin``
    stdin: TextIO


@sensitive_variables()
def consent_by_loopback(
    provider: Provider, email: str | None, options: LoopbackOptions, say: Say, warn: Say
) -> ConsentResult:
    """Authorization code + PKCE (S256) + state, answered at a loopback redirect URI."""
    state, pkce = make_state(), make_pkce_pair()
    inbox = AnswerInbox()
    server = LoopbackServer(
        inbox, state=state, port=options.port, check=lambda p: answer_problem(p, state)
    )
    try:
        server.start()
    except OSError as exc:
        raise ConsentError(
            f"Cannot listen on 127.0.0.1:{options.port} for the provider's answer "
            f"({exc.strerror or exc}). Choose another port with --port, or --port 0 for any "
            "free one."
        ) from None
    try:
        url = authorization_url(provider, server.redirect_uri, state, pkce.challenge, email)
        read_paste = _show_authorization_url(url, server.redirect_uri, email, options, say)
        if read_paste:
            start_paste_reader(options.stdin, inbox)
        answer = inbox.wait(options.timeout, on_notice=warn)
    except TimeoutError:
        raise ConsentError(
            f"No answer came from the provider within {options.timeout:g} s (was the browser "
            "tab closed?). Nothing was saved; run the command again, with a longer --timeout "
            "if you need more time."
        ) from None
    finally:
        server.stop()
    problem = answer_problem(answer.params, None if answer.bare_code else state)
    if problem:
        raise ConsentError(problem)
    if not answer.bare_code:  # a pasted code alone names no server; PKCE binds it
        check_issuer(provider, answer.params.get("iss"))
    return _exchange(provider, answer, server.redirect_uri, pkce.verifier)


def authorization_url(
    provider: Provider, redirect_uri: str, state: str, challenge: str, email: str | None
) -> str:
    try:
        # Microsoft's adapter reads the tenant's discovery document first (msal).
        url = provider.authorization_url(
            redirect_uri=redirect_uri, state=state, code_challenge=challenge, login_hint=email
        )
    except (GrantRevoked, TokenEndpointError) as exc:
        raise ConsentError(
            f"{provider.name} did not start the sign-in ({as_clause(exc)}). Nothing was "
            "saved; fix that and run the command again."
        ) from None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConsentError(
            f"The {provider.id} provider has no authorization URL to open. Set "
            f"AUTHORIZATION_URL in XOAUTH2_MAIL['PROVIDERS'][{provider.id!r}] and try again."
        )
    try:
        check_reachable(url, hint=provider.unreachable_hint)
    except TokenEndpointError as exc:
        raise ConsentError(
            f"Cannot start the consent: {as_sentence(exc)} Nothing was saved; check "
            f"the network and AUTHORIZATION_URL of the {provider.id} provider, then run the "
            "command again."
        ) from None
    return url


def _show_authorization_url(
    url: str, redirect_uri: str, email: str | None, options: LoopbackOptions, say: Say
) -> bool:
    """Print the instructions (the URL alone on its line, the first URL printed, for
    scripts) and open a browser if asked; True when pasted answers should be read."""
    who = f"as {email}" if email else "with the account that should send mail"
    say(f"Open this address in a browser, sign in {who}, and allow access:")
    say("")
    say(url)
    say("")
    read_paste = options.read_paste
    if options.open_browser:
        if _open_browser(url):
            say("Opened it in your web browser.")
        else:
            say("No web browser could be opened here: open the address on any machine.")
            read_paste = True
    say(f"Waiting up to {options.timeout:g} s for the answer at {redirect_uri} (Ctrl-C cancels).")
    if read_paste:
        say(
            "If your browser runs on another machine, the page it is sent to after you "
            "allow access will not load: copy the whole address from the browser's address "
            "bar, paste it here and press Enter."
        )
    return read_paste


def _open_browser(url: str) -> bool:
    if not _may_have_a_browser():
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def _may_have_a_browser() -> bool:
    """False on a Unix machine without a graphical session (an SSH login): there
    webbrowser would start a text browser (lynx, w3m) in the terminal and wait for it,
    which cannot sign in to Google or Microsoft. $BROWSER, if set, is obeyed."""
    if os.environ.get("BROWSER") or sys.platform in ("darwin", "win32", "cygwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def answer_problem(params: Mapping[str, str], state: str | None) -> str | None:
    """What is wrong with an authorization response, or None. ``state=None`` skips the
    state check, for a pasted bare code (PKCE binds it to this run all the same)."""
    if state is not None:
        try:
            check_state(state, params.get("state"))
        except ConsentError as exc:
            return f"{exc} Nothing was saved."
    error = params.get("error")
    if error == "access_denied":
        return (
            "Consent was refused at the provider (access_denied). Nothing was saved. To "
            "connect the mailbox, run the command again, sign in with the account that "
            "should send, and allow access."
        )
    if error:
        description = params.get("error_description")
        detail = f"{error}: {description}" if description else error
        return (
            f"The provider ended the consent with an error ({detail}). Nothing was saved; "
            "check the provider's settings (client id, scopes, allowed redirect URIs) and "
            "run the command again."
        )
    if not params.get("code"):
        return (
            "The provider's answer has no authorization code. Nothing was saved; run the "
            "command again."
        )
    return None


@sensitive_variables()
def _exchange(
    provider: Provider, answer: Answer, redirect_uri: str, verifier: str
) -> ConsentResult:
    try:
        return provider.exchange_code(
            code=answer.params["code"], redirect_uri=redirect_uri, code_verifier=verifier
        )
    except (GrantRevoked, TokenEndpointError) as exc:
        raise ConsentError(
            f"The provider did not accept the authorization code ({as_clause(exc)}). Nothing "
            "was saved; run the command again (a code works once, for the run that asked "
            f"for it). If it fails again, check the client secret and that {redirect_uri} "
            "is an allowed redirect URI."
        ) from None


# Checking the saved credentials -----------------------------------------------------


@sensitive_variables()
def check_smtp_login(mailbox: Mailbox) -> SMTPEndpoint:
    """Log in to the mailbox's SMTP server (XOAUTH2 or OAUTHBEARER) and log out, sending
    nothing; the endpoint returned names the SASL mechanism used.

    Built like the backend's sessions (dispatch.py): a refused token is refreshed once
    through the token layer and tried again. Raises SMTPAuthenticationFailed or
    SMTPConnectionFailed with the package's explanations.
    """
    endpoint = get_provider(mailbox.provider, mailbox=mailbox.email).smtp_endpoint
    token = tokens.get_access_token(mailbox)
    mailbox_pk = mailbox.pk

    @sensitive_variables()
    async def token_source(rejected: str | None) -> str:
        if rejected is None:
            return token
        fresh = await run_orm(Mailbox.objects.get, pk=mailbox_pk)
        return await run_orm(tokens.get_access_token, fresh, rejected_token=rejected)

    session = SMTPSession(
        endpoint,
        mailbox.email,
        token_source,
        timeout=conf.SMTP_TIMEOUT,
        local_hostname=DNS_NAME.get_fqdn(),
        allow_insecure=conf.ALLOW_INSECURE_SMTP,
    )

    async def log_in_and_out() -> str | None:
        try:
            await session.open()
            return session.sasl_mechanism
        finally:
            await session.close()

    used = mail_loop.run(log_in_and_out())
    # The endpoint as logged in to: sasl_mechanism names the mechanism actually used.
    return dataclasses.replace(endpoint, sasl_mechanism=used or endpoint.sasl_mechanism)


# Output -------------------------------------------------------------------------------


def describe_moment(moment: dt.datetime | None) -> str:
    """A stored time in the site's time zone, to the minute; "-" for none."""
    if moment is None:
        return "-"
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M %Z")


def last_error_is_past(mailbox: Mailbox) -> bool:
    """True when a token refresh or a send succeeded after the last error was recorded:
    the error is history, not the mailbox's state (which its status tells)."""
    if not mailbox.last_error or mailbox.last_error_at is None:
        return False
    successes = (mailbox.last_refreshed_at, mailbox.last_sent_at)
    return any(moment is not None and moment > mailbox.last_error_at for moment in successes)


def describe_expiry(moment: dt.datetime | None) -> str:
    """``in 59 min`` or ``expired 2 h ago``; "-" for none."""
    if moment is None:
        return "-"
    seconds = (moment - timezone.now()).total_seconds()
    return f"in {_duration(seconds)}" if seconds > 0 else f"expired {_duration(-seconds)} ago"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, under an underlined header."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = ["-" * width for width in widths]
    return [line(headers).rstrip(), line(rule).rstrip(), *(line(row).rstrip() for row in rows)]
