"""The consent step of the development OAuth2 server (RFC 6749 section 4.1.1, PKCE required).

The authorization endpoint checks the request, shows the consent page (or grants at once
with ``auto_approve`` and a ``login_hint``), and redirects back with a code or an error.
"""

from __future__ import annotations

import html
import secrets
import time
from urllib.parse import urlsplit

from .oauth_http import Request, Response, page, redirect
from .oauth_store import Client, Code, OAuth2Store
from .tls import is_loopback_host

__all__ = ["CODE_LIFETIME", "authorize"]

CODE_LIFETIME = 600
# The authorization request's parameters, carried through the consent form.
_CONSENT_FIELDS = (
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
    "code_challenge", "code_challenge_method",
)  # fmt: skip


def authorize(request: Request, store: OAuth2Store, *, auto_approve: bool, issuer: str) -> Response:
    """The authorization endpoint: a consent page, or a redirect with a code or an error.

    Every redirect names this server in ``iss`` (RFC 9207), as its metadata announces.
    """
    params = request.params
    with store.lock:
        client = store.clients.get(params.get("client_id", ""))
    if client is None:
        return page(400, "Unknown client", "<p>No client with this client_id is registered.</p>")
    redirect_uri = params.get("redirect_uri", "")
    if not redirect_uri and client.redirect_uris and len(client.redirect_uris) == 1:
        redirect_uri = client.redirect_uris[0]
    if not _redirect_allowed(client, redirect_uri):
        # Never redirect to an unregistered address (RFC 6749 section 4.1.2.1).
        return page(400, "Redirect URI not allowed", "<p>Register it with the client.</p>")
    state = params.get("state")
    problem = _authorization_request_problem(params)
    if problem is not None:
        return redirect(
            redirect_uri,
            error=problem[0],
            error_description=problem[1],
            state=state,
            iss=issuer,
        )
    email = params.get("email") or params.get("login_hint", "")
    if request.method == "POST":
        if params.get("decision") != "allow":
            return redirect(redirect_uri, error="access_denied", state=state, iss=issuer)
        if "@" not in email:
            return _consent_page(request, redirect_uri, "Enter the address to act as.")
    elif not (auto_approve and "@" in email):
        return _consent_page(request, redirect_uri)
    code = secrets.token_urlsafe(32)
    with store.lock:
        store.codes[code] = Code(
            params["client_id"], redirect_uri, email, params.get("scope", ""),
            params["code_challenge"], params.get("nonce"), time.time() + CODE_LIFETIME,
        )  # fmt: skip
        store.save()
    return redirect(redirect_uri, code=code, state=state, iss=issuer)


def _consent_page(request: Request, redirect_uri: str, problem: str = "") -> Response:
    params = dict(request.params, redirect_uri=redirect_uri)
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
        for name in _CONSENT_FIELDS
        if name in params
    )
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in params.get("scope", "").split())
    email = html.escape(params.get("email") or params.get("login_hint", ""))
    body = (
        (f"<p class='error'>{html.escape(problem)}</p>" if problem else "")
        + f"<p>Client <code>{html.escape(params['client_id'])}</code> asks for:</p>"
        + f"<ul>{scopes}</ul><form method='post' action='{html.escape(request.path)}'>"
        + f"{hidden}<label>Email address <input type='email' name='email' value='{email}' "
        + "required></label> <button name='decision' value='allow'>Allow</button> "
        + "<button name='decision' value='deny' formnovalidate>Deny</button></form>"
    )
    return page(400 if problem else 200, "Authorize access", body)


def _redirect_allowed(client: Client, uri: str) -> bool:
    if client.redirect_uris is not None:
        return uri in client.redirect_uris
    parts = urlsplit(uri)
    return (
        parts.scheme in ("http", "https")
        and is_loopback_host(parts.hostname or "")
        and not parts.fragment
    )


def _authorization_request_problem(params: dict[str, str]) -> tuple[str, str] | None:
    if params.get("response_type") != "code":
        return "unsupported_response_type", "Only response_type=code is supported."
    if not params.get("code_challenge"):
        return "invalid_request", "PKCE is required: send code_challenge with method S256."
    if params.get("code_challenge_method") != "S256":
        return "invalid_request", "code_challenge_method must be S256 (plain is refused)."
    return None
