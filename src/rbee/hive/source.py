"""Where a model download comes from: a local path, an http(s) URL, or a Hugging Face file.

:func:`parse_source` turns what a person typed into a :class:`Source`, or
raises :class:`~rbee.errors.InvalidOperation` naming the ``source`` field, so
a bad source is answered at ``POST`` before a job exists. The model id a
download gets is its file name's stem (:func:`model_id_for`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from rbee.errors import InvalidOperation

__all__ = ["DEFAULT_HF_ENDPOINT", "Source", "parse_source", "model_id_for", "public_url", "server_digests"]

DEFAULT_HF_ENDPOINT = "https://huggingface.co"

_HF_SOURCE = re.compile(
    r"^hf:(?P<org>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<rev>[A-Za-z0-9._/-]+?))?/(?P<file>.+)$"
)
_HF_FILE = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Source:
    """Where a model comes from, parsed and checked."""

    kind: Literal["path", "http", "hf"]
    text: str  # as the person gave it (credentials removed)
    filename: str  # the file's own name: the model id is its stem
    path: Path | None = None
    url: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    repo_file: str | None = None


def _invalid(message: str) -> InvalidOperation:
    return InvalidOperation(f"source: {message}", field="source")


def public_url(url: str) -> str:
    """The URL without user:password, for logs, events and the catalog."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


#: The longest file name a file system takes (ext4, APFS, NTFS: 255 bytes).
MAX_NAME_BYTES = 255


def parse_source(text: str, *, hf_endpoint: str = DEFAULT_HF_ENDPOINT) -> Source:
    """Parse a download source, or raise :class:`InvalidOperation` naming ``source``."""
    source = _parse_source(text, hf_endpoint=hf_endpoint)
    if len(source.filename.encode("utf-8")) > MAX_NAME_BYTES - len(".part"):
        raise _invalid(f"the file name is over {MAX_NAME_BYTES - len('.part')} bytes; no file system here can hold it")
    if not source.filename or source.filename in (".", "..") or "\x00" in source.filename:
        raise _invalid(f"{text.strip()!r} names no file")
    return source


def _parse_source(text: str, *, hf_endpoint: str = DEFAULT_HF_ENDPOINT) -> Source:
    text = text.strip()
    if not text:
        raise _invalid("must not be empty")
    if text.startswith("hf:"):
        match = _HF_SOURCE.match(text)
        if match is None or not _HF_FILE.match(match["file"]) or ".." in match["file"].split("/"):
            raise _invalid(
                f"a Hugging Face file is hf:ORG/REPO/FILE.gguf or hf:ORG/REPO@REVISION/FILE.gguf (got {text!r})"
            )
        repo_id = f"{match['org']}/{match['repo']}"
        return Source(
            kind="hf",
            text=text,
            filename=match["file"].rsplit("/", 1)[-1],
            repo_id=repo_id,
            revision=match["rev"] or "main",
            repo_file=match["file"],
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise _invalid(f"the URL {text!r} has no host")
        try:
            parts.port  # noqa: B018 - raises for a bad port
        except ValueError:
            raise _invalid(f"the URL {text!r} has an invalid port") from None
        url = _hf_blob_to_resolve(text, hf_endpoint)
        name = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1]) or parts.hostname
        return Source(kind="http", text=public_url(url), filename=name, url=url)
    if scheme == "file":
        text = unquote(parts.path)
    elif scheme and len(scheme) > 1:
        raise _invalid(f"unsupported scheme {scheme!r}; give a local path, an http(s):// URL or hf:ORG/REPO/FILE.gguf")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise _invalid(
            f"a local path must be absolute on the hive's machine (got {text!r}); "
            "`rbee model download` makes a path to a file on your machine absolute"
        )
    return Source(kind="path", text=str(path), filename=path.name, path=path)


def _hf_blob_to_resolve(url: str, hf_endpoint: str) -> str:
    """A Hugging Face page URL (``/blob/``) names the file's download URL (``/resolve/``)."""
    parts = urlsplit(url)
    hub = urlsplit(hf_endpoint)
    if parts.hostname in (hub.hostname, "huggingface.co", "hf.co") and "/blob/" in parts.path:
        return urlunsplit(parts._replace(path=parts.path.replace("/blob/", "/resolve/", 1)))
    return url


def model_id_for(filename: str) -> str:
    """A catalog id from a file name: its stem, with anything outside ``[A-Za-z0-9._-]`` made ``-``."""
    stem = filename[: -len(".gguf")] if filename.lower().endswith(".gguf") else filename
    cleaned = _ID_CHARS.sub("-", stem).strip("-.") or "model"
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    return cleaned[:128]


def server_digests(headers: httpx.Headers) -> dict[str, str]:
    """SHA-256 digests a server announces for the whole file, as hex."""
    found: dict[str, str] = {}
    for header in ("repr-digest", "digest"):
        for item in headers.get_list(header, split_commas=True):
            name, _, value = item.strip().partition("=")
            if name.strip().lower() != "sha-256":
                continue
            raw = value.strip().strip(":")
            try:
                found[header] = base64.b64decode(raw, validate=True).hex()
            except (binascii.Error, ValueError):
                continue
    linked = (headers.get("x-linked-etag") or "").strip().strip('"').lower()
    if _HEX64.match(linked.removeprefix("w/").strip('"')):
        found["x-linked-etag"] = linked.removeprefix("w/").strip('"')
    return {k: v for k, v in found.items() if _HEX64.match(v)}
