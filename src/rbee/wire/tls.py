"""TLS for rbee's clients, standard library only: fingerprints, and contexts that trust one certificate.

A daemon started with ``--tls auto`` serves a self-signed certificate; the
other side pins it by its SHA-256 fingerprint, as SSH pins a host key on
first contact. Python's :mod:`ssl` has no verify callback, so pinning takes
two steps: fetch the peer's certificate with a handshake that verifies
nothing (:func:`peer_certificate`), compare its fingerprint with the pin,
then make every real connection with a context that trusts exactly that
certificate (:func:`trusting`), so the key behind it must be the one the
pin names. Nothing is sent on the first handshake.

Every client goes through this module: the jobs client and its HTTP/1.1
pool, the queen's and the hive's httpx clients, the keeper's client. The
keeper imports it only for an ``https://`` queen.

Fingerprints are written ``SHA256:`` and the unpadded base64 of the digest
(as ``ssh-keygen -l`` does); the colon-separated hex of ``openssl x509
-fingerprint -sha256`` is read too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import socket
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = [
    "PREFIX",
    "CertificateMismatch",
    "PinConflict",
    "Trust",
    "fingerprint",
    "fingerprint_pem",
    "parse_fingerprint",
    "peer_certificate",
    "apeer_certificate",
    "describe",
    "pinned_context",
    "trusting",
    "trusting_pem",
    "verifying",
]

PREFIX = "SHA256:"


class CertificateMismatch(ssl.SSLError):
    """The peer's certificate is not the pinned one."""

    def __init__(self, where: str, seen: str, pinned: str) -> None:
        super().__init__(f"the certificate of {where} is {seen}, not the pinned {pinned}")
        self.where = where
        self.seen = seen
        self.pinned = pinned

    def __str__(self) -> str:
        return f"the certificate of {self.where} is {self.seen}, not the pinned {self.pinned}"


class PinConflict(CertificateMismatch):
    """Two parties pinned one origin to different certificates: it cannot present both, so it is refused."""

    def __init__(self, where: str, claims: dict[str, str]) -> None:
        super().__init__(where, "", ", ".join(sorted(set(claims.values()))))
        self.claims = dict(claims)

    def __str__(self) -> str:
        said = "; ".join(f"{group} says {pin}" for group, pin in sorted(self.claims.items()))
        return f"{self.where} is pinned to different certificates ({said}); refused"


def fingerprint(der: bytes) -> str:
    """``SHA256:<base64>`` of a DER certificate."""
    digest = hashlib.sha256(der).digest()
    return PREFIX + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_pem(pem: str) -> str:
    """The fingerprint of the first certificate in a PEM text."""
    return fingerprint(ssl.PEM_cert_to_DER_cert(_first_pem(pem)))


def parse_fingerprint(text: str) -> str:
    """A pin as given (``SHA256:base64``, or 64 hex digits with or without colons) in the canonical form.

    :class:`ValueError` with a one-line reason when it is neither.
    """
    raw = text.strip()
    body = raw[len(PREFIX) :] if raw.upper().startswith(PREFIX) else raw
    hexed = body.replace(":", "")
    digest: bytes | None = None
    if len(hexed) == 64:
        try:
            digest = bytes.fromhex(hexed)
        except ValueError:
            digest = None
    if digest is None:
        try:
            digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            digest = None
    if digest is None or len(digest) != 32:
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (SHA256:<base64>, or 64 hex digits)")
    return PREFIX + base64.b64encode(digest).decode().rstrip("=")


def _first_pem(pem: str) -> str:
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate found")
    return pem[start : end + len("-----END CERTIFICATE-----")] + "\n"


def describe(exc: BaseException) -> str:
    """A TLS failure in one line: a certificate that is not the pinned one, one refused, a failed handshake."""
    if isinstance(exc, CertificateMismatch):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate was refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "the TLS handshake failed: the server does not speak TLS (is its URL http://?)"
        return f"the TLS handshake failed: {exc.reason or exc}"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text or type(exc).__name__).splitlines()[0][:200]


