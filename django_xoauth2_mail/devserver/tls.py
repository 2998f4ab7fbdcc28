"""Certificates and address checks that keep the development servers local.

The development servers accept any client that knows a test secret and keep tokens in clear,
so they refuse to listen beyond loopback unless told to, and they serve TLS with a throwaway
self-signed certificate that a test client trusts explicitly (as its own CA file).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["check_loopback_host", "make_self_signed_certificate", "server_ssl_context"]


def check_loopback_host(host: str, *, allow_non_loopback: bool, what: str) -> None:
    """Raise ValueError unless ``host`` is a loopback address (or the caller opted out)."""
    if allow_non_loopback or is_loopback_host(host):
        return
    raise ValueError(
        f"Refusing to run the {what} on {host!r}: it is a development and test server that "
        "accepts test credentials and keeps tokens in clear. Listen on 127.0.0.1 or ::1, or "
        "pass allow_non_loopback=True if you really mean to expose it to other machines."
    )


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost could resolve anywhere.
        return False


def make_self_signed_certificate(
    directory: str | os.PathLike[str], hostname: str = "localhost", ip: str = "127.0.0.1"
) -> tuple[str, str]:
    """Write a self-signed certificate and its key as PEM files; return their paths.

    The certificate names ``hostname`` and ``ip`` and is its own issuer with the CA flag, so
    the same file serves as the server's certificate and as the client's ``cafile``. It
    carries the key identifiers that Python 3.13's strict verification demands. Paths are
    returned as ``str`` because some clients (requests' ``verify=``) only accept strings.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # P-256 rather than RSA: generating it is instant, which matters in per-test fixtures.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A day back absorbs clock skew between the test host and containers.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(ip))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certfile = folder / f"{hostname}-cert.pem"
    keyfile = folder / f"{hostname}-key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create the key file owner-only from the start rather than chmod-ing it afterwards.
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(key_pem)
    return str(certfile), str(keyfile)


def server_ssl_context(
    certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A server-side TLS context that does not ask clients for certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context
