"""Model downloads: a source (local path, http(s) URL, Hugging Face file) into the catalog, or nothing.

A download streams into a hidden ``.part`` file inside the hive's models
directory (``<home>/models/<hive_id>/``), hashing as it writes and emitting
``progress`` events (bytes done, total, rate). The first bytes must be the GGUF
magic, so a web page or an error document is refused before much is written.
A connection that drops is resumed where it broke (HTTP ``Range`` on the
``.part`` file); a server that does not resume is read again from the start.
When the bytes are all there, the file is verified (a known SHA-256: the
``sha256`` field, or a digest the server sent; and the GGUF header with its
tensor table, which catches a file shorter than its tensors need) and lands in
one step: renamed into place and inserted in the catalog together
(:meth:`ModelCatalog.land`). Any failure, cancellation included, removes the
``.part`` file: the catalog and the models directory hold a whole model or
nothing. Only a hive that dies mid-download leaves its ``.part`` behind, and
the next download of the same source resumes from it.

Hugging Face files (``hf:ORG/REPO/FILE.gguf``, ``hf:ORG/REPO@REVISION/FILE.gguf``)
are located through ``huggingface_hub`` (its resolve URL, the file's size and,
for LFS files, its SHA-256) at a configurable endpoint (``--hf-endpoint`` /
``HF_ENDPOINT``), then fetched through the same path as any URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from rbee.contracts.operations import ModelDownload, check_model_ref
from rbee.errors import (
    ChecksumMismatch,
    DownloadFailed,
    GGUFError,
    InvalidOperation,
    JobConflict,
    ModelNotFound,
    RbeeError,
)
from rbee.hive.catalog import ModelCatalog, ModelEntry
from rbee.hive.gguf import MAGIC, check_complete
from rbee.hive.policy import DownloadPolicy
from rbee.hive.source import DEFAULT_HF_ENDPOINT, Source, model_id_for, parse_source, public_url, server_digests
from rbee.hive.transfer import WRITE_CHUNK, PartFile, Progress, human_bytes
from rbee.narration import narrate

__all__ = ["Downloader", "DownloadFailed", "ChecksumMismatch", "RETRIES"]

#: Consecutive failed attempts (no byte gained) before a download gives up.
RETRIES = 5

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- the downloader ------------------------------------------------------------


@dataclass
class _Plan:
    source: Source
    model_id: str
    alias: str | None
    sha256: str | None
    expected: dict[str, str] = field(default_factory=dict)  # who said which sha256


class Downloader:
    """Runs ``model_download`` for one hive; owns its HTTP client (close it with :meth:`aclose`)."""

    def __init__(
        self,
        *,
        catalog: ModelCatalog,
        models_dir: Path,
        hive_id: str = "localhost",
        hf_endpoint: str | None = None,
        http: httpx.AsyncClient | None = None,
        retries: int = RETRIES,
        retry_delay_s: float = 0.5,
        policy: DownloadPolicy | None = None,
    ) -> None:
        self.catalog = catalog
        self.models_dir = models_dir
        self.hive_id = hive_id
        self.hf_endpoint = (hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
        self.policy = policy or DownloadPolicy(model_dirs=[models_dir.parent])
        # The hub the operator configured is theirs to trust, wherever it is.
        self.policy.hosts.add((urlsplit(self.hf_endpoint).hostname or "").lower())
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=10.0),
            follow_redirects=True,
            headers={"User-Agent": "rbee-hive"},
            # Every request, redirects included, goes through the policy with its addresses as resolved then.
            event_hooks={"request": [self._check_request]},
        )
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self._inflight: set[str] = set()

    async def _check_request(self, request: httpx.Request) -> None:
        await self.policy.check_url(str(request.url))

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    # -- admission (cheap, at POST) -----------------------------------------

    def plan(self, op: ModelDownload) -> _Plan:
        """Check what can be checked without the network; raise the error POST answers with."""
        source = parse_source(op.source, hf_endpoint=self.hf_endpoint)
        if source.kind == "path" and source.path is not None:
            self.policy.check_path(source.path)
        elif source.kind == "http" and source.url is not None:
            self.policy.check_host(urlsplit(source.url).hostname or "")
        model_id = model_id_for(source.filename)
        try:
            check_model_ref(model_id)
        except ValueError as exc:  # pragma: no cover - model_id_for builds a valid id
            raise InvalidOperation(f"source: the file name gives no usable model id: {exc}", field="source") from None
        for name, what in ((model_id, "id"), (op.alias, "alias")):
            if name is None:
                continue
            if name in self._inflight:
                raise JobConflict(f"a download of {name!r} is already running on hive {self.hive_id}")
            existing = self.catalog.find(name)
            if existing is not None:
                raise JobConflict(
                    f"hive {self.hive_id} already has a model named {name!r} ({existing.id}); "
                    + (
                        "choose another --alias"
                        if what == "alias" and existing.id != name
                        else f"delete it first with `rbee model delete {name} --hive {self.hive_id}`"
                    ),
                    model=name,
                )
        if source.kind == "path":
            assert source.path is not None
            if not source.path.is_file():
                what = "a directory" if source.path.is_dir() else "no such file"
                raise ModelNotFound(f"{source.path} on hive {self.hive_id}: {what}", model=str(source.path))
        sha = op.sha256.lower() if op.sha256 else None
        plan = _Plan(source, model_id, op.alias if op.alias != model_id else None, sha)
        if sha:
            plan.expected["the sha256 option"] = sha
        return plan

    # -- running -------------------------------------------------------------

    async def run(self, op: ModelDownload) -> ModelEntry:
        plan = self.plan(op)
        names = {plan.model_id, *([plan.alias] if plan.alias else [])}
        self._inflight.update(names)
        try:
            return await self._run(plan)
        finally:
            self._inflight.difference_update(names)

    async def _run(self, plan: _Plan) -> ModelEntry:
        source = plan.source
        await asyncio.to_thread(self.models_dir.mkdir, parents=True, exist_ok=True)
        key = hashlib.sha256(source.text.encode()).hexdigest()[:12]
        part = PartFile(self.models_dir / f".{plan.model_id}.{key}.part")
        final = self.models_dir / f"{plan.model_id}.gguf"
        progress = Progress(model=plan.model_id, file=source.filename)
        started = time.monotonic()
        narrate(
            "download_start",
            f"Downloading {source.text} to hive {self.hive_id} as {plan.model_id}",
            source=source.text,
            model=plan.model_id,
            kind=source.kind,
        )
        try:
            if source.kind == "path":
                await self._copy(plan, part, progress)
            elif source.kind == "hf":
                url, headers = await self._locate_hf(plan)
                await self._fetch(plan, url, headers, part, progress)
            else:
                assert source.url is not None
                await self._fetch(plan, source.url, {}, part, progress)
            await part.flush()
            part.close()
            entry = await self._verify_and_land(plan, part, final)
        except BaseException:
            part.discard()
            raise
        elapsed = time.monotonic() - started
        narrate(
            "download_complete",
            f"Downloaded {plan.model_id} ({human_bytes(entry.size_bytes)}, {entry.architecture or 'unknown'} "
            f"{entry.quantization or ''}) in {elapsed:.1f} s; use it with: rbee infer -m {entry.alias or entry.id}"
            + (f" --hive {self.hive_id}" if self.hive_id != "localhost" else "")
            + ' "..."',
            model=entry.id,
            alias=entry.alias,
            size_bytes=entry.size_bytes,
            duration_ms=round(elapsed * 1000, 1),
        )
        return entry

    # -- sources -------------------------------------------------------------

    async def _copy(self, plan: _Plan, part: PartFile, progress: Progress) -> int:
        path = plan.source.path
        assert path is not None
        try:
            src = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            raise DownloadFailed(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            total = os.fstat(src.fileno()).st_size
            await self._check_space(total)
            await part.open(resume=False)
            head = await asyncio.to_thread(src.read, 4)
            _check_magic(head, plan.source.text, None)
            await part.write(head)
            while True:
                block = await asyncio.to_thread(src.read, 4 * WRITE_CHUNK)
                if not block:
                    break
                await part.write(block)
                progress(part.size, total)
            progress(part.size, total, final=True)
            return total
        finally:
            src.close()

    async def _locate_hf(self, plan: _Plan) -> tuple[str, dict[str, str]]:
        """The file's URL, size and SHA-256 from the hub (through ``huggingface_hub``)."""
        source = plan.source
        assert source.repo_id and source.repo_file
        try:
            from huggingface_hub import get_hf_file_metadata, hf_hub_url
            from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover - a declared dependency
            raise DownloadFailed("Hugging Face sources need the huggingface_hub package on the hive") from None
        url = hf_hub_url(source.repo_id, source.repo_file, revision=source.revision, endpoint=self.hf_endpoint)
        narrate("download_locate", f"Asking {self.hf_endpoint} for {source.repo_id}/{source.repo_file}", url=url)
        try:
            meta = await asyncio.to_thread(get_hf_file_metadata, url, endpoint=self.hf_endpoint)
        except Exception as exc:
            raise _hf_error(exc, source, self.hf_endpoint) from None
        etag = (meta.etag or "").strip('"').lower()
        if _HEX64.match(etag):
            plan.expected.setdefault("the Hugging Face hub", etag)
        location = meta.location or url
        headers: dict[str, str] = {}
        if urlsplit(location).netloc == urlsplit(self.hf_endpoint).netloc:
            # The hub's own token goes to the hub only, never to the storage it redirects to.
            headers = {k: v for k, v in build_hf_headers().items() if k.lower() == "authorization"}
        size = f" ({human_bytes(meta.size)})" if meta.size else ""
        narrate(
            "download_located",
            f"{source.repo_id}/{source.repo_file}{size} at revision {meta.commit_hash or source.revision}",
        )
        return location, headers

    async def _fetch(
        self, plan: _Plan, url: str, headers: dict[str, str], part: PartFile, progress: Progress
    ) -> int | None:
        """GET ``url`` into ``part``, resuming with ``Range`` after a broken connection."""
        where = public_url(url)
        await part.open(resume=True)
        if part.size:
            narrate("download_resume", f"Resuming from the {human_bytes(part.size)} already downloaded", done=part.size)
        transfer = _Transfer()
        failures = 0
        while True:
            attempt_start = part.size
            try:
                return await self._attempt(plan, url, headers, part, progress, transfer)
            except (httpx.TransportError, _Retry) as exc:
                total = transfer.total
                await part.flush()
                gained = part.size > attempt_start
                failures = 1 if gained else failures + 1
                why = exc.reason if isinstance(exc, _Retry) else _why(exc)
                if failures > self.retries:
                    raise DownloadFailed(
                        f"the download from {where} failed {failures} times in a row at {human_bytes(part.size)}"
                        + (f" of {human_bytes(total)}" if total else "")
                        + f": {why}"
                    ) from None
                delay = min(self.retry_delay_s * 2 ** (failures - 1), 8.0)
                narrate(
                    "download_retry",
                    f"The download broke at {human_bytes(part.size)}"
                    + (f" of {human_bytes(total)}" if total else "")
                    + f" ({why}); resuming in {delay:g} s",
                    level="warn",
                    done=part.size,
                    attempt=failures + 1,
                )
                progress.reset()
                await asyncio.sleep(delay)

    async def _attempt(
        self,
        plan: _Plan,
        url: str,
        headers: dict[str, str],
        part: PartFile,
        progress: Progress,
        transfer: _Transfer,
    ) -> int | None:
        where = public_url(url)
        total = transfer.total
        request_headers = {**headers, "Accept-Encoding": "identity"}
        offset = part.size
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        async with self.http.stream("GET", url, headers=request_headers) as response:
            status = response.status_code
            if status == 416 and offset:
                real = _range_total(response.headers.get("content-range"))
                if real == offset:
                    if total is not None and total != real:
                        narrate(
                            "download_length",
                            f"{where} announced {total} bytes but the file has {real}",
                            level="warn",
                        )
                    progress(offset, real, final=True)
                    return real
                await part.restart()
                raise _Retry("the server refused to resume; starting over")
            if status >= 400:
                raise _http_error(response, where)
            if status == 206 and offset:
                start = _range_start(response.headers.get("content-range"))
                if start != offset:
                    await part.restart()
                    raise _Retry(f"the server resumed at byte {start}, not {offset}; starting over")
                announced = _range_total(response.headers.get("content-range"))
            else:
                if offset:
                    narrate("download_restart", f"{where} does not resume downloads; starting over", level="warn")
                    await part.restart()
                    progress.reset()
                length = response.headers.get("content-length")
                announced = int(length) if length and length.isdigit() else None
                self._note_digests(plan, response.headers, where)
            if announced is not None:
                if total is not None and announced != total:
                    narrate("download_length", f"{where} now announces {announced} bytes, not {total}", level="warn")
                total = transfer.total = announced
                if part.size == 0:
                    await self._check_space(total)
            head: bytes | None = b"" if part.size == 0 else None
            content_type = response.headers.get("content-type")
            async for chunk in response.aiter_raw():
                if head is not None:
                    # Nothing is written before the first bytes say this is a GGUF file.
                    head += chunk
                    if len(head) < len(MAGIC):
                        continue
                    _check_magic(head, plan.source.text, content_type)
                    chunk, head = head, None
                await part.write(chunk)
                progress(part.size, total)
            if head is not None and part.size == 0:
                _check_magic(head, plan.source.text, content_type)
        if total is not None and part.size < total:
            raise _Retry(f"the server closed the connection at {part.size} of {total} bytes")
        if total is not None and part.size > total:
            await part.restart()
            raise DownloadFailed(f"{where} sent more bytes than it announced ({total}); the file was discarded")
        progress(part.size, total, final=True)
        return part.size

    def _note_digests(self, plan: _Plan, headers: httpx.Headers, where: str) -> None:
        for name, value in server_digests(headers).items():
            plan.expected.setdefault(f"{name} from {urlsplit(where).netloc}", value)

    async def _check_space(self, total: int) -> None:
        try:
            free = (await asyncio.to_thread(shutil.disk_usage, self.models_dir)).free
        except OSError:
            return
        if total > free:
            raise DownloadFailed(
                f"not enough free space in {self.models_dir}: the model needs {human_bytes(total)}, "
                f"{human_bytes(free)} is free"
            )

    # -- verifying and landing ---------------------------------------------

    async def _verify_and_land(self, plan: _Plan, part: PartFile, final: Path) -> ModelEntry:
        digest = part.hasher.hexdigest()
        for who, expected in plan.expected.items():
            if digest != expected:
                raise ChecksumMismatch(
                    f"the SHA-256 of {plan.source.text} is {digest}, but {who} says {expected}; the file was discarded"
                )
        if plan.expected:
            narrate("download_checksum", f"SHA-256 verified ({digest[:16]}...)", sha256=digest)
        try:
            info = await asyncio.to_thread(check_complete, part.path)
        except GGUFError as exc:
            message = exc.message.replace(str(part.path), plan.source.text)
            raise GGUFError(f"{message}; the file was discarded") from None
        narrate(
            "download_verified",
            f"GGUF file checked: {info.architecture or 'unknown architecture'}, "
            f"{info.quantization or 'unknown quantization'}, {info.tensor_count} tensors",
            architecture=info.architecture,
        )
        return await self.catalog.land(
            part.path,
            final,
            model_id=plan.model_id,
            alias=plan.alias,
            sha256=digest,
            source=plan.source.text,
            info=info,
        )


