"""Property-based: for generated messages, what the XOAUTH2 server receives is what
Django's own SMTP backend puts on the wire, and parses back to the same content."""

from __future__ import annotations

import email
import email.policy
import random
import warnings
from typing import Any

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import InvalidMessage
from tests.conftest import SENDER, make_mailbox
from tests.sink import PlainSMTPSink

pytestmark = pytest.mark.django_db(transaction=True)

FIXED = {"Date": "Tue, 24 Nov 2026 08:00:00 -0000", "Message-ID": "<prop@example.com>"}

# Text as people write it: any printable character of any script, with the line breaks
# a body has; headers get no line breaks (those are tested as injection elsewhere).
body_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters="\n\t"), max_size=300
)
header_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=80)
names = st.text(st.characters(whitelist_categories=("L", "N", "Zs")), max_size=20).map(str.strip)
domains = st.sampled_from(["example.org", "bücher.example", "例え.jp", "xn--mnchen-3ya.de"])
locals_ = st.from_regex(r"[a-z][a-z0-9._+-]{0,15}", fullmatch=True).filter(
    lambda local: ".." not in local and not local.endswith(".")
)


@st.composite
def addresses(draw: Any) -> str:
    address = f"{draw(locals_)}@{draw(domains)}"
    name = draw(names)
    return f"{name} <{address}>" if name else address


@st.composite
def messages(draw: Any) -> dict[str, Any]:
    return {
        "subject": draw(header_text),
        "body": draw(body_text),
        "to": draw(st.lists(addresses(), min_size=1, max_size=3)),
        "cc": draw(st.lists(addresses(), max_size=2)),
        "bcc": draw(st.lists(addresses(), max_size=2)),
        "html": draw(st.none() | body_text),
        "attachments": draw(
            st.lists(
                st.tuples(
                    st.text(
                        st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=12
                    ),
                    st.binary(max_size=2000),
                ),
                max_size=2,
            )
        ),
    }


def build(fields: dict[str, Any]) -> EmailMessage:
    message = EmailMultiAlternatives(
        fields["subject"],
        fields["body"],
        SENDER,
        fields["to"],
        cc=fields["cc"],
        bcc=fields["bcc"],
        headers=FIXED,
    )
    if fields["html"] is not None:
        message.attach_alternative(fields["html"], "text/html")
    for stem, data in fields["attachments"]:
        message.attach(f"{stem}.bin", data, "application/octet-stream")
    return message


@pytest.mark.slow
def test_generated_messages_match_djangos_bytes(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    ours = EmailBackend()
    ours.open()
    alias: dict[str, Any] = {"alias": "compare"} if django.VERSION >= (6, 1) else {}
    with PlainSMTPSink() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DjangoSMTPBackend(host="127.0.0.1", port=sink.port, **alias)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(messages())
        def check(fields: dict[str, Any]) -> None:
            sink.messages.clear()
            xoauth2_smtp_server.clear()
            random.seed(7)  # same MIME boundaries for both
            try:
                theirs.send_messages([build(fields)])
            except ValueError:
                # Django refuses it: so must we, before anything is sent.
                with pytest.raises(InvalidMessage):
                    ours.send_messages([build(fields)])
                assert xoauth2_smtp_server.messages == []
                return
            random.seed(7)
            assert ours.send_messages([build(fields)]) == 1

            (expected,) = sink.messages
            (received,) = xoauth2_smtp_server.messages
            assert (received.mail_from, received.rcpt_tos, received.data) == expected
            parsed = email.message_from_bytes(received.data, policy=email.policy.default)
            # Folding may move whitespace, never words.
            assert str(parsed["Subject"] or "").split() == fields["subject"].split()
            body = parsed.get_body(("plain",))  # Django 6 leaves out an empty body
            assert (body.get_content() if body else "").split() == fields["body"].split()
            assert "Bcc" not in parsed
            attachments = [part.get_content() for part in parsed.iter_attachments()]
            assert attachments == [data for _, data in fields["attachments"]]

        try:
            check()
        finally:
            ours.close()
