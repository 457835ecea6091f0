"""TLS between every daemon, real processes on 127.0.0.x: keeper -> queen -> hive -> worker with ``--tls auto``.

What crosses the wire is watched two ways: a relay (an asyncio TCP proxy that
records every byte) on the keeper -> queen and hive -> queen paths, and, as
root, a capture of every packet on the loopback interface, which also sees the
queen -> hive and queen -> worker connections (their addresses come from the
hive's heartbeat, so no relay can be put in their way). Neither may see the
bearer token or the prompt in clear.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import BIN, Daemon, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "tls-cluster-token-" + secrets.token_hex(8)
FAKE = {"RBEE_FAKE_TOKENS": "5", "RBEE_FAKE_DELAY_MS": "5"}
_FINGERPRINT = re.compile(r"certificate fingerprint (SHA256:[A-Za-z0-9+/]{43})")


# -- watching the wire -----------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to ``target``, in a thread of its own, recording every byte both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.seen = bytearray()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    self.seen += chunk
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class LoopbackCapture:
    """Every TCP payload on ``lo`` (needs root: a raw packet socket), reassembled per connection and direction."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.flows: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
                continue
            ihl = (frame[14] & 0x0F) * 4
            total = struct.unpack("!H", frame[16:18])[0]
            tcp = 14 + ihl
            sport, dport, seq = struct.unpack("!HHI", frame[tcp : tcp + 8])
            payload = frame[tcp + (frame[tcp + 12] >> 4) * 4 : 14 + total]
            if payload:
                key = (socket.inet_ntoa(frame[26:30]), sport, socket.inet_ntoa(frame[30:34]), dport)
                self.flows.setdefault(key, {})[seq] = payload

    def streams(self) -> dict[tuple[str, int, str, int], bytes]:
        return {key: b"".join(part for _, part in sorted(parts.items())) for key, parts in list(self.flows.items())}

    def to(self, host: str, port: int) -> list[bytes]:
        """What clients sent to ``host:port``."""
        return [data for (_, _, dst, dport), data in self.streams().items() if (dst, dport) == (host, port)]


def capture_or_none() -> LoopbackCapture | None:
    try:
        return LoopbackCapture()
    except (PermissionError, OSError):
        return None


# -- daemons over https ------------------------------------------------------------


def start_https(daemon: Daemon, timeout_s: float = 30.0) -> str:
    """Start ``daemon`` (its ``url`` is https), wait for /health, and return the fingerprint it printed."""
    daemon.home.mkdir(parents=True, exist_ok=True)
    with open(daemon.log_path, "ab") as log:
        daemon.proc = subprocess.Popen(daemon.args, env=daemon.env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"{daemon.name} exited {daemon.proc.returncode}:\n{daemon.log()}")
        found = _FINGERPRINT.search(daemon.log())
        try:
            if found and httpx.get(daemon.url + "/health", verify=False, timeout=1).status_code == 200:
                return found.group(1)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    daemon.stop()
    raise RuntimeError(f"{daemon.name} did not start:\n{daemon.log()}")


def tls_queen(home: Path, port: int, *extra: str) -> Daemon:
    args = [str(BIN / "queen-rbee"), "--host", "127.0.0.1", "--port", str(port), *extra]
    return Daemon("queen", args, home=home, url=f"https://127.0.0.1:{port}", env={"RBEE_TOKEN": TOKEN})


def tls_hive(home: Path, host: str, port: int, queen_url: str, *extra: str) -> Daemon:
    args = [str(BIN / "rbee-hive"), "--host", host, "--port", str(port), "--hive-id", "beta"]
    args += ["--queen-url", queen_url, "--worker-engine", "fake", "--tls", "auto", *extra]
    return Daemon("hive-beta", args, home=home, url=f"https://{host}:{port}", env={"RBEE_TOKEN": TOKEN, **FAKE})


def keeper(queen_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RBEE_QUEEN")}
    base.update(RBEE_NO_AUTOSTART="1", RBEE_TOKEN=TOKEN, **(env or {}))
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", queen_url, *args], capture_output=True, text=True, env=base, timeout=60
    )


