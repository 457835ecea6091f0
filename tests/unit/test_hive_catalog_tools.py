"""The catalog says which models' own chat templates render tools, and the hive reports it."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

from rbee.hive.catalog import ModelCatalog

HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{%- endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
PLAIN = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"


def gguf(path: Path, template: str | None) -> Path:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [s("general.architecture") + struct.pack("<I", 8) + s("qwen2")]
    if template is not None:
        kvs.append(s("tokenizer.chat_template") + struct.pack("<I", 8) + s(template))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs))
    return path


async def test_a_template_that_reads_tools_is_recorded(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models.sqlite", bundled=None)
    try:
        tools = await catalog.add(gguf(tmp_path / "hermes.gguf", HERMES), alias="hermes")
        plain = await catalog.add(gguf(tmp_path / "plain.gguf", PLAIN), alias="plain")
        none = await catalog.add(gguf(tmp_path / "none.gguf", None), alias="none")
        assert (tools.chat_tools, plain.chat_tools, none.chat_tools) == (True, False, False)
        assert tools.to_report().chat_tools and not plain.to_report().chat_tools
        assert tools.to_dict()["chat_tools"] is True and none.to_report().chat_template == "chatml"
        assert catalog.find("hermes").chat_tools  # type: ignore[union-attr]
    finally:
        await catalog.aclose()


async def test_a_catalog_from_before_learns_it_from_the_header(tmp_path: Path) -> None:
    db = tmp_path / "models.sqlite"
    path = gguf(tmp_path / "hermes.gguf", HERMES)
    old = sqlite3.connect(db)
    old.execute(
        "CREATE TABLE models (id TEXT PRIMARY KEY, alias TEXT UNIQUE, path TEXT NOT NULL, size_bytes INTEGER NOT NULL,"
        " sha256 TEXT, architecture TEXT, context_length INTEGER, quantization TEXT, name TEXT,"
        " source TEXT NOT NULL DEFAULT 'local', added_at REAL NOT NULL, chat_template TEXT)"
    )
    old.execute(
        "INSERT INTO models (id, alias, path, size_bytes, added_at, chat_template) VALUES (?, ?, ?, ?, ?, ?)",
        ("hermes", None, str(path), path.stat().st_size, 1.0, "gguf"),
    )
    old.commit()
    old.close()
    catalog = ModelCatalog(db, bundled=None)
    try:
        assert catalog.find("hermes").chat_tools is None  # type: ignore[union-attr]
        (entry,) = await catalog.models()
        assert entry.chat_tools and entry.chat_template == "gguf"
    finally:
        await catalog.aclose()
