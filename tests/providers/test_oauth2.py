"""The oauth2 provider's authorization request, against the local OAuth2 server."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from django_xoauth2_mail.consent.flows import make_pkce_pair, make_state
from django_xoauth2_mail.providers.oauth2 import OAuth2Provider
from tests.conftest import SENDER
from tests.providers.conftest import approve

REDIRECT_URI = "http://127.0.0.1:8400/"


@pytest.mark.django_db
def test_an_authorization_url_with_a_query_keeps_it_and_gets_one_question_mark(
    oauth2_settings, oauth2_server
):
    provider_settings = oauth2_settings["PROVIDERS"]["oauth2"]
    # A query of the endpoint's own (RFC 6749 3.1: to be kept), and a parameter of ours
    # that the configured URL also sets (it may appear only once: ours wins).
    provider_settings["AUTHORIZATION_URL"] += "?realm=mail&state=stale"
    provider, pkce, state = OAuth2Provider(provider_settings), make_pkce_pair(), make_state()

    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=pkce.challenge
    )

    assert url.count("?") == 1
    pairs = parse_qsl(urlsplit(url).query)
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names))
    assert dict(pairs)["realm"] == "mail" and dict(pairs)["state"] == state
    assert dict(pairs)["code_challenge"] == pkce.challenge
    # The real server reads every parameter: consent, then the code is redeemed.
    answer = approve(url, SENDER)
    assert answer["state"] == state
    result = provider.exchange_code(
        code=answer["code"], redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier
    )
    assert result.access_token