@dataclass
class TlsCluster:
    queen: Daemon
    hive: Daemon
    fingerprint: str  # the queen's
    hive_fingerprint: str
    keeper_relay: Relay
    heartbeat_relay: Relay
    capture: LoopbackCapture | None

    @property
    def via_relay(self) -> str:
        return f"https://127.0.0.1:{self.keeper_relay.port}"

    def admin(self) -> httpx.Client:
        return httpx.Client(verify=False, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def hives(self) -> dict[str, Any]:
        with self.admin() as http:
            job = http.post(self.queen.url + "/v1/jobs", json={"operation": "hive_list"}).json()["job_id"]
            body = http.get(f"{self.queen.url}/v1/jobs/{job}/stream").text
        for line in body.splitlines():
            if line.startswith("data: {") and '"hives"' in line:
                return {h["hive_id"]: h for h in json.loads(line[6:])["hives"]}
        return {}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    home = tmp_path_factory.mktemp("tls")
    capture = capture_or_none()
    qport, hport = free_port(), free_port("127.0.0.2")
    q = tls_queen(home / "queen", qport, "--tls", "auto")
    h: Daemon | None = None
    with Relay(("127.0.0.1", qport)) as keeper_relay, Relay(("127.0.0.1", qport)) as heartbeat_relay:
        if capture is not None:
            capture.__enter__()
        try:
            fingerprint = start_https(q)
            h = tls_hive(
                home / "hive",
                "127.0.0.2",
                hport,
                f"https://127.0.0.1:{heartbeat_relay.port}",
                "--queen-fingerprint",
                fingerprint,
            )
            hive_fingerprint = start_https(h)
            c = TlsCluster(q, h, fingerprint, hive_fingerprint, keeper_relay, heartbeat_relay, capture)
            wait_for(lambda: "beta" in c.hives(), 15)
            yield c
        finally:
            if h is not None:
                h.stop()
            q.stop()
            if capture is not None:
                capture.__exit__()


# -- the tests -------------------------------------------------------------------------


def test_a_job_runs_end_to_end_over_tls_and_no_token_or_prompt_crosses_in_clear(tls_cluster: TlsCluster) -> None:
    c = tls_cluster
    assert c.hives()["beta"]["url"] == c.hive.url  # https, as the heartbeat said
    prompt = "the secret prompt " + secrets.token_hex(6)
    run = keeper(c.via_relay, "--queen-fingerprint", c.fingerprint, "infer", "--hive", "beta", "--json", prompt)
    assert run.returncode == 0, run.stderr + c.queen.log() + c.hive.log()
    stream = [json.loads(line) for line in run.stdout.splitlines()]
    end = stream[-1]["data"]
    assert end["status"] == "completed" and end["hive_id"] == "beta" and end["tokens_out"] == 5
    said = " ".join(e["data"]["human"] for e in stream if e["event"] == "narration")
    assert "https://127.0.0.2:" in said  # the worker, reached over TLS too

    with c.admin() as http:
        info = http.get(c.queen.url + "/v1/info").json()
    assert info["tls_fingerprint"] == c.fingerprint and info["base_url"].startswith("https://")
    status = keeper(c.queen.url, "--queen-fingerprint", c.fingerprint, "queen", "status")
    assert status.returncode == 0 and c.fingerprint in status.stdout

    secrets_in_clear = (TOKEN.encode(), prompt.encode())
    for relay in (c.keeper_relay, c.heartbeat_relay):
        assert relay.seen.startswith(b"\x16\x03")  # TLS records, from the first byte
        for secret in secrets_in_clear:
            assert secret not in relay.seen
    if c.capture is None:
        pytest.skip("the loopback capture (queen -> hive and worker) needs root")
    time.sleep(0.3)
    streams = c.capture.streams()
    hive_port = int(c.hive.url.rsplit(":", 1)[1])
    worker_port = int(end_worker_url(c, end["worker_id"]).rsplit(":", 1)[1])
    to_hive, to_worker = c.capture.to("127.0.0.2", hive_port), c.capture.to("127.0.0.2", worker_port)
    assert to_hive and to_worker  # the capture saw the queen's connections to both
    assert all(data.startswith(b"\x16\x03") for data in to_hive + to_worker)
    for data in streams.values():
        for secret in secrets_in_clear:
            assert secret not in data


def end_worker_url(c: TlsCluster, worker_id: str) -> str:
    run = keeper(c.queen.url, "--queen-fingerprint", c.fingerprint, "--json", "worker", "list", "--hive", "beta")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    result = next(e["data"] for e in events if e["event"] == "result")
    found = [w for w in result["workers"] if w["worker_id"] == worker_id]
    assert found, result
    url: str = found[0]["url"]
    assert url.startswith("https://127.0.0.2:")
    return url


def test_the_capture_sees_a_token_sent_in_clear(tls_cluster: TlsCluster) -> None:
    """The control: what the test above did not see, it would have seen over plain http."""
    if tls_cluster.capture is None:
        pytest.skip("the loopback capture needs root")
    marker = ("plain-" + secrets.token_hex(8)).encode()
    with socket.create_server(("127.0.0.3", 0)) as server, socket.create_connection(server.getsockname()) as client:
        client.sendall(b"GET / HTTP/1.1\r\nAuthorization: Bearer " + marker + b"\r\n\r\n")
        server.accept()[0].close()
    time.sleep(0.3)
    assert any(marker in data for data in tls_cluster.capture.streams().values())


def test_a_hive_given_a_wrong_queen_fingerprint_is_refused_and_says_why(
    tls_cluster: TlsCluster, tmp_path: Path
) -> None:
    wrong = tls_cluster.hive_fingerprint  # a real fingerprint, just not the queen's
    args = [str(BIN / "rbee-hive"), "--host", "127.0.0.3", "--port", str(free_port("127.0.0.3"))]
    args += ["--hive-id", "gamma", "--queen-url", tls_cluster.queen.url, "--queen-fingerprint", wrong]
    env = {**tls_cluster.queen.env, "RBEE_HOME": str(tmp_path)}
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"hive: refusing the queen at {tls_cluster.queen.url}: the certificate of 127.0.0.1:"
        f"{tls_cluster.queen.url.rsplit(':', 1)[1]} is {tls_cluster.fingerprint}, not the pinned {wrong}"
        " (--queen-fingerprint)"
    ]
    assert "gamma" not in tls_cluster.hives()


