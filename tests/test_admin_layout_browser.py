"""Every admin page of the package in Chromium at 1280 and 1920 px wide, as a newcomer
sees it (navigation sidebar open): nothing hides behind a horizontal scroll bar."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.utils import timezone

from django_xoauth2_mail.models import Mailbox
from tests.conftest import make_mailbox
from tests.test_admin_browser import (
    PASSWORD,
    USERNAME,
    _admin_static_files,  # noqa: F401 (session fixture: the admin's CSS)
    browser_site,  # noqa: F401 (fixture)
    chromium_page,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

BASE = "/admin/django_xoauth2_mail/mailbox/"
# A real error is long; the list must still fit.
LONG_ERROR = (
    "Could not refresh the access token of alerts@example.com: the token endpoint "
    "https://login.microsoftonline.com/common/oauth2/v2.0/token did not answer within 10 s. "
    "Nothing was sent; try again later, and check the provider's settings if it persists."
)
# Horizontal overflow of the page, and of the change list's table inside its box.
OVERFLOW = """() => {
    const page = document.documentElement.scrollWidth - window.innerWidth;
    const results = document.querySelector('#changelist .results');
    const table = results ? results.scrollWidth - results.clientWidth : 0;
    return [page, table];
}"""


def log_in_as_newcomer(page: Any, base_url: str) -> None:
    page.goto(f"{base_url}{BASE}")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(f"{BASE}$"))


@pytest.mark.parametrize("width", [1280, 1920])
def test_admin_pages_fit_the_screen(live_server, browser_site, oauth2_server, width):  # noqa: F811
    flagged = browser_site
    Mailbox.objects.filter(pk=flagged.pk).update(last_error=LONG_ERROR)
    # A connected mailbox with every column filled: dates, and an error it recovered from.
    healthy = make_mailbox(oauth2_server, "newsletter-sender@example.com", fresh=True)
    Mailbox.objects.filter(pk=healthy.pk).update(
        last_error=LONG_ERROR,
        last_error_at=timezone.now() - dt.timedelta(hours=1),
        last_sent_at=timezone.now(),
        last_refreshed_at=timezone.now(),
    )
    pages = {
        "change list": BASE,
        "mailbox": f"{BASE}{flagged.pk}/change/",
        "connected mailbox": f"{BASE}{healthy.pk}/change/",
        "connect": f"{BASE}connect/",
        "reconnect": f"{BASE}connect/?mailbox={flagged.pk}",
    }
    overflows = {}
    with chromium_page() as page:
        page.set_viewport_size({"width": width, "height": 900})
        log_in_as_newcomer(page, live_server.url)
        for name, path in pages.items():
            page.goto(f"{live_server.url}{path}")
            overflows[name] = page.evaluate(OVERFLOW)
    assert overflows == {name: [0, 0] for name in pages}
