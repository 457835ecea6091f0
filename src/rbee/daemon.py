"""Running a server process: bind checks, logging, TLS, uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from rbee.config import BindRefused, check_bind

__all__ = ["serve", "preflight", "Tls", "tls_options", "resolve_tls", "auto_certificate", "AUTO_VALID_DAYS"]

#: How long a ``--tls auto`` certificate is valid: its fingerprint is pinned, so it is made once for years.
AUTO_VALID_DAYS = 3650


def preflight(component: str, host: str, token: str | None) -> None:
    """Refuse an unsafe bind before anything starts (exit 2 with one line)."""
    from rbee.narration import configure_logging, set_process_actor

    set_process_actor(component)
    configure_logging()
    try:
        check_bind(host, token)
    except BindRefused as exc:
        print(f"{component}: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass(frozen=True)
class Tls:
    """The certificate a daemon serves: its files and its fingerprint (what the other side pins)."""

    cert: Path
    key: Path
    fingerprint: str


F = TypeVar("F", bound=Callable[..., Any])


def tls_options(f: F) -> F:
    """``--tls auto``, ``--tls-cert`` and ``--tls-key``, as every daemon takes them."""
    f = click.option(
        "--tls-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="The private key of --tls-cert (PEM).",
    )(f)
    f = click.option(
        "--tls-cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Serve HTTPS with this certificate (PEM; with --tls-key).",
    )(f)
    f = click.option(
        "--tls",
        "tls_mode",
        type=click.Choice(["off", "auto"]),
        default="off",
        show_default=True,
        help="auto: serve HTTPS with a self-signed certificate made once in the data directory;"
        " its SHA-256 fingerprint is printed at start, for the other side to pin.",
    )(f)
    return f


def resolve_tls(component: str, mode: str, cert: Path | None, key: Path | None, *, name: str, host: str) -> Tls | None:
    """The certificate to serve, from the flags (exit 2 with one line when they do not fit together)."""

    def refuse(why: str) -> SystemExit:
        print(f"{component}: refusing to start: {why}", file=sys.stderr)
        return SystemExit(2)

    if (cert is None) != (key is None):
        raise refuse("--tls-cert and --tls-key go together")
    if cert is not None and mode == "auto":
        raise refuse("--tls auto makes its own certificate; give it or --tls-cert/--tls-key, not both")
    if cert is None or key is None:
        if mode != "auto":
            return None
        from rbee.config import rbee_home

        try:
            cert, key = auto_certificate(rbee_home() / "tls" / name, host=host)
        except ImportError:
            raise refuse("--tls auto needs the cryptography package (pip install cryptography)") from None
        except OSError as exc:
            raise refuse(f"cannot write the certificate: {exc.strerror or exc}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        pem = cert.read_text()
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise refuse(f"cannot use {cert} with {key}: {getattr(exc, 'reason', None) or exc}") from None
    from rbee.wire.tls import fingerprint_pem

    return Tls(cert=cert, key=key, fingerprint=fingerprint_pem(pem))


def announce(component: str, tls: Tls) -> None:
    """Say which certificate is served and how to pin it (stderr, before the server starts)."""
    print(f"{component}: serving HTTPS with {tls.cert}; certificate fingerprint {tls.fingerprint}", file=sys.stderr)


def _names(host: str) -> tuple[list[str], list[str]]:
    """The DNS names and addresses a made certificate lists (for clients that check the host)."""
    dns = ["localhost", socket.gethostname()]
    ips = ["127.0.0.1", "::1"]
    bare = host.strip("[]")
    if bare not in ("", "0.0.0.0", "::"):
        try:
            ipaddress.ip_address(bare)
            ips.append(bare)
        except ValueError:
            dns.append(bare)
    else:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            ips.extend(a.address for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
    valid_ips = []
    for ip in ips:
        try:
            valid_ips.append(str(ipaddress.ip_address(ip.split("%", 1)[0])))
        except ValueError:
            continue
    return list(dict.fromkeys(dns)), list(dict.fromkeys(valid_ips))


def auto_certificate(directory: Path, *, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """``cert.pem`` and ``key.pem`` in ``directory``, made (self-signed, EC P-256) when they are not there.

    Kept for later runs: the fingerprint others pinned stays valid. The key is
    readable by its owner only.
    """
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = _names(host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rbee {directory.name}")])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=AUTO_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Written under temporary names and moved into place: two daemons starting at once keep one pair.
    tmp_key, tmp_cert = directory / f".key.{os.getpid()}", directory / f".cert.{os.getpid()}"
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    return cert_path, key_path


def serve(app: Any, host: str, port: int, *, sock: socket.socket | None = None, tls: Tls | None = None) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls.cert) if tls is not None else None,
        ssl_keyfile=str(tls.key) if tls is not None else None,
    )
    server = uvicorn.Server(config)
    try:
        # The socket object itself, not its fd: uvicorn takes an fd for a Unix
        # socket, and TCP connections accepted that way keep Nagle's algorithm,
        # which holds each small SSE frame until the reader's delayed ACK (40 ms).
        server.run(sockets=[sock] if sock is not None else None)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