def test_the_keeper_refuses_a_queen_whose_certificate_is_not_the_pinned_one(tls_cluster: TlsCluster) -> None:
    c = tls_cluster
    run = keeper(c.via_relay, "--queen-fingerprint", c.hive_fingerprint, "hive", "list")
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 1
    assert "refusing the queen" in run.stderr and "not the pinned" in run.stderr
    unverified = keeper(c.via_relay, "hive", "list")  # neither a pin nor a CA: the system's store refuses it
    assert unverified.returncode == 1 and "certificate was refused" in unverified.stderr
    bad = keeper(c.via_relay, "--queen-fingerprint", "nonsense", "hive", "list")
    assert bad.returncode == 2 and "not a SHA-256 fingerprint" in bad.stderr and len(bad.stderr.splitlines()) == 1
    by_env = keeper(c.via_relay, "hive", "list", env={"RBEE_QUEEN_FINGERPRINT": c.fingerprint})
    assert by_env.returncode == 0 and "beta" in by_env.stdout


def test_a_queen_refuses_a_hive_whose_certificate_is_not_the_one_reported(tls_cluster: TlsCluster) -> None:
    """Heartbeats whose fingerprint the certificate at their address does not have: nothing is scheduled there."""
    c = tls_cluster
    pin = ("--queen-fingerprint", c.fingerprint)
    # A hive whose address answers with another certificate (the queen's own) than the one it reported.
    forged = {
        "hive_id": "forged",
        "url": c.queen.url,
        "tls_fingerprint": c.hive_fingerprint,
        "models": [{"id": "gemma3-270m", "alias": "gemma3-270m"}],
    }
    # A hive that claims beta's address with another certificate: beta's address is refused for both.
    claims = {**forged, "hive_id": "claims", "url": c.hive.url, "tls_fingerprint": c.fingerprint}
    with c.admin() as http:
        for beat in (forged, claims):
            assert http.post(c.queen.url + "/v1/hives/heartbeat", json=beat).status_code == 200
    try:
        run = keeper(c.queen.url, *pin, "infer", "--hive", "forged", "never sent")
        assert run.returncode == 1 and len(run.stderr.splitlines()) == 1
        assert f"is {c.fingerprint}, not the pinned {c.hive_fingerprint}" in run.stderr, run.stderr
        listed = keeper(c.queen.url, *pin, "worker", "list", "--hive", "beta")
        assert listed.returncode == 1 and "pinned to different certificates" in listed.stderr, listed.stderr
    finally:
        with c.admin() as http:
            for beat in (forged, claims):
                http.post(c.queen.url + "/v1/hives/heartbeat", json={**beat, "goodbye": True, "tls_fingerprint": None})
    assert keeper(c.queen.url, *pin, "worker", "list", "--hive", "beta").returncode == 0


