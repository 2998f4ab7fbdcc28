"""``manage.py connect_mailbox PROVIDER``: consent at the provider, save the Mailbox, and
check the new credentials with an SMTP login."""

from __future__ import annotations

import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from django_xoauth2_mail.conf import PROVIDER_IDS
from django_xoauth2_mail.consent.cli import (
    LoopbackOptions,
    check_smtp_login,
    command_errors,
    consent_by_loopback,
    describe_expiry,
    describe_moment,
    unreachable_hint,
)
from django_xoauth2_mail.consent.device_flow import consent_by_device
from django_xoauth2_mail.consent.flows import ConsentError, resolve_email, save_consent
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox, MailboxStatus, normalize_address
from django_xoauth2_mail.providers import configured_provider_ids, discovery, get_provider
from django_xoauth2_mail.providers.base import ConsentResult, Provider, TokenEndpointError
from django_xoauth2_mail.providers.oauth2 import OAuth2Provider
from django_xoauth2_mail.tokens import get_access_token

# Providers whose consent runs the device flow unless --loopback is given: Microsoft's
# works for SMTP and suits servers without a browser. Google refuses its mail scope there.
DEVICE_FLOW_BY_DEFAULT = frozenset({"microsoft"})
# Ctrl-C: the shell's convention for a command ended by SIGINT.
INTERRUPTED = 130


