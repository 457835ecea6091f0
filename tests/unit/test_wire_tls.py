"""Pinning a certificate by its fingerprint (rbee.wire.tls), and the clients that use it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rbee.daemon import auto_certificate, resolve_tls
from rbee.jobs.client import JobHttp
from rbee.wire import http1, tls

pytestmark = pytest.mark.timeout(30)

WRONG = "SHA256:" + base64.b64encode(b"\x00" * 32).decode().rstrip("=")


@dataclass
class Server:
    port: int
    #: What arrived after the handshake, decrypted: each connection's bytes.
    received: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def https_server(cert: Path | None, key: Path | None) -> AsyncIterator[Server]:
    """An HTTP/1.1 server on 127.0.0.1 (TLS with ``cert``) that answers ``ok`` and records what it read."""
    context = None
    if cert is not None and key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    server_state = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = b""
        try:
            while b"\r\n\r\n" not in got:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
                if not got[:1].isalpha():  # not HTTP (a TLS hello to a plain server): refused as uvicorn does
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    got = b""
                    break
            if got:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            server_state.received.append(got)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    server_state.port = server.sockets[0].getsockname()[1]
    try:
        yield server_state
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    made = {}
    for name in ("one", "two"):
        cert, key = auto_certificate(tmp_path_factory.mktemp("tls") / name)
        made[name] = (cert, key, tls.fingerprint_pem(cert.read_text()))
    return made


# -- fingerprints ------------------------------------------------------------


def test_fingerprint_is_ssh_style_sha256_of_the_der_certificate(certs: dict[str, tuple[Path, Path, str]]) -> None:
    cert, _, fp = certs["one"]
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert fp == "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert len(fp) == len("SHA256:") + 43


def test_a_pin_is_read_in_the_ssh_form_or_as_hex_from_openssl() -> None:
    digest = hashlib.sha256(b"x").digest()
    canonical = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert tls.parse_fingerprint(canonical) == canonical
    assert tls.parse_fingerprint("  " + canonical + "\n") == canonical
    assert tls.parse_fingerprint(":".join(f"{b:02X}" for b in digest)) == canonical
    assert tls.parse_fingerprint("sha256:" + digest.hex()) == canonical


@pytest.mark.parametrize("bad", ["", "SHA256:", "xyz", "SHA256:" + "A" * 40, "00" * 31, "SHA1:" + "00" * 32])
def test_anything_else_is_not_a_fingerprint(bad: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        tls.parse_fingerprint(bad)


# -- pinning -----------------------------------------------------------------


async def test_the_right_pin_gives_a_context_that_trusts_that_certificate(
    certs: dict[str, tuple[Path, Path, str]],
) -> None:
    cert, key, fp = certs["one"]
    async with https_server(cert, key) as server:
        context = await asyncio.to_thread(tls.pinned_context, "127.0.0.1", server.port, fp)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).endswith(b"ok")
        writer.close()


async def test_a_wrong_pin_is_refused_before_anything_is_sent(certs: dict[str, tuple[Path, Path, str]]) -> None:
    cert, key, fp = certs["one"]
    async with https_server(cert, key) as server:
        with pytest.raises(tls.CertificateMismatch) as refused:
            await asyncio.to_thread(tls.pinned_context, "127.0.0.1", server.port, WRONG)
        assert refused.value.seen == fp and refused.value.pinned == WRONG
        assert str(refused.value) == f"the certificate of 127.0.0.1:{server.port} is {fp}, not the pinned {WRONG}"
        await asyncio.sleep(0.05)
    assert server.received == [b""]  # the look at the certificate sent no byte of a request


async def test_a_context_for_one_certificate_refuses_another(certs: dict[str, tuple[Path, Path, str]]) -> None:
    one, two = certs["one"], certs["two"]
    context = tls.trusting_pem(one[0].read_text())
    async with https_server(two[0], two[1]) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", server.port, ssl=context)


async def test_pinning_a_server_without_tls_fails_as_a_tls_error() -> None:
    async with https_server(None, None) as server:
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls.pinned_context, "127.0.0.1", server.port, WRONG, timeout_s=2)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls.apeer_certificate("127.0.0.1", server.port, timeout_s=2)


def test_the_usual_verification_takes_a_self_signed_certificate_as_its_own_ca(
    certs: dict[str, tuple[Path, Path, str]],
) -> None:
    cert = certs["one"][0]
    context = tls.verifying(str(cert))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert tls.verifying().verify_mode == ssl.CERT_REQUIRED


# -- Trust: the queen's pins ---------------------------------------------------


async def test_trust_pins_origins_by_group_and_makes_one_context_per_fingerprint(
    certs: dict[str, tuple[Path, Path, str]],
) -> None:
    cert, key, fp = certs["one"]
    trust = tls.Trust()
    async with https_server(cert, key) as a, https_server(cert, key) as b:
        trust.pin("beta", fp, [f"https://127.0.0.1:{a.port}", f"https://127.0.0.1:{b.port}/", "http://x:1", None])
        assert trust.expected("127.0.0.1", a.port) == {fp}
        first = await trust.context("127.0.0.1", a.port)
        assert await trust.context("127.0.0.1", b.port) is first  # the workers share the hive's certificate
        await asyncio.sleep(0.05)
        assert a.received == [b""] and b.received == [b""]  # one look at each origin, none after
        assert await trust.context("127.0.0.1", a.port) is first
        await asyncio.sleep(0.05)
        assert a.received == [b""]
    assert await trust.context("127.0.0.1", 1) is trust.default()  # no pin: the usual checks
    trust.forget("beta")
    assert trust.expected("127.0.0.1", a.port) == set()


async def test_trust_refuses_a_certificate_other_than_the_pinned(certs: dict[str, tuple[Path, Path, str]]) -> None:
    cert, key, _ = certs["one"]
    trust = tls.Trust()
    async with https_server(cert, key) as server:
        trust.pin("evil", certs["two"][2], [f"https://127.0.0.1:{server.port}"])
        with pytest.raises(tls.CertificateMismatch, match="not the pinned"):
            await trust.context("127.0.0.1", server.port)


async def test_an_origin_two_groups_pin_differently_is_refused(certs: dict[str, tuple[Path, Path, str]]) -> None:
    trust = tls.Trust()
    trust.pin("beta", certs["one"][2], ["https://127.0.0.2:7835"])
    trust.pin("evil", certs["two"][2], ["https://127.0.0.2:7835"])
    with pytest.raises(tls.PinConflict, match="pinned to different certificates"):
        await trust.context("127.0.0.2", 7835)
    trust.pin("evil", None, [])
    assert trust.expected("127.0.0.2", 7835) == {certs["one"][2]}


# -- the clients ---------------------------------------------------------------


async def test_the_http1_pool_speaks_tls_with_the_trusts_context(certs: dict[str, tuple[Path, Path, str]]) -> None:
    cert, key, fp = certs["one"]
    async with https_server(cert, key) as server:
        trust = tls.Trust()
        trust.pin("beta", fp, [f"https://127.0.0.1:{server.port}"])
        pool = http1.Pool(trust=trust)
        try:
            answer = await pool.request(
                ("127.0.0.1", server.port), "GET", "/", {"Authorization": "Bearer s3"}, secure=True
            )
            assert answer.status == 200 and answer.body == b"ok"
            trust.pin("beta", certs["two"][2], [f"https://127.0.0.1:{server.port}"])
            pool.close()
            pool = http1.Pool(trust=trust)
            with pytest.raises(http1.WireError, match="not the pinned"):
                await pool.request(("127.0.0.1", server.port), "GET", "/", {"Authorization": "Bearer s3"}, secure=True)
        finally:
            await pool.aclose()
    assert sum(b"Bearer s3" in got for got in server.received) == 1  # the refused request was never sent


async def test_a_pool_without_trust_never_sends_a_secure_request_in_clear() -> None:
    pool = http1.Pool()
    with pytest.raises(http1.WireError, match="no TLS settings"):
        await pool.request(("127.0.0.1", 1), "GET", "/", {}, secure=True)


async def test_job_http_sends_https_through_the_trust_and_refuses_a_wrong_certificate(
    certs: dict[str, tuple[Path, Path, str]],
) -> None:
    cert, key, fp = certs["one"]
    async with https_server(cert, key) as server:
        url = f"https://127.0.0.1:{server.port}/"
        trust = tls.Trust()
        trust.pin("beta", fp, [url])
        async with JobHttp(trust=trust) as http:
            assert (await http.get(url)).text == "ok"
            trust.pin("beta", certs["two"][2], [url])
            with pytest.raises(httpx.ConnectError, match="not the pinned"):
                await http.get(url)


# -- the daemons' certificates -----------------------------------------------------


def test_an_auto_certificate_is_made_once_and_its_key_kept_private(tmp_path: Path) -> None:
    cert, key = auto_certificate(tmp_path / "queen", host="127.0.0.2")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = tls.fingerprint_pem(cert.read_text())
    assert auto_certificate(tmp_path / "queen") == (cert, key)
    assert tls.fingerprint_pem(cert.read_text()) == before
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)


def test_tls_flags_that_do_not_fit_together_are_one_line_and_exit_2(
    certs: dict[str, tuple[Path, Path, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = certs["one"], certs["two"]
    assert resolve_tls("hive", "off", None, None, name="hive-x", host="127.0.0.1") is None
    served = resolve_tls("hive", "off", one[0], one[1], name="hive-x", host="127.0.0.1")
    assert served is not None and served.fingerprint == one[2]
    for args in (("off", one[0], None), ("auto", one[0], one[1]), ("off", one[0], two[1])):
        with pytest.raises(SystemExit) as exited:
            resolve_tls("hive", *args, name="hive-x", host="127.0.0.1")
        assert exited.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hive: refusing to start: ")


# -- the keeper's client -------------------------------------------------------------


async def test_the_keeper_pins_the_queen_or_verifies_it_against_a_ca(certs: dict[str, tuple[Path, Path, str]]) -> None:
    from rbee.keeper.client import QueenClient
    from rbee.keeper.errors import BadSetting, KeeperError, QueenUnreachable

    cert, key, fp = certs["one"]
    async with https_server(cert, key) as server:
        url = f"https://127.0.0.1:{server.port}"

        def ask(fingerprint: str | None = None, ca_cert: str | None = None) -> int:
            client = QueenClient(url, "s3cret-token", fingerprint=fingerprint, ca_cert=ca_cert)
            return client.request("GET", "/v1/info").status

        assert await asyncio.to_thread(ask, fingerprint=fp) == 200
        assert await asyncio.to_thread(ask, ca_cert=str(cert)) == 200
        with pytest.raises(KeeperError, match=r"refusing the queen at .* not the pinned"):
            await asyncio.to_thread(ask, fingerprint=certs["two"][2])
        with pytest.raises(QueenUnreachable, match=r"certificate was refused.*--queen-fingerprint"):
            await asyncio.to_thread(ask)
        await asyncio.sleep(0.05)
    assert sum(b"s3cret-token" in got for got in server.received) == 2  # only the two trusted requests
    with pytest.raises(BadSetting, match="not a SHA-256 fingerprint"):
        QueenClient(url, fingerprint="nonsense")
    with pytest.raises(BadSetting, match="verifies an https:// queen"):
        QueenClient(f"http://127.0.0.1:{server.port}", fingerprint=fp)


# -- the hive's heartbeats to a pinned queen ---------------------------------------------


def _tiny_gguf(path: Path) -> Path:
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kvs = [s("general.architecture") + struct.pack("<I", 8) + s("gemma3")]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


async def test_a_hive_narrates_a_queen_with_another_certificate_and_sends_it_nothing(
    certs: dict[str, tuple[Path, Path, str]], tmp_path: Path
) -> None:
    from rbee import narration
    from rbee.hive.catalog import ModelCatalog
    from rbee.hive.heartbeat import HeartbeatLoop, HttpDelivery
    from rbee.hive.supervisor import Supervisor

    cert, key, fp = certs["one"]
    bundled = _tiny_gguf(tmp_path / "bundled-q4_k_m.gguf")
    catalog = ModelCatalog(tmp_path / "models.sqlite", bundled=lambda: bundled)
    async with https_server(cert, key) as server, httpx.AsyncClient() as workers:
        url = f"https://127.0.0.1:{server.port}"
        trust = tls.Trust()
        trust.pin("queen", certs["two"][2], [url])
        supervisor = Supervisor(home=tmp_path, http=workers)
        async with JobHttp(trust=trust) as http:
            loop = HeartbeatLoop(
                hive_id="pinned",
                url="https://127.0.0.1:7835",
                supervisor=supervisor,
                catalog=catalog,
                deliver=HttpDelivery(url, http, token="hive-token-0123456789"),
                tls_fingerprint=certs["two"][2],
            )
            with narration.capture() as events:
                assert await loop.beat() is False
                trust.pin("queen", fp, [url])  # the queen the pin names is back
                assert await loop.beat() is True
        await supervisor.aclose()
        await asyncio.sleep(0.05)
    await catalog.aclose()
    failed = next(e for e in events if e["action"] == "heartbeat_failed")
    assert f"is {fp}, not the pinned {certs['two'][2]}" in failed["human"]
    assert any(e["action"] == "heartbeat_restored" for e in events)
    carried = [got for got in server.received if b"hive-token-0123456789" in got]
    assert len(carried) == 1 and b'"tls_fingerprint":"' + certs["two"][2].encode() in carried[0]
