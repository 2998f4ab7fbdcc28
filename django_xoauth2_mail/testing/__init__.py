"""Servers for testing code that sends mail over SMTP with OAuth2 (XOAUTH2 or OAUTHBEARER),
in your own test suite.

Needs the ``testing`` extra (aiosmtpd). pytest users can load ready-made fixtures with
``pytest_plugins = ["django_xoauth2_mail.testing.fixtures"]``.
"""

from django_xoauth2_mail.devserver.oauth import OAuth2Server
from django_xoauth2_mail.devserver.smtp import MECHANISMS as SASL_MECHANISMS
from django_xoauth2_mail.devserver.smtp import AuthAttempt, ReceivedMessage, XOAuth2SMTPServer
from django_xoauth2_mail.devserver.tls import make_self_signed_certificate

__all__ = [
    "AuthAttempt",
    "SASL_MECHANISMS",
    "OAuth2Server",
    "ReceivedMessage",
    "XOAuth2SMTPServer",
    "make_self_signed_certificate",
]
