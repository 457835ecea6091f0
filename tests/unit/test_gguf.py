"""Reading GGUF headers: the bundled model and small files written here."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from rbee.hive.gguf import GGUFArray, GGUFError, quantization_name, read_gguf

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


class Writer:
    """A minimal GGUF writer: header and metadata (no tensors needed for the reader)."""

    def __init__(self, version: int = 3, order: str = "<") -> None:
        self.version = version
        self.order = order
        self.len_fmt = "Q" if version >= 2 else "I"

    def pack(self, fmt: str, value: Any) -> bytes:
        return struct.pack(self.order + fmt, value)

    def string(self, text: str | bytes) -> bytes:
        raw = text.encode() if isinstance(text, str) else text
        return self.pack(self.len_fmt, len(raw)) + raw

    def value(self, vtype: int, value: Any) -> bytes:
        if vtype == STR:
            return self.string(value)
        if vtype == ARR:
            item_type, items = value
            out = self.pack("I", item_type) + self.pack(self.len_fmt, len(items))
            return out + b"".join(self.value(item_type, v) for v in items)
        return self.pack(_FMT[vtype], value)

    def build(self, kvs: list[tuple[str, int, Any]], tensors: int = 0) -> bytes:
        out = b"GGUF" + self.pack("I", self.version) + self.pack(self.len_fmt, tensors)
        out += self.pack(self.len_fmt, len(kvs))
        for key, vtype, value in kvs:
            out += self.string(key) + self.pack("I", vtype) + self.value(vtype, value)
        return out


def llama_kvs(file_type: int = 15) -> list[tuple[str, int, Any]]:
    return [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "Tiny Llama"),
        ("general.file_type", U32, file_type),
        ("llama.context_length", U32, 2048),
        ("llama.rope.freq_base", F32, 10000.0),
        ("tokenizer.ggml.tokens", ARR, (STR, ["<s>", "</s>", "hello", "wörld"])),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0, 0.5, 1.0, 1.5])),
        ("general.tags", ARR, (ARR, [(U8, [1, 2, 3]), (STR, ["a", "bc"]), (ARR, [(I64, [7])])])),
        ("x.u8", U8, 255),
        ("x.i8", I8, -5),
        ("x.u16", U16, 65535),
        ("x.i16", I16, -300),
        ("x.i32", I32, -70000),
        ("x.bool", BOOL, True),
        ("x.u64", U64, 2**40),
        ("x.i64", I64, -(2**40)),
        ("x.f64", F64, 0.25),
        ("x.after_arrays", STR, "still read"),
    ]


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_reads_every_metadata_type_and_skips_arrays(tmp_path: Path) -> None:
    path = write(tmp_path, Writer().build(llama_kvs(), tensors=7))
    info = read_gguf(path)
    assert info.version == 3
    assert info.byte_order == "little"
    assert info.tensor_count == 7
    assert info.architecture == "llama"
    assert info.context_length == 2048
    assert info.quantization == "Q4_K_M"
    assert info.name == "Tiny Llama"
    assert info.size_bytes == path.stat().st_size
    md = info.metadata
    assert md["x.u8"] == 255 and md["x.i8"] == -5 and md["x.u16"] == 65535 and md["x.i16"] == -300
    assert md["x.i32"] == -70000 and md["x.bool"] is True and md["x.u64"] == 2**40 and md["x.i64"] == -(2**40)
    assert md["x.f64"] == 0.25
    assert md["tokenizer.ggml.tokens"] == GGUFArray("string", 4)
    assert md["tokenizer.ggml.scores"] == GGUFArray("float32", 4)
    assert md["general.tags"] == GGUFArray("array", 3)
    # Everything after the (nested) arrays is read at the right offset.
    assert md["x.after_arrays"] == "still read"


def test_version_1_uses_32_bit_counts(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, Writer(version=1).build(llama_kvs(file_type=7), tensors=3)))
    assert info.version == 1
    assert info.tensor_count == 3
    assert info.quantization == "Q8_0"
    assert info.metadata["x.after_arrays"] == "still read"


def test_big_endian_files_are_understood(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, Writer(order=">").build(llama_kvs(file_type=1), tensors=2)))
    assert info.byte_order == "big"
    assert info.tensor_count == 2
    assert info.context_length == 2048
    assert info.quantization == "F16"


def test_missing_fields_are_none(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, Writer().build([("general.alignment", U32, 32)])))
    assert info.architecture is None
    assert info.context_length is None
    assert info.quantization is None
    assert info.name is None


def test_quantization_names_follow_llama_cpp() -> None:
    assert quantization_name(15) == "Q4_K_M"
    assert quantization_name(0) == "F32"
    assert quantization_name(18) == "Q6_K"
    assert quantization_name(32) == "BF16"
    assert quantization_name(999) == "ftype-999"
    assert quantization_name(None) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"GGU", b"PK\x03\x04 this is a zip file", b"\x7fELF" + b"\0" * 64, b"gguf\x03\0\0\0"],
    ids=["empty", "short", "zip", "elf", "lowercase"],
)
def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, content, "not-a-model.bin")
    with pytest.raises(GGUFError, match="not a GGUF file") as info:
        read_gguf(path)
    assert str(path) in info.value.message
    assert info.value.status_code == 422


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    data = Writer().build(llama_kvs())
    for cut in (12, 30, len(data) // 2, len(data) - 1):
        with pytest.raises(GGUFError, match="truncated or corrupt"):
            read_gguf(write(tmp_path, data[:cut], f"cut{cut}.gguf"))


def test_a_string_array_running_past_the_end_is_refused(tmp_path: Path) -> None:
    w = Writer()
    data = w.build([("tokens", ARR, (STR, ["a", "b"]))])
    # Claim a million strings where there are two.
    data = data.replace(w.pack("Q", 2) + w.string("a"), w.pack("Q", 1_000_000) + w.string("a"))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_gguf(write(tmp_path, data))


def test_unknown_version_and_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="unsupported GGUF version 9"):
        read_gguf(write(tmp_path, b"GGUF" + struct.pack("<I", 9) + b"\0" * 16, "v9.gguf"))
    w = Writer()
    bad = b"GGUF" + w.pack("I", 3) + w.pack("Q", 0) + w.pack("Q", 1) + w.string("k") + w.pack("I", 42)
    with pytest.raises(GGUFError, match="unknown value type 42"):
        read_gguf(write(tmp_path, bad, "badtype.gguf"))


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path / "nope.gguf")


def test_the_bundled_model() -> None:
    from rbee.hive.catalog import bundled_model_path

    info = read_gguf(bundled_model_path())
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert info.tensor_count > 100
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFArray) and tokens.item_type == "string" and tokens.length > 100_000