class Command(BaseCommand):
    help = (
        "Connect a mailbox: sign in at the provider and allow access, and the mailbox's "
        "OAuth2 credentials are saved (encrypted), then checked with an SMTP login. Run it "
        "again to reconnect a mailbox."
    )
    stealth_options = ("stdin",)  # call_command(..., stdin=...) for the paste flow

    def add_arguments(self, parser: ArgumentParser) -> None:
        # Configured providers first: they are the ones that can work now.
        configured = configured_provider_ids()
        others = [provider_id for provider_id in PROVIDER_IDS if provider_id not in configured]
        parser.add_argument(
            "provider",
            choices=[*configured, *others],
            help="The provider id. Configured in XOAUTH2_MAIL['PROVIDERS']: "
            f"{', '.join(configured) or 'none yet'}"
            + (f"; {', '.join(others)} must be added there first." if others else "."),
        )
        parser.add_argument(
            "--email",
            metavar="ADDRESS",
            help="The mailbox's address. Optional: the provider says which account "
            "consented; when both are known they must match.",
        )
        parser.add_argument(
            "--no-browser",
            action="store_true",
            help="Do not open a browser; print the address, and accept the address the "
            "browser ended at (or the code) pasted here. For machines without a browser.",
        )
        flows = parser.add_mutually_exclusive_group()
        flows.add_argument(
            "--loopback",
            action="store_true",
            help="Use the browser redirect to 127.0.0.1 (the default, except for microsoft).",
        )
        flows.add_argument(
            "--device",
            action="store_true",
            help="Use the device-code flow: enter a code at the provider's page from any "
            "device (the default for microsoft; not offered by Google for mail).",
        )
        parser.add_argument(
            "--port",
            type=int,
            default=0,
            help="Port of the local redirect address http://127.0.0.1:PORT/ (default 0: any "
            "free port; Google 'Desktop app' clients accept any port).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            metavar="SECONDS",
            default=300.0,
            help="Seconds to wait for the consent (default 300).",
        )
        parser.add_argument(
            "--no-consent",
            action="store_true",
            help="Add a mailbox that needs no consent, with --email: a Google Workspace "
            "service account with domain-wide delegation, or Microsoft 365 APP_ONLY.",
        )
        parser.add_argument(
            "--no-verify",
            action="store_true",
            help="Do not check the new credentials with an SMTP login.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Connect nothing: read the oauth2 provider's ISSUER metadata now and print "
            "the endpoints it names and the ones in use.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdin = options.get("stdin") or sys.stdin
        _check_numbers(options)
        with command_errors():
            provider = get_provider(options["provider"])
            if options["check"]:
                self._print_discovery(provider)
                return
            if options["no_consent"]:
                mailbox, was = self._add_without_consent(provider, options["email"])
            else:
                result = self._consent(provider, options)
                mailbox, was = self._save(provider, result, options["email"])
        self._report(provider, mailbox, was)
        if not options["no_verify"]:
            self._verify(mailbox)

    def say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()  # a script reading the output through a pipe sees it now

    def warn(self, line: str) -> None:
        self.stderr.write(line)
        self.stderr.flush()

    # Consent ----------------------------------------------------------------------

    def _consent(self, provider: Provider, options: dict[str, Any]) -> ConsentResult:
        try:
            if self._use_device_flow(provider, options):
                return consent_by_device(provider, options["timeout"], self.say)
            loopback = LoopbackOptions(
                port=options["port"],
                timeout=options["timeout"],
                open_browser=not options["no_browser"],
                read_paste=options["no_browser"],
                stdin=self.stdin,
            )
            return consent_by_loopback(provider, options["email"], loopback, self.say, self.warn)
        except KeyboardInterrupt:
            raise CommandError(
                "Interrupted (Ctrl-C) before the consent finished: nothing was saved. Run "
                "the command again to connect the mailbox.",
                returncode=INTERRUPTED,
            ) from None

    @staticmethod
    def _use_device_flow(provider: Provider, options: dict[str, Any]) -> bool:
        if options["device"] and not provider.supports_device_flow:
            raise CommandError(
                f"{provider.name} offers no device-code flow for sending mail. Leave out "
                "--device to use the browser redirect (with --no-browser on a machine "
                "without a browser)."
            )
        device = options["device"] or (
            provider.id in DEVICE_FLOW_BY_DEFAULT
            and provider.supports_device_flow
            and not options["loopback"]
        )
        if device and options["port"]:
            raise CommandError(
                "--port applies to the browser redirect, not to the device-code flow: add "
                "--loopback to use the redirect, or leave out --port."
            )
        return device

    def _save(
        self, provider: Provider, result: ConsentResult, email: str | None
    ) -> tuple[Mailbox, str | None]:
        """Save the consent; also the mailbox's status before (None: it is new)."""
        try:
            address = resolve_email(result, email)
        except ConsentError as exc:
            raise ConsentError(f"{exc} Nothing was saved.") from None
        if result.email is None:
            self._warn_unidentified(provider, address)
        before = Mailbox.objects.filter(email=address).values_list("status", flat=True).first()
        return save_consent(provider.id, result, email), before

    def _warn_unidentified(self, provider: Provider, address: str) -> None:
        # --email keeps its documented meaning, but nothing checked it: say so.
        replaces = Mailbox.objects.filter(email=address).exists()
        self.warn(
            f"Warning: {provider.name} did not say which account gave consent, so the grant "
            f"is saved for {address} as given with --email, unchecked. Make sure you signed "
            f"in as {address}: another account's grant would send its mail as {address}"
            + (" and replaces the grant this mailbox had." if replaces else ".")
        )

    @staticmethod
    def _add_without_consent(provider: Provider, email: str | None) -> tuple[Mailbox, str | None]:
        if not provider.consent_free:
            raise CommandError(
                f"--no-consent needs a {provider.name} configuration that mints tokens without "
                "a person: SERVICE_ACCOUNT_FILE or SERVICE_ACCOUNT_INFO for google, APP_ONLY "
                "for microsoft. Leave out --no-consent to sign in instead."
            )
        if not email:
            raise CommandError("--no-consent needs --email: the mailbox to send as.")
        address = normalize_address(email)
        before = Mailbox.objects.filter(email=address).values_list("status", flat=True).first()
        mailbox = Mailbox.objects.filter(email=address).first() or Mailbox(email=address)
        mailbox.provider = provider.id
        mailbox.refresh_token = mailbox.access_token = None
        mailbox.access_token_expires_at = None
        mailbox.status = MailboxStatus.CONNECTED
        mailbox.last_error, mailbox.last_error_at = "", None
        with transaction.atomic():  # a mailbox whose first token fails is not kept
            mailbox.save()
            # The first token, now: proves the delegation or app permission works.
            get_access_token(mailbox)
        return mailbox, before

    # Report and check ---------------------------------------------------------------

    def _report(self, provider: Provider, mailbox: Mailbox, was: str | None) -> None:
        if was is None:
            what = "Connected"
        elif was == MailboxStatus.CONNECTED:
            what = "Reconnected"
        else:
            what = (
                f"Reconnected (it was {str(MailboxStatus(was).label).lower()}; it can send again)"
            )
        self.say("")
        self.say(
            self.style.SUCCESS(f"{what}: {mailbox.email} with {provider.name} ({provider.id}).")
        )
        self.say(f"  Scopes granted: {mailbox.scopes or '(the provider did not say)'}")
        expiry = mailbox.access_token_expires_at
        self.say(
            f"  Access token expires {describe_moment(expiry)} ({describe_expiry(expiry)}); "
            "it is refreshed automatically."
        )
        if mailbox.refresh_token:
            self.say("  Refresh token saved (encrypted).")
        elif provider.consent_free:
            self.say("  No refresh token needed: tokens are minted for this mailbox as needed.")
        else:
            self.warn(
                "  The provider gave no refresh token: sending stops when the access token "
                "expires. Check that the provider grants offline access to this client, "
                "then connect again."
            )

    def _verify(self, mailbox: Mailbox) -> None:
        try:
            endpoint = check_smtp_login(mailbox)
        except KeyboardInterrupt:
            raise CommandError(
                f"Interrupted (Ctrl-C) during the SMTP login check. {mailbox.email} is saved; "
                f"`python manage.py send_test_email {mailbox.email}` checks it.",
                returncode=INTERRUPTED,
            ) from None
        except XOAuth2MailError as exc:
            _record_error(mailbox, str(exc))
            raise CommandError(
                f"{mailbox.email} is saved, but the SMTP login check failed: {exc} "
                f"{unreachable_hint(mailbox, exc)}When that is fixed, `python manage.py "
                f"send_test_email {mailbox.email}` checks again (connect_mailbox --no-verify "
                "skips this check)."
            ) from None
        self.say(f"  SMTP login to {endpoint.host}:{endpoint.port} OK ({endpoint.sasl_mechanism}).")

    # --check ------------------------------------------------------------------------

    def _print_discovery(self, provider: Provider) -> None:
        if not isinstance(provider, OAuth2Provider) or not provider.issuer:
            raise CommandError(
                f"--check reads the metadata of an oauth2 provider's ISSUER; "
                f"XOAUTH2_MAIL['PROVIDERS'][{provider.id!r}] has no ISSUER."
            )
        try:
            metadata = discovery.fetch_metadata(provider.issuer)
        except TokenEndpointError as exc:
            raise CommandError(
                f"Could not read the metadata of {provider.issuer}: {exc}."
            ) from None
        self.say(self.style.SUCCESS(f"Issuer {metadata.issuer}: metadata read and checked."))
        for url in metadata.sources:
            self.say(f"  Read {url}")
        for setting in discovery.DISCOVERED_SETTINGS:
            found = metadata.endpoint(setting) or "-"
            explicit = provider.settings.get(setting)
            used = f"  (set explicitly: {explicit} is used)" if explicit else ""
            self.say(f"  {setting:<25} {found}{used}")
        methods = metadata.document.get("code_challenge_methods_supported")
        self.say(f"  PKCE methods              {' '.join(methods) if methods else '(not said)'}")
        iss = "yes: the iss check is on" if metadata.iss_parameter_supported else "no"
        self.say(f"  RFC 9207 iss parameter    {iss}")
        if not (metadata.endpoint("TOKEN_URL") or provider.settings.get("TOKEN_URL")):
            self.warn("  No token endpoint: set TOKEN_URL.")


def _check_numbers(options: dict[str, Any]) -> None:
    if not 0 <= options["port"] <= 65535:
        raise CommandError(f"--port must be 0 to 65535 (0: any free port), not {options['port']}.")
    if not options["timeout"] > 0:
        raise CommandError(
            f"--timeout must be a positive number of seconds, not {options['timeout']:g}."
        )


def _record_error(mailbox: Mailbox, error: str) -> None:
    # For list_mailboxes to show; connecting the mailbox again clears it.
    Mailbox.objects.filter(pk=mailbox.pk).update(last_error=error, last_error_at=timezone.now())
