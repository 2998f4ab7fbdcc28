"""Local stand-ins for a mail provider: an OAuth2 server and an XOAUTH2-only SMTP server.

Plain Python (stdlib ``http.server``, aiosmtpd, cryptography): nothing here needs Django or
the rest of the package. Import the modules themselves (``devserver.oauth``,
``devserver.smtp``, ``devserver.tls``) so that using the OAuth2 server alone does not require
aiosmtpd; ``django_xoauth2_mail.testing`` gathers them for tests.
"""
