"""Keep the providers' libraries from logging credentials at DEBUG.

Two loggers of the libraries we call write credentials when a site turns DEBUG on for
every logger (as people do while chasing a problem, often with a JSON formatter that
records each record's ``extra``):

* google-auth's ``google.auth.transport.requests`` logs every token request with its
  body in ``extra["httpRequest"]``. It hashes refresh tokens and client secrets, not the
  service account's signed JWT ``assertion``, which buys access tokens for any mailbox of
  the domain for about an hour.
* msal's ``msal.token_cache`` logs every token event with the request data. It masks the
  client secret and refresh token, not the authorization ``code``, the PKCE
  ``code_verifier`` or the ``device_code``.

While this package is inside a call that sends such credentials, a filter on those
loggers drops their DEBUG records: the same effect as keeping them at INFO around the
call, without touching their levels. The flag is a context variable, so another thread
logging through the same library at the same time keeps its DEBUG output.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

GOOGLE_CREDENTIAL_LOGGERS = ("google.auth.transport.requests",)
MSAL_CREDENTIAL_LOGGERS = ("msal.token_cache",)

_carrying_credentials = contextvars.ContextVar("xoauth2_mail_carrying_credentials", default=False)


class _DropDebugWhileCarryingCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG or not _carrying_credentials.get()


_FILTER = _DropDebugWhileCarryingCredentials()


@contextlib.contextmanager
def credentials_kept_out_of_debug_logs(logger_names: tuple[str, ...]) -> Iterator[None]:
    """Drop the DEBUG records of ``logger_names`` made in this context, until it ends."""
    for name in logger_names:
        # Checked on every call: a logging.config.dictConfig() run later does not remove
        # it, but a site could replace the logger's filters.
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    reset = _carrying_credentials.set(True)
    try:
        yield
    finally:
        _carrying_credentials.reset(reset)
