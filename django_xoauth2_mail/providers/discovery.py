"""An authorization server's endpoints, read from its published metadata.

Given only the issuer URL, read RFC 8414's ``/.well-known/oauth-authorization-server``
document (the well-known part goes between the host and the issuer's path, RFC 8414
section 3.1) and the OpenID Connect ``{issuer}/.well-known/openid-configuration``. Real
servers put some endpoints in one and not the other (revocation in RFC 8414's, userinfo
in OpenID's), so both are read and merged, RFC 8414's values first.

Each document must name exactly the configured issuer (RFC 8414 section 3.3: otherwise
someone else's metadata could redirect our tokens), and PKCE with S256 must be offered
when the server says which methods it offers. The result is cached per process for
``DISCOVERY_CACHE_SECONDS``; a failed refetch keeps using the copy it has.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import TokenEndpointError, json_object

logger = logging.getLogger(__name__)

# Provider setting -> the metadata field that can stand in for it.
DISCOVERED_SETTINGS: Mapping[str, str] = {
    "AUTHORIZATION_URL": "authorization_endpoint",
    "TOKEN_URL": "token_endpoint",
    "REVOCATION_URL": "revocation_endpoint",
    "DEVICE_AUTHORIZATION_URL": "device_authorization_endpoint",
    "USERINFO_URL": "userinfo_endpoint",
}


class MetadataUnavailable(TokenEndpointError):
    """The metadata could not be read (network, 5xx, not published): temporary or not,
    it is reported like a token endpoint failure, never as a crash."""


@dataclasses.dataclass(frozen=True)
class ServerMetadata:
    """The merged metadata of one issuer, and where it was read."""

    issuer: str
    document: Mapping[str, Any]
    sources: tuple[str, ...]

    def endpoint(self, setting: str) -> str | None:
        """The discovered URL for a provider setting such as ``TOKEN_URL``."""
        value = self.document.get(DISCOVERED_SETTINGS[setting])
        return value if isinstance(value, str) and value else None

    @property
    def iss_parameter_supported(self) -> bool:
        """RFC 9207: the server adds ``iss`` to its authorization responses."""
        return self.document.get("authorization_response_iss_parameter_supported") is True


def rfc8414_url(issuer: str) -> str:
    """``https://host/.well-known/oauth-authorization-server/path`` for ``https://host/path``."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return urlunsplit(
        (parts.scheme, parts.netloc, f"/.well-known/oauth-authorization-server{path}", "", "")
    )


def openid_configuration_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 section 4: appended to the issuer."""
    return f"{issuer.rstrip('/')}/.well-known/openid-configuration"


def metadata_urls(issuer: str) -> tuple[str, str]:
    """Where metadata is read, in order of precedence."""
    return rfc8414_url(issuer), openid_configuration_url(issuer)


_cache: dict[str, tuple[float, ServerMetadata]] = {}
_cache_lock = threading.Lock()
_clock = time.monotonic  # a module attribute, so tests can move time forward


def clear_cache() -> None:
    """Forget every issuer's metadata (tests; or after the server changed)."""
    with _cache_lock:
        _cache.clear()


def server_metadata(issuer: str) -> ServerMetadata:
    """The issuer's metadata: cached while fresh, else fetched (at most HTTP_TIMEOUT per
    document). Raises ConfigurationError for metadata that must not be used and
    MetadataUnavailable when none could be read."""
    now = _clock()
    with _cache_lock:
        cached = _cache.get(issuer)
    if cached is not None and now - cached[0] < conf.DISCOVERY_CACHE_SECONDS:
        return cached[1]
    try:
        metadata = fetch_metadata(issuer)
    except MetadataUnavailable as exc:
        if cached is None:
            raise
        # A stale copy beats no mail: endpoints rarely move, and the copy was valid.
        logger.warning("Using cached metadata of %s: a refetch failed (%s)", issuer, exc)
        return cached[1]
    with _cache_lock:
        _cache[issuer] = (now, metadata)
    return metadata


def fetch_metadata(issuer: str) -> ServerMetadata:
    """Read, check and merge both documents; no cache."""
    documents: list[tuple[str, dict[str, Any]]] = []
    for url in metadata_urls(issuer):
        document = _fetch_document(url)
        if document is not None:
            documents.append((url, document))
    if not documents:
        urls = " and ".join(metadata_urls(issuer))
        raise MetadataUnavailable(
            f"the authorization server publishes no metadata for the ISSUER {issuer} (none at "
            f"{urls}); check ISSUER, or set the endpoint URLs (TOKEN_URL, ...) instead",
            retryable=False,
        )
    merged: dict[str, Any] = {}
    for url, document in reversed(documents):  # RFC 8414's last, so its values win
        _check_issuer(issuer, url, document)
        merged.update(document)
    _check_pkce(issuer, merged)
    return ServerMetadata(issuer, merged, tuple(url for url, _ in documents))


def _fetch_document(url: str) -> dict[str, Any] | None:
    """The JSON document at ``url``; None when the server does not publish it (4xx)."""
    try:
        response = requests.get(
            url, headers={"Accept": "application/json"}, timeout=conf.HTTP_TIMEOUT
        )
    except requests.Timeout:
        raise MetadataUnavailable(
            f"the metadata at {url} did not arrive within {conf.HTTP_TIMEOUT:g} s",
            retryable=True,
        ) from None
    except requests.RequestException as exc:
        raise MetadataUnavailable(
            f"the metadata at {url} could not be read ({type(exc).__name__})", retryable=True
        ) from None
    if 400 <= response.status_code < 500:
        return None
    if response.status_code != 200:
        raise MetadataUnavailable(
            f"the metadata at {url} answered HTTP {response.status_code}",
            retryable=response.status_code >= 500,
        )
    try:
        return json_object(url, response.status_code, response.content, check="ISSUER")
    except TokenEndpointError as exc:
        raise MetadataUnavailable(str(exc), retryable=False) from None


def _check_issuer(issuer: str, url: str, document: Mapping[str, Any]) -> None:
    if document.get("issuer") != issuer:
        raise ConfigurationError(
            f"The metadata at {url} names the issuer {document.get('issuer')!r}, not the "
            f"configured ISSUER {issuer!r}. RFC 8414 requires them to be identical, so it is "
            "not used. Set ISSUER to exactly the issuer the server names (trailing slash "
            "included), or, if that is not your server, fix the URL."
        )


def _check_pkce(issuer: str, document: Mapping[str, Any]) -> None:
    methods = document.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise ConfigurationError(
            f"The authorization server {issuer} does not offer PKCE with S256 "
            f"(code_challenge_methods_supported: {methods!r}); this package always uses it. "
            "Enable PKCE S256 for the client at the server."
        )