def _looking() -> ssl.SSLContext:
    """A context for the first look at a peer's certificate: it verifies nothing and sends nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_certificate(host: str, port: int, *, timeout_s: float = 5.0) -> bytes:
    """The DER certificate the server at ``host:port`` presents (:class:`OSError` if none answers)."""
    with (
        socket.create_connection((host, port), timeout=timeout_s) as raw,
        _looking().wrap_socket(raw, server_hostname=_sni(host)) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return der


async def apeer_certificate(host: str, port: int, *, timeout_s: float = 5.0) -> bytes:
    """:func:`peer_certificate` on the running event loop."""
    async with asyncio.timeout(timeout_s):
        _, writer = await asyncio.open_connection(host, port, ssl=_looking(), server_hostname=_sni(host))
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
    finally:
        writer.close()
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return bytes(der)


def _sni(host: str) -> str | None:
    # Server name indication takes names, never addresses.
    stripped = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in stripped else socket.AF_INET, stripped)
    except OSError:
        return stripped
    return None


def trusting(der: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate, whatever host it is reached at."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the certificate itself is pinned; the names in it do not matter
    ctx.verify_mode = ssl.CERT_REQUIRED
    # A certificate a CA issued is trusted on its own, without its issuer.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=der)
    return ctx


def trusting_pem(pem: str) -> ssl.SSLContext:
    """:func:`trusting` the first certificate of a PEM text (a certificate file, a chain's leaf first)."""
    return trusting(ssl.PEM_cert_to_DER_cert(_first_pem(pem)))


def verifying(ca_cert: str | None = None) -> ssl.SSLContext:
    """The usual verification: the system's store, or only ``ca_cert`` (a PEM file) when given."""
    if ca_cert is None:
        return ssl.create_default_context()
    ctx = ssl.create_default_context(cafile=ca_cert)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a self-signed server certificate given as its own CA
    return ctx


def _check(der: bytes, pin: str, where: str) -> None:
    seen = fingerprint(der)
    if seen != pin:
        raise CertificateMismatch(where, seen, pin)


def pinned_context(host: str, port: int, pin: str, *, timeout_s: float = 5.0) -> ssl.SSLContext:
    """Look at the certificate of ``host:port``; a context trusting it if it is ``pin``, else
    :class:`CertificateMismatch` (:class:`OSError` when nothing answers)."""
    der = peer_certificate(host, port, timeout_s=timeout_s)
    _check(der, pin, f"{host}:{port}")
    return trusting(der)


Origin = tuple[str, int]


def origin(url: str) -> Origin | None:
    """``(host, port)`` of an ``https://`` URL, None for any other."""
    try:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            return None
        return parts.hostname, parts.port or 443
    except ValueError:  # a malformed address or port
        return None


class Trust:
    """What a client expects of each ``https://`` server it reaches: a pinned fingerprint, else the usual checks.

    The queen pins each hive's origins (the hive and its workers, which serve the
    hive's certificate) to the fingerprint the hive reported in its heartbeat
    (:meth:`pin`, one group per hive). The certificate at each origin is looked at
    once, before the first connection (a worker's too, so a wrong one is named as
    such), and one context per fingerprint trusts it for all of them. An origin two groups pin to
    different fingerprints is refused: its certificate cannot be both. Origins
    with no pin are verified against ``ca_cert`` or the system's store.
    """

    def __init__(self, *, ca_cert: str | None = None, timeout_s: float = 5.0) -> None:
        self.ca_cert = ca_cert
        self.timeout_s = timeout_s
        #: origin -> group -> fingerprint
        self._pins: dict[Origin, dict[str, str]] = {}
        self._groups: dict[str, set[Origin]] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._looked: set[tuple[Origin, str]] = set()
        self._default: ssl.SSLContext | None = None

    def pin(self, group: str, pin: str | None, urls: Iterable[str | None]) -> None:
        """Pin the origins of ``urls`` to ``pin`` (None: no pin), in place of what ``group`` pinned before."""
        for old in self._groups.pop(group, set()):
            claims = self._pins.get(old)
            if claims is not None:
                claims.pop(group, None)
                if not claims:
                    del self._pins[old]
        if pin is None:
            return
        found = {o for o in map(origin, filter(None, urls)) if o is not None}
        for o in found:
            self._pins.setdefault(o, {})[group] = pin
        self._groups[group] = found

    def forget(self, group: str) -> None:
        """Drop what ``group`` pinned (a hive the queen forgot)."""
        self.pin(group, None, ())

    def expected(self, host: str, port: int) -> set[str]:
        """The fingerprints pinned for ``host:port`` (empty: none)."""
        return set(self._pins.get((host, port), {}).values())

    def holds(self, host: str, port: int, seen: str | None) -> bool:
        """Whether a connection made earlier to ``host:port``, whose certificate was ``seen``, is still trusted."""
        claims = self._pins.get((host, port))
        return not claims or set(claims.values()) == {seen}

    def default(self) -> ssl.SSLContext:
        if self._default is None:
            self._default = verifying(self.ca_cert)
        return self._default

    async def context(self, host: str, port: int) -> ssl.SSLContext:
        """The context for a connection to ``host:port`` (:class:`CertificateMismatch` for a wrong certificate)."""
        claims = self._pins.get((host, port))
        if not claims:
            return self.default()
        pins = set(claims.values())
        if len(pins) > 1:
            raise PinConflict(f"{host}:{port}", claims)
        pin = pins.pop()
        ctx = self._contexts.get(pin)
        if ctx is None or ((host, port), pin) not in self._looked:
            der = await apeer_certificate(host, port, timeout_s=self.timeout_s)
            _check(der, pin, f"{host}:{port}")
            if len(self._looked) > 4096:  # origins come and go with workers
                self._looked.clear()
            self._looked.add(((host, port), pin))
            if ctx is None:
                ctx = self._contexts[pin] = trusting(der)
        return ctx