# -- helpers -------------------------------------------------------------------


@dataclass
class _Transfer:
    """What the attempts at one URL have learnt: the file's size, as announced."""

    total: int | None = None


class _Retry(Exception):
    """An attempt ended early in a way that a new attempt may fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_magic(head: bytes, source: str, content_type: str | None) -> None:
    """Refuse what is not a GGUF file, without saying what it holds instead.

    The message never shows the bytes read: a download source can point at any file
    the hive can read or any service it can reach, and its error reaches the caller.
    """
    if head[: len(MAGIC)] == MAGIC:
        return
    hint = ""
    if content_type is not None and "html" in content_type.lower():
        hint = " (the server sent a web page, not a model file: use the file's direct download link"
        hint += ", for Hugging Face the /resolve/ URL or hf:ORG/REPO/FILE.gguf)"
    raise GGUFError(f"{source} is not a GGUF model file: it does not start with 'GGUF'{hint}")


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", content_range or "")
    return int(match.group(1)) if match else None


def _range_total(content_range: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {str(exc) or 'connection refused'}"
    if isinstance(exc, httpx.TimeoutException):
        return "no data in time"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the connection closed in the middle of the file"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _http_error(response: httpx.Response, where: str) -> Exception:
    status = response.status_code
    reason = response.reason_phrase or ""
    if status in (404, 410):
        return ModelNotFound(f"{where} answered {status} {reason}: no file there; check the URL", model=where)
    if status in (401, 403):
        return DownloadFailed(
            f"{where} answered {status} {reason}: the file needs credentials "
            "(for a gated Hugging Face model, set HF_TOKEN where the hive runs)"
        )
    if status >= 500 or status == 429:
        # Worth another try: the retry loop treats it as a broken connection.
        return _Retry(f"the server answered {status} {reason}")
    return DownloadFailed(f"{where} answered {status} {reason}")


def _hf_error(exc: Exception, source: Source, endpoint: str) -> RbeeError:
    name = type(exc).__name__
    what = f"{source.repo_id}/{source.repo_file}"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return ModelNotFound(
            f"{endpoint} has no file {source.repo_file!r} in {source.repo_id} at revision {source.revision}"
        )
    if name == "RepositoryNotFoundError":
        return ModelNotFound(
            f"{endpoint} has no repository {source.repo_id!r} (or it is private: set HF_TOKEN where the hive runs)"
        )
    if name == "RevisionNotFoundError":
        return ModelNotFound(f"{endpoint} has no revision {source.revision!r} of {source.repo_id}")
    if name == "GatedRepoError":
        return DownloadFailed(
            f"{source.repo_id} is gated: accept its terms on the hub and set HF_TOKEN where the hive runs"
        )
    if name == "OfflineModeIsEnabled":
        return DownloadFailed(f"cannot fetch {what}: HF_HUB_OFFLINE is set on the hive")
    text = (str(exc) or name).splitlines()[0][:200]
    return DownloadFailed(
        f"cannot reach {endpoint} for {what}: {text} (set HF_ENDPOINT or --hf-endpoint on the hive for a mirror)"
    )
