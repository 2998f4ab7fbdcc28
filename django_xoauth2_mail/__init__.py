"""Send Django mail over SMTP with OAuth2 (SASL XOAUTH2)."""

__version__ = "0.1.0.dev0"
