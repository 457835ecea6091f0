"""The hive's model catalog: the bundled model, resolving, adding, removing."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from rbee.contracts import DEFAULT_MODEL
from rbee.errors import InvalidOperation, ModelNotFound
from rbee.hive.catalog import ModelCatalog
from rbee.hive.gguf import GGUFError


def tiny_gguf(path: Path, *, arch: str = "llama", file_type: int = 15, ctx: int = 2048) -> Path:
    """A GGUF header with the fields the catalog reads."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    path.parent.mkdir(parents=True, exist_ok=True)
    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s(arch),
        s("general.name") + struct.pack("<I", 8) + s(f"Tiny {arch}"),
        s("general.file_type") + struct.pack("<II", 4, file_type),
        s(f"{arch}.context_length") + struct.pack("<II", 4, ctx),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs))
    return path


@pytest.fixture
def bundled_file(tmp_path: Path) -> Path:
    return tiny_gguf(tmp_path / "files" / "bundled-model-q4_k_m.gguf", arch="gemma3")


@pytest.fixture
async def catalog(tmp_path: Path, bundled_file: Path):
    cat = ModelCatalog(tmp_path / "hives" / "localhost" / "models.sqlite", bundled=lambda: bundled_file)
    yield cat
    await cat.aclose()


async def test_the_bundled_model_is_always_there(catalog: ModelCatalog, bundled_file: Path) -> None:
    models = await catalog.models()
    assert [m.id for m in models] == ["bundled-model-q4_k_m"]
    entry = models[0]
    assert entry.alias == DEFAULT_MODEL
    assert entry.path == str(bundled_file)
    assert entry.architecture == "gemma3"
    assert entry.quantization == "Q4_K_M"
    assert entry.context_length == 2048
    assert entry.size_bytes == (await asyncio.to_thread(bundled_file.stat)).st_size
    assert entry.source == "bundled"
    as_dict = entry.to_dict()
    assert as_dict["format"] == "gguf" and as_dict["file"] == str(bundled_file)
    assert entry.to_report().alias == DEFAULT_MODEL


async def test_resolve_by_id_or_alias(catalog: ModelCatalog) -> None:
    by_alias = await catalog.resolve(DEFAULT_MODEL)
    by_id = await catalog.resolve("bundled-model-q4_k_m")
    assert by_alias == by_id


async def test_an_unknown_model_is_not_found(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFound, match="no model 'llama-70b'") as info:
        await catalog.resolve("llama-70b")
    assert DEFAULT_MODEL in info.value.message  # says what there is
    assert info.value.status_code == 404


async def test_add_and_remove_a_local_file(catalog: ModelCatalog, tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "qwen-0.5b-q8.gguf", arch="qwen2", file_type=7, ctx=32768)
    entry = await catalog.add(path, alias="qwen")
    assert entry.id == "qwen-0.5b-q8"
    assert (await catalog.resolve("qwen")).quantization == "Q8_0"
    assert {m.id for m in await catalog.models()} == {"bundled-model-q4_k_m", "qwen-0.5b-q8"}
    with pytest.raises(InvalidOperation, match="already has"):
        await catalog.add(path, model_id="other", alias="qwen")
    removed = catalog.remove("qwen")
    assert removed.id == "qwen-0.5b-q8"
    with pytest.raises(ModelNotFound):
        await catalog.resolve("qwen")
    assert path.exists()  # forgetting a model leaves its file alone


async def test_the_catalog_survives_a_restart(tmp_path: Path, bundled_file: Path) -> None:
    db = tmp_path / "models.sqlite"
    first = ModelCatalog(db, bundled=lambda: bundled_file)
    await first.add(tiny_gguf(tmp_path / "extra.gguf"), alias="extra")
    await first.aclose()
    second = ModelCatalog(db, bundled=lambda: bundled_file)
    try:
        assert {m.alias for m in await second.models()} == {DEFAULT_MODEL, "extra"}
    finally:
        await second.aclose()


async def test_a_non_gguf_file_is_refused(catalog: ModelCatalog, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        await catalog.add(path)
    assert len(await catalog.models()) == 1


async def test_bad_names_and_the_bundled_model_are_protected(catalog: ModelCatalog, tmp_path: Path) -> None:
    with pytest.raises(InvalidOperation, match="alias"):
        await catalog.add(tiny_gguf(tmp_path / "x.gguf"), alias="../escape")
    await catalog.resolve(DEFAULT_MODEL)
    with pytest.raises(InvalidOperation, match="cannot be removed"):
        catalog.remove(DEFAULT_MODEL)


async def test_a_missing_bundled_model_leaves_a_working_catalog(tmp_path: Path) -> None:
    def broken() -> Path:
        raise FileNotFoundError("the model package is not installed")

    cat = ModelCatalog(tmp_path / "models.sqlite", bundled=broken)
    try:
        assert await cat.models() == []
        with pytest.raises(ModelNotFound, match="not installed"):
            await cat.resolve(DEFAULT_MODEL)
    finally:
        await cat.aclose()


async def test_the_real_bundled_model(tmp_path: Path) -> None:
    cat = ModelCatalog(tmp_path / "models.sqlite")
    try:
        entry = await cat.resolve(DEFAULT_MODEL)
    finally:
        await cat.aclose()
    assert entry.id == "gemma-3-270m-q4_k_m"
    assert entry.architecture == "gemma3"
    assert entry.quantization == "Q4_K_M"
    assert entry.sha256 is not None and len(entry.sha256) == 64
