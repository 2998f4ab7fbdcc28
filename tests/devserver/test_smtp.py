"""The XOAUTH2-only SMTP server, driven by aiosmtplib over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from django_xoauth2_mail.devserver.oauth import OAuth2Server
from django_xoauth2_mail.devserver.smtp import ReceivedMessage, XOAuth2SMTPServer

SENDER = "sender@example.com"
MESSAGE = (
    b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: hi\r\n\r\n"
    b".a line that starts with a dot\r\n..and two\r\nlast line\r\n"
)


def xoauth2(user: str, access_token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {access_token}\x01\x01".encode())


def run(
    server: XOAuth2SMTPServer,
    session: Callable[[aiosmtplib.SMTP], Awaitable[Any]],
    **options: Any,
) -> Any:
    """Connect to ``server``, run ``session(client)``, disconnect; return its result."""

    async def main() -> Any:
        options.setdefault("start_tls", False)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=5, **options)
        try:
            async with client:  # QUIT, then close
                return await session(client)
        finally:
            # Let the transport finish closing before asyncio.run() closes the loop, or its
            # socket is reported as unclosed (a ResourceWarning) in some later test.
            await asyncio.sleep(0.01)

    return asyncio.run(main())


@pytest.fixture
def access_token(oauth2_server: OAuth2Server) -> str:
    return str(oauth2_server.issue_tokens(SENDER)["access_token"])


def test_valid_token_is_accepted_and_the_message_recorded(xoauth2_smtp_server, access_token):
    async def session(client: aiosmtplib.SMTP) -> Any:
        reply = await client.auth_xoauth2(SENDER, access_token)
        errors, _ = await client.sendmail(SENDER, ["rcpt@example.com", "cc@example.com"], MESSAGE)
        return reply, errors

    reply, errors = run(xoauth2_smtp_server, session)

    assert (reply.code, reply.message) == (235, "2.7.0 Accepted")
    assert errors == {}
    [message] = xoauth2_smtp_server.wait_for_messages(1)
    assert message.data == MESSAGE  # dot-unstuffed, CRLFs kept
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ["rcpt@example.com", "cc@example.com"]
    assert message.auth_user == SENDER
    [attempt] = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and attempt.initial_response_on_auth_line
    assert attempt.token == access_token and access_token not in repr(attempt)


def test_bad_token_gets_a_json_challenge_then_535(xoauth2_smtp_server):
    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        challenge = await client.execute_command(b"AUTH", b"XOAUTH2", xoauth2(SENDER, "bad"))
        final = await client.execute_command(b"")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as raised:
            await client.auth_xoauth2(SENDER, "bad")  # aiosmtplib's own handling of it
        return challenge, final, raised.value

    challenge, final, error = run(xoauth2_smtp_server, session)

    assert challenge.code == 334
    assert json.loads(base64.b64decode(challenge.message)) == {
        "status": "401",
        "schemes": "Bearer",
        "scope": "https://mail.google.com/",
    }
    assert final.code == 535
    lines = final.message.splitlines()
    assert len(lines) == 2 and all(line.startswith("5.7.8 ") for line in lines)
    assert error.code == 535
    assert [a.accepted for a in xoauth2_smtp_server.auth_attempts] == [False, False]


def test_auth_without_initial_response(xoauth2_smtp_server, access_token):
    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        prompt = await client.execute_command(b"AUTH", b"XOAUTH2")
        accepted = await client.execute_command(xoauth2(SENDER, access_token))
        await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE)
        return prompt, accepted

    prompt, accepted = run(xoauth2_smtp_server, session)

    assert (prompt.code, prompt.message) == (334, "")
    assert accepted.code == 235
    [attempt] = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and not attempt.initial_response_on_auth_line
    assert len(xoauth2_smtp_server.wait_for_messages(1)) == 1


def test_long_auth_line_is_refused_but_the_334_path_works(oauth2_server, xoauth2_smtp_server):
    oauth2_server.access_token_length = 2500  # the size of a Microsoft token
    long_token = oauth2_server.issue_tokens(SENDER)["access_token"]

    async def session(client: aiosmtplib.SMTP) -> Any:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as raised:
            await client.auth_xoauth2(SENDER, long_token)
        prompt = await client.execute_command(b"AUTH", b"XOAUTH2")
        accepted = await client.execute_command(xoauth2(SENDER, long_token))
        return raised.value, prompt, accepted

    refused, prompt, accepted = run(xoauth2_smtp_server, session)

    assert (refused.code, refused.message) == (500, "5.5.2 Line too long")
    assert prompt.code == 334 and accepted.code == 235


@pytest.mark.parametrize(
    ("limit", "padding", "code"),
    [(1000, 993, 250), (1000, 994, 500), (2000, 1993, 250), (2000, 1994, 500)],
)
def test_command_line_limit_counts_octets_with_crlf(oauth2_server, limit, padding, code):
    # "NOOP " + padding + CRLF: a padding of limit - 7 makes a line of exactly limit octets.
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, max_line_length=limit) as server:
        reply = run(server, lambda client: client.execute_command(b"NOOP", b"x" * padding))
    assert reply.code == code


def test_mail_before_auth_is_refused(xoauth2_smtp_server):
    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        return await client.execute_command(b"MAIL", b"FROM:<sender@example.com>")

    reply = run(xoauth2_smtp_server, session)

    assert (reply.code, reply.message) == (530, "5.7.0 Authentication required")


def test_temporary_auth_failure(xoauth2_smtp_server, access_token):
    xoauth2_smtp_server.temporary_auth_failure = True

    async def session(client: aiosmtplib.SMTP) -> Any:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as raised:
            await client.auth_xoauth2(SENDER, access_token)
        return raised.value

    error = run(xoauth2_smtp_server, session)

    assert (error.code, error.message) == (454, "4.7.0 Temporary authentication failure")
    [attempt] = xoauth2_smtp_server.auth_attempts
    assert attempt.temporary_failure and not attempt.accepted


def test_a_failing_validator_is_a_temporary_failure():
    def broken(user: str, token: str) -> bool:
        raise ConnectionError("token service down")

    async def session(client: aiosmtplib.SMTP) -> Any:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as raised:
            await client.auth_xoauth2(SENDER, "token")
        return raised.value.code

    with XOAuth2SMTPServer(broken) as server:
        assert run(server, session) == 454


def test_malformed_response_cannot_be_decoded(xoauth2_smtp_server):
    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        replies = [await client.execute_command(b"AUTH", b"XOAUTH2", b"%%%")]
        for payload in (b"user=a@b\x01auth=x\x01\x01", b"user=a@b\x01auth=Bearer token\x01"):
            replies.append(
                await client.execute_command(b"AUTH", b"XOAUTH2", base64.b64encode(payload))
            )
        return replies

    for reply in run(xoauth2_smtp_server, session):
        assert (reply.code, reply.message) == (501, "5.5.2 Cannot Decode response")


def test_rejected_recipients(xoauth2_smtp_server, access_token):
    xoauth2_smtp_server.reject_recipients["Nobody@Example.com"] = "550 5.1.1 No such user"

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        errors, _ = await client.sendmail(
            SENDER, ["rcpt@example.com", "nobody@example.com"], MESSAGE
        )
        return errors

    errors = run(xoauth2_smtp_server, session)

    assert errors["nobody@example.com"].code == 550
    assert errors["nobody@example.com"].message == "5.1.1 No such user"
    assert xoauth2_smtp_server.wait_for_messages(1)[0].rcpt_tos == ["rcpt@example.com"]


def test_maildir_and_on_message(oauth2_server, access_token, tmp_path):
    seen: list[ReceivedMessage] = []
    maildir = tmp_path / "mail"
    server = XOAuth2SMTPServer(
        oauth2_server.validate_access_token, maildir=maildir, on_message=seen.append
    )

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE)

    with server:
        run(server, session)
        [message] = server.wait_for_messages(1)

    [path] = maildir.iterdir()  # and no temporary file left behind
    assert path.suffix == ".eml" and path.read_bytes() == MESSAGE
    assert message.eml_path == path
    assert seen == [message]


def client_context(certfile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certfile)


def test_starttls(oauth2_server, access_token, tls_certificate):
    certfile, keyfile = tls_certificate
    server = XOAuth2SMTPServer(
        oauth2_server.validate_access_token,
        security="starttls",
        certfile=certfile,
        keyfile=keyfile,
    )

    async def before_tls(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        mail = await client.execute_command(b"MAIL", b"FROM:<sender@example.com>")
        return dict(client.esmtp_extensions), mail

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE)
        return client.get_transport_info("sslcontext") is not None

    with server:
        extensions, mail = run(server, before_tls)
        assert "starttls" in extensions and "auth" not in extensions
        assert mail.code == 530
        options = {"start_tls": True, "tls_context": client_context(certfile)}
        assert run(server, session, **options) is True
        assert server.wait_for_messages(1)[0].data == MESSAGE


def test_implicit_tls_with_a_generated_certificate(oauth2_server, access_token):
    server = XOAuth2SMTPServer(oauth2_server.validate_access_token, security="tls")

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE)
        return dict(client.esmtp_extensions)

    with server:
        assert server.certfile is not None
        context = client_context(server.certfile)
        extensions = run(server, session, use_tls=True, tls_context=context)
        assert "starttls" not in extensions and extensions["auth"] == "OAUTHBEARER XOAUTH2"
        assert len(server.wait_for_messages(1)) == 1
        # Without the generated certificate as CA, the handshake fails.
        untrusted = ssl.create_default_context()
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            untrusted.wrap_socket(raw, server_hostname="127.0.0.1")


def test_ehlo_advertisements(oauth2_server):
    server = XOAuth2SMTPServer(oauth2_server.validate_access_token, size_limit=1000)

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.ehlo()
        return dict(client.esmtp_extensions)

    with server:
        extensions = run(server, session)
    assert extensions["auth"] == "OAUTHBEARER XOAUTH2"
    assert extensions["size"] == "1000"
    assert {"smtputf8", "8bitmime", "pipelining"} <= extensions.keys()
    assert "starttls" not in extensions
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, smtputf8=False) as plain:
        extensions = run(plain, session)
    assert "smtputf8" not in extensions and "size" not in extensions


def test_oversized_message_is_refused(oauth2_server, access_token):
    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        with pytest.raises(aiosmtplib.SMTPResponseException) as raised:
            await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE * 20)
        return raised.value.code

    with XOAuth2SMTPServer(oauth2_server.validate_access_token, size_limit=1000) as server:
        assert run(server, session) == 552
        assert server.messages == []


def test_two_servers_at_once(oauth2_server, access_token):
    validate = oauth2_server.validate_access_token
    with XOAuth2SMTPServer(validate) as first, XOAuth2SMTPServer(validate) as second:
        assert first.port != second.port
        for server, recipient in ((first, "one@example.com"), (second, "two@example.com")):

            async def session(client: aiosmtplib.SMTP, recipient: str = recipient) -> Any:
                await client.auth_xoauth2(SENDER, access_token)
                await client.sendmail(SENDER, [recipient], MESSAGE)

            run(server, session)
        assert [m.rcpt_tos for m in first.messages] == [["one@example.com"]]
        assert [m.rcpt_tos for m in second.messages] == [["two@example.com"]]


def test_wait_for_messages_is_bounded_and_clear_forgets(xoauth2_smtp_server, access_token):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="received 0"):
        xoauth2_smtp_server.wait_for_messages(1, timeout=0.1)
    assert time.monotonic() - started < 1

    async def session(client: aiosmtplib.SMTP) -> Any:
        await client.auth_xoauth2(SENDER, access_token)
        await client.sendmail(SENDER, ["rcpt@example.com"], MESSAGE)

    sender = threading.Thread(target=run, args=(xoauth2_smtp_server, session))
    started = time.monotonic()
    sender.start()
    try:
        # Wakes up when the message arrives from the other thread, well before the timeout.
        assert len(xoauth2_smtp_server.wait_for_messages(1, timeout=5)) == 1
        assert time.monotonic() - started < 2.5
    finally:
        sender.join()
    xoauth2_smtp_server.clear()
    assert xoauth2_smtp_server.messages == [] and xoauth2_smtp_server.auth_attempts == []


def test_stop_is_fast_with_a_client_still_connected(oauth2_server):
    server = XOAuth2SMTPServer(oauth2_server.validate_access_token).start()

    async def main() -> float:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False)
        await client.connect()
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, server.stop)
        client.close()
        return time.monotonic() - started

    assert asyncio.run(main()) < 1


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1"])
def test_non_loopback_host_is_refused(host):
    with pytest.raises(ValueError, match="allow_non_loopback=True"):
        XOAuth2SMTPServer(lambda user, token: True, host=host)


def test_offers_only_the_mechanisms_asked_for():
    server = XOAuth2SMTPServer(lambda user, token: True, mechanisms=("OAUTHBEARER",))
    with server, smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.ehlo()
        assert client.esmtp_features["auth"].strip() == "OAUTHBEARER"
        code, _ = client.docmd("AUTH", "XOAUTH2")
    assert code == 504  # aiosmtpd: unrecognized authentication type


def test_oauthbearer_without_an_authzid_or_with_garbage():
    from django_xoauth2_mail.devserver.smtp import parse_oauthbearer_response

    assert parse_oauthbearer_response(b"n,,\x01auth=Bearer tok\x01\x01") == ("", "tok")
    assert parse_oauthbearer_response(b"n,a=a=2Cb@x,\x01auth=Bearer t\x01\x01") == ("a,b@x", "t")
    assert parse_oauthbearer_response(b"p=tls-unique,,\x01auth=Bearer t\x01\x01") is None
    assert parse_oauthbearer_response(b"n,a=u@x,\x01auth=Basic t\x01\x01") is None
    assert parse_oauthbearer_response(b"user=u@x\x01auth=Bearer t\x01\x01") is None
