"""The admin's consent flow: the Connect page, which sends the browser to the
provider, and the callback the provider sends it back to.

Both are served by MailboxAdmin.get_urls(), behind the admin's login. A flow
started on the Connect page is remembered in the session under its state, so
two tabs can each run one; the callback removes the entry before anything
else (single use), and accepts it only from the user who started it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import tokens
from django_xoauth2_mail.consent.flows import (
    ConsentError,
    check_issuer,
    check_state,
    make_pkce_pair,
    make_state,
    resolve_email,
    save_consent,
)
from django_xoauth2_mail.crypto import decrypt, encrypt
from django_xoauth2_mail.exceptions import EncryptionKeyError, XOAuth2MailError
from django_xoauth2_mail.forms import ConnectMailboxForm
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import ConsentResult, GrantRevoked, TokenEndpointError

SESSION_KEY = "xoauth2_mail_consent_flows"
# Providers' authorization codes live about 10 minutes; a flow older than this
# is an abandoned tab, or an old link being replayed.
FLOW_LIFETIME = 15 * 60
# Abandoned flows (closed tabs) must not grow the session without end.
MAX_PENDING_FLOWS = 10

if TYPE_CHECKING:
    # Subscriptable for the type checker only (django-stubs); annotations are
    # not evaluated at run time.
    MailboxAdmin: TypeAlias = admin.ModelAdmin[Mailbox]


@dataclasses.dataclass(frozen=True)
class PendingFlow:
    """What the callback needs from the start of a flow (JSON-serialisable)."""

    provider_id: str
    code_verifier: str = dataclasses.field(repr=False)
    redirect_uri: str
    requested_email: str | None
    user_id: str
    started_at: float
    # The person accepted that the typed address may not be checked (see _finish_flow).
    accept_unidentified: bool = False


# Each pending flow is kept sealed (encrypted with the package's token keys, see
# crypto.py): with cookie-based sessions the session lives in the browser, signed but
# readable, and the PKCE verifier must not. Its start time stays outside, for pruning
# and expiry; a cookie session is signed, so it cannot be moved either.


@sensitive_variables()
def remember_flow(request: HttpRequest, state: str, flow: PendingFlow) -> None:
    flows: dict[str, dict[str, Any]] = dict(request.session.get(SESSION_KEY, {}))
    secret_part = dataclasses.asdict(flow)
    started_at = secret_part.pop("started_at")
    flows[state] = {"started_at": started_at, "sealed": encrypt(json.dumps(secret_part))}
    newest = sorted(flows.items(), key=lambda item: float(item[1]["started_at"]))
    request.session[SESSION_KEY] = dict(newest[-MAX_PENDING_FLOWS:])


@sensitive_variables()
def take_flow(request: HttpRequest, state: str) -> PendingFlow | None:
    """Remove and return the flow started with ``state``, if this session has one."""
    flows: dict[str, dict[str, Any]] = dict(request.session.get(SESSION_KEY, {}))
    entry = flows.pop(state, None)
    request.session[SESSION_KEY] = flows
    # Saved now, not at the end of the response: a state stays spent even if
    # the code exchange below fails with an unexpected error. (Two callbacks
    # racing on one state can both read it; the provider's single-use code
    # then lets at most one of them through.)
    request.session.save()
    if entry is None:
        return None
    try:
        secret_part = json.loads(decrypt(str(entry.get("sealed", ""))))
        return PendingFlow(**secret_part, started_at=float(entry["started_at"]))
    except (EncryptionKeyError, ValueError, TypeError, KeyError):
        return None  # sealed under a key since changed, or not ours: an unknown flow


def admin_url(model_admin: MailboxAdmin, name: str, *args: Any) -> str:
    opts = model_admin.opts
    return reverse(
        f"{model_admin.admin_site.name}:{opts.app_label}_{opts.model_name}_{name}", args=args
    )


def require_change_permission(request: HttpRequest, model_admin: MailboxAdmin) -> None:
    if not model_admin.has_change_permission(request):
        raise PermissionDenied


# The Connect page -----------------------------------------------------------


def connect_view(request: HttpRequest, model_admin: MailboxAdmin) -> HttpResponse:
    require_change_permission(request, model_admin)
    # The address the provider must be told; it has to be registered there.
    redirect_uri = request.build_absolute_uri(admin_url(model_admin, "connect_callback"))
    reconnecting = _mailbox_from_query(request)
    if request.method == "POST":
        form = ConnectMailboxForm(request.POST)
        if form.is_valid():
            try:
                return _redirect_to_provider(request, form.cleaned_data, redirect_uri)
            except XOAuth2MailError as exc:
                messages.error(request, str(exc))
    elif reconnecting is not None:
        form = ConnectMailboxForm(
            initial={"provider": reconnecting.provider, "email": reconnecting.email}
        )
    else:
        form = ConnectMailboxForm()
    return _render_connect_page(request, model_admin, form, redirect_uri, reconnecting)


def _mailbox_from_query(request: HttpRequest) -> Mailbox | None:
    """The mailbox a Reconnect link names (?mailbox=<pk>), to preselect its values."""
    pk = request.GET.get("mailbox", "")
    if not pk.isdigit():
        return None
    # Its tokens are not needed here, and may not decrypt: reconnecting is the cure.
    return Mailbox.objects.defer(*tokens.TOKEN_FIELDS).filter(pk=int(pk)).first()


def _render_connect_page(
    request: HttpRequest,
    model_admin: MailboxAdmin,
    form: ConnectMailboxForm,
    redirect_uri: str,
    reconnecting: Mailbox | None,
) -> HttpResponse:
    provider_choices = dict(form.provider_choices)
    title = (
        _("Reconnect %(email)s") % {"email": reconnecting.email}
        if reconnecting
        else _("Connect a mailbox")
    )
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": title,
        "form": form,
        "redirect_uri": redirect_uri,
        "has_providers": bool(provider_choices),
        "reconnecting": reconnecting,
        "reconnect_provider_missing": reconnecting is not None
        and reconnecting.provider not in provider_choices,
        "media": model_admin.media + form.media,
    }
    return TemplateResponse(request, "admin/django_xoauth2_mail/mailbox/connect.html", context)


@sensitive_variables()
def _redirect_to_provider(
    request: HttpRequest, data: dict[str, Any], redirect_uri: str
) -> HttpResponse:
    provider_id: str = data["provider"]
    email: str | None = data["email"] or None
    state, pkce = make_state(), make_pkce_pair()
    try:
        url = get_provider(provider_id).authorization_url(
            redirect_uri=redirect_uri, state=state, code_challenge=pkce.challenge, login_hint=email
        )
    except (TokenEndpointError, OSError) as exc:
        # Adapters built on a provider's library may fetch its metadata first.
        raise XOAuth2MailError(
            f"Could not start the consent at the {provider_id} provider ({exc}). Nothing was "
            "changed; try again, and check the provider's settings if it persists."
        ) from exc
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # E.g. the oauth2 provider without AUTHORIZATION_URL: never follow a
        # relative URL, it would land back on this site.
        raise XOAuth2MailError(
            f"The {provider_id} provider has no authorization URL to send you to. Set its "
            f"AUTHORIZATION_URL in XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}] and try again."
        )
    remember_flow(
        request,
        state,
        PendingFlow(
            provider_id=provider_id,
            code_verifier=pkce.verifier,
            redirect_uri=redirect_uri,
            requested_email=email,
            user_id=str(request.user.pk),
            started_at=time.time(),
            accept_unidentified=bool(data.get("accept_unidentified")),
        ),
    )
    return HttpResponseRedirect(url)


# The callback -----------------------------------------------------------------


# The frames below hold the verifier, the code and the new tokens: an unexpected
# error must not put them in the report mailed to ADMINS.
@sensitive_variables()
def callback_view(request: HttpRequest, model_admin: MailboxAdmin) -> HttpResponse:
    require_change_permission(request, model_admin)
    try:
        mailbox, created = _finish_flow(request)
    except XOAuth2MailError as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(admin_url(model_admin, "changelist"))
    if created:
        model_admin.log_addition(request, mailbox, "Connected through the OAuth2 consent flow.")
        text = _("Connected %(email)s: mail from it now goes out with OAuth2 (%(provider)s).")
    else:
        model_admin.log_change(request, mailbox, "Reconnected through the OAuth2 consent flow.")
        text = _("Reconnected %(email)s: mail from it goes out with OAuth2 again (%(provider)s).")
    text += " " + _("To check it, click “Send a test email” above.")
    messages.success(request, text % {"email": mailbox.email, "provider": mailbox.provider})
    return HttpResponseRedirect(admin_url(model_admin, "change", mailbox.pk))


@sensitive_variables()
def _finish_flow(request: HttpRequest) -> tuple[Mailbox, bool]:
    """Check the answer, trade the code for tokens and save them: (mailbox, created)."""
    flow = _take_checked_flow(request)
    # The code is redeemed only at the provider that started the flow, and only if
    # the answer does not say another server sent it (RFC 9207): see check_issuer.
    provider = get_provider(flow.provider_id)
    check_issuer(provider, request.GET.get("iss"))
    _raise_for_provider_error(request)
    code = request.GET.get("code")
    if not code:
        raise ConsentError(
            _(
                "The provider's answer has no authorization code. Nothing was saved; click "
                "“Connect mailbox” to start again."
            )
        )
    try:
        result = provider.exchange_code(
            code=code, redirect_uri=flow.redirect_uri, code_verifier=flow.code_verifier
        )
    except (GrantRevoked, TokenEndpointError, OSError) as exc:
        raise ConsentError(
            _(
                "The provider did not accept the authorization code (%(detail)s). Nothing was "
                "saved; click “Connect mailbox” to start again, and if it fails again check "
                "the client secret and that %(uri)s is registered as a redirect URI."
            )
            % {"detail": exc, "uri": flow.redirect_uri}
        ) from exc
    email = resolve_email(result, flow.requested_email)
    created = not Mailbox.objects.filter(email=email).exists()
    if result.email is None and not created and not flow.accept_unidentified:
        _refuse_unidentified(flow, result, email)
    return save_consent(flow.provider_id, result, flow.requested_email), created


@sensitive_variables()
def _refuse_unidentified(flow: PendingFlow, result: ConsentResult, email: str) -> None:
    """An address typed in the form is all that names the account: it must not replace
    a working mailbox's grant (anyone consenting as another account would take it over)."""
    tokens.revoke_at_provider(flow.provider_id, result.refresh_token or result.access_token)
    raise ConsentError(
        _(
            "The provider did not say which account gave consent, so this grant cannot "
            "safely replace the one of the existing mailbox %(email)s. Nothing was saved "
            "(the new grant was given back to the provider). If you signed in at the "
            "provider as %(email)s, click “Connect mailbox” again and tick “Replace an "
            "existing mailbox's grant even if the provider does not say who consented”; "
            "better, configure the provider to return the address (USERINFO_URL, or the "
            "openid and email scopes)."
        )
        % {"email": email}
    )


