"""The admin's Connect flow in a real browser: Chromium (through Playwright)
against pytest-django's live_server and the local OAuth2 server's consent page.

Needs the ``playwright`` Python package and Debian's Chromium at
/usr/bin/chromium (``apt-get install chromium``); Playwright's own browser
download is not used. Skipped when either is missing, unless CI is set.

``XOAUTH2_MAIL_SCREENSHOTS=1`` also saves the screenshots that docs/admin.rst
shows into docs/_static/screenshots/.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.test.utils import override_settings

from django_xoauth2_mail.models import Mailbox, MailboxStatus
from tests.conftest import SENDER, make_mailbox

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "_static" / "screenshots"
USERNAME, PASSWORD, STAFF_EMAIL = "mailadmin", "browser-test-password", "mailadmin@example.org"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="session", autouse=True)
def _admin_static_files() -> Iterator[None]:
    """Serve the admin's CSS from the live server, so the pages (and the
    screenshots) look as they do on a real site. live_server is session-scoped
    and reads STATIC_ROOT when it starts, so this is session-scoped and autouse.
    """
    admin_static = Path(django.__file__).parent / "contrib" / "admin" / "static"
    with override_settings(STATIC_ROOT=str(admin_static)):
        yield


def require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if not missing:
        return
    reason = "The browser test needs " + " and ".join(missing) + "."
    if os.environ.get("CI"):
        pytest.fail(f"{reason} CI is set, so a missing browser is an error, not a skip.")
    pytest.skip(reason)


@contextlib.contextmanager
def chromium_page() -> Iterator[Any]:
    """A Playwright page in Debian's Chromium. No ORM inside: Playwright's
    sync API runs an event loop in this thread, which Django refuses."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 720})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> None:
    if os.environ.get("XOAUTH2_MAIL_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


@pytest.fixture
def browser_site(oauth2_settings, oauth2_server, real_backend, django_user_model, settings):
    """The provider set up as a site would, a staff user, and a flagged
    mailbox so the change list shows both states."""
    require_browser()
    settings.SERVER_EMAIL = SENDER  # as the quickstart says: error reports can go out
    oauth2_settings["PROVIDERS"]["oauth2"] |= {
        "USERINFO_URL": oauth2_server.userinfo_url,
        "REVOCATION_URL": oauth2_server.revocation_url,
        # Shown on the consent page and the mailbox, as a real provider's would be.
        "SCOPES": ["openid", "email", "mail.send"],
    }
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(USERNAME, STAFF_EMAIL, PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="django_xoauth2_mail")
    )
    flagged = make_mailbox(oauth2_server, "alerts@example.com")
    flagged.status = MailboxStatus.RECONNECT_REQUIRED
    flagged.last_error = "invalid_grant: Token has been expired or revoked."
    flagged.save()
    return flagged


def log_in(page: Any, base_url: str) -> None:
    page.goto(f"{base_url}/admin/django_xoauth2_mail/mailbox/")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r"/admin/django_xoauth2_mail/mailbox/$"))
    # Fold the navigation sidebar away (remembered by the browser), to give the
    # change list's columns the room they have on a wide screen.
    page.click("#toggle-nav-sidebar")


def connect_through_consent_page(page: Any) -> None:
    page.get_by_role("link", name="Connect mailbox").click()
    page.wait_for_url(re.compile(r"/mailbox/connect/$"))
    page.select_option("#id_provider", "oauth2")
    page.fill("#id_email", SENDER)
    screenshot(page, "admin-connect")
    page.get_by_role("button", name="Continue to the provider").click()
    # Now on the OAuth2 server's own consent page, as at Google or Microsoft.
    page.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/authorize\?"))
    assert page.locator("h1").inner_text() == "Authorize access"
    assert page.input_value("input[name=email]") == SENDER  # the login hint
    screenshot(page, "admin-consent")
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(r"/admin/django_xoauth2_mail/mailbox/\d+/change/$"))


def send_test_email(page: Any) -> str:
    page.locator("tr", has_text=SENDER).locator("input.action-select").check()
    page.select_option("select[name=action]", "send_test_email")
    page.locator("button[name=index]").click()
    message = page.locator(".messagelist .success")
    message.wait_for()
    return str(message.inner_text())


def test_connect_a_mailbox_and_send_a_test_email(
    live_server, browser_site, oauth2_server, xoauth2_smtp_server
):
    with chromium_page() as page:
        log_in(page, live_server.url)
        connect_through_consent_page(page)
        connected_message = page.locator(".messagelist .success").inner_text()
        status = page.locator(".field-status_badge .readonly").inner_text()
        screenshot(page, "admin-mailbox-connected")

        page.get_by_role("link", name="Mailboxes").last.click()
        page.wait_for_url(re.compile(r"/admin/django_xoauth2_mail/mailbox/$"))
        row = page.locator("tr", has_text="alerts@example.com")
        assert row.get_by_role("link", name="Reconnect").is_visible()
        screenshot(page, "admin-changelist")
        sent_message = send_test_email(page)
        received = list(xoauth2_smtp_server.messages)

    assert connected_message.startswith(f"Connected {SENDER}: ")
    assert status == "Connected"
    assert sent_message == (
        f"Sent a test email from {SENDER} to {STAFF_EMAIL} over SMTP with XOAUTH2; "
        "check that it arrived."
    )
    assert [(m.mail_from, m.rcpt_tos, m.auth_user) for m in received] == [
        (SENDER, [STAFF_EMAIL], SENDER)
    ]
    mailbox = Mailbox.objects.get(email=SENDER)
    assert mailbox.status == MailboxStatus.CONNECTED
    assert oauth2_server.validate_access_token(SENDER, mailbox.access_token)