# -- a user's own certificate -------------------------------------------------------------


def _ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed, as a person's own PKI would give them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "queen")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_the_openai_sdk_and_the_page_work_over_https_with_a_users_certificate(tmp_path: Path) -> None:
    ca, cert, key = _ca_and_leaf(tmp_path / "pki")
    q = tls_queen(tmp_path / "queen", free_port(), "--tls-cert", str(cert), "--tls-key", str(key))
    fingerprint = start_https(q)
    hive_args = [str(BIN / "rbee-hive"), "--host", "127.0.0.1", "--port", str(free_port()), "--hive-id", "alpha"]
    hive_args += ["--queen-url", q.url, "--queen-fingerprint", fingerprint, "--worker-engine", "fake"]
    h = Daemon("hive-alpha", hive_args, home=tmp_path / "hive", url="", env={"RBEE_TOKEN": TOKEN, **FAKE})
    try:
        h.home.mkdir(parents=True)
        with open(h.log_path, "ab") as log:
            h.proc = subprocess.Popen(h.args, env=h.env, stdout=log, stderr=subprocess.STDOUT)
        verify = __import__("ssl").create_default_context(cafile=str(ca))  # the CA, host name checked
        with httpx.Client(verify=verify, timeout=60) as http:
            wait_for(
                lambda: http.get(q.url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json().get("data"),
                20,
            )
            page = http.get(q.url + "/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert page.status_code in (200, 401) and page.url.scheme == "https"
            sdk_http = openai.DefaultHttpxClient(verify=verify, timeout=60)  # the SDK's own httpx, given the CA
            with openai.OpenAI(base_url=q.url + "/v1", api_key=TOKEN, http_client=sdk_http, max_retries=0) as client:
                answer = client.chat.completions.create(
                    model="gemma3-270m", messages=[{"role": "user", "content": "hello"}], max_tokens=3
                )
                assert answer.choices[0].message.content == "tok0 tok1 tok2 "
                pieces = client.chat.completions.create(
                    model="gemma3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
                )
                assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == "tok0 tok1 tok2 "
        with pytest.raises(httpx.ConnectError):  # without the CA: refused, as any https client would
            httpx.get(q.url + "/health", timeout=5)
    finally:
        h.stop()
        q.stop()


def test_rbee_hive_start_with_tls_auto_serves_https_pinned_by_the_queen(
    tls_cluster: TlsCluster, tmp_path: Path
) -> None:
    """The keeper starts a hive with --tls auto: it serves HTTPS (its workers too), reports its
    certificate, runs a job, and the keeper reaches it for status by the pin it kept."""
    c = tls_cluster
    home = tmp_path / "keeper"
    env = {"RBEE_HOME": str(home), "RBEE_CONFIG": str(home / "none.toml"), **FAKE}
    port = free_port("127.0.0.5")
    common = ("--queen-fingerprint", c.fingerprint)
    start = keeper(
        c.queen.url,
        *common,
        *("hive", "start", "--host", "127.0.0.5", "--port", str(port), "--hive-id", "delta"),
        *("--tls", "auto", "--queen-url", c.queen.url, "--queen-fingerprint", c.fingerprint, "--worker-engine", "fake"),
        env=env,
    )
    try:
        assert start.returncode == 0, start.stderr
        assert f"running at https://127.0.0.5:{port}" in start.stdout
        assert "See it with" in start.stderr  # its first heartbeat reached the queen
        run = keeper(c.queen.url, *common, "infer", "--hive", "delta", "--max-tokens", "3", "hi", "--json", env=env)
        assert run.returncode == 0, run.stderr
        end = json.loads(run.stdout.splitlines()[-1])["data"]
        assert end["status"] == "completed" and end["hive_id"] == "delta"
        status = keeper(c.queen.url, *common, "hive", "status", "--hive-id", "delta", env=env)
        assert status.returncode == 0 and f"https://127.0.0.5:{port}" in status.stdout, status.stdout + status.stderr
    finally:
        keeper(c.queen.url, *common, "hive", "stop", "--hive-id", "delta", env=env)