def _take_checked_flow(request: HttpRequest) -> PendingFlow:
    state = request.GET.get("state")
    if not state:
        raise ConsentError(
            _(
                "The provider's answer carries no state, so it cannot be matched to a "
                "connection you started. Nothing was saved; click “Connect mailbox” to start "
                "again."
            )
        )
    flow = take_flow(request, state)
    # Unknown (never started here, or already used) and foreign (started by
    # another user) look the same to the caller on purpose.
    ours = flow is not None and flow.user_id == str(request.user.pk)
    check_state(state if ours else None, state)
    assert flow is not None
    if time.time() - flow.started_at > FLOW_LIFETIME:
        raise ConsentError(
            _(
                "This connection was started more than %(minutes)d minutes ago and has "
                "expired. Nothing was saved; click “Connect mailbox” to start again."
            )
            % {"minutes": FLOW_LIFETIME // 60}
        )
    return flow


def _raise_for_provider_error(request: HttpRequest) -> None:
    error = request.GET.get("error")
    if not error:
        return
    if error == "access_denied":
        raise ConsentError(
            _(
                "Consent was refused at the provider (access_denied), so nothing was saved. "
                "To connect the mailbox, click “Connect mailbox” again, sign in with the "
                "account that should send, and allow access."
            )
        )
    description = request.GET.get("error_description")
    detail = f"{error}: {description}" if description else error
    raise ConsentError(
        _(
            "The provider ended the consent with an error (%(detail)s). Nothing was saved; "
            "check the provider's settings (client id, scopes, registered redirect URI) and "
            "start again."
        )
        % {"detail": detail}
    )
