"""Reading what a GGUF file says about its model, from the header alone.

A GGUF file starts with ``b"GGUF"``, a version, the tensor count and a list of
typed key/value pairs (the metadata), then the tensor infos and the weights.
Only the metadata is read. Arrays (a tokenizer's vocabulary has ~260 000
strings) are skipped by offset arithmetic over a memory map and recorded as
:class:`GGUFArray` (item type and length), so reading a 250 MB model's header
takes milliseconds and never loads its payloads.

Versions 1 (32-bit counts) to 3, and big-endian files, are understood.

With ``tensors=True`` the tensor infos after the metadata are read too, which
gives the size the file must have (:attr:`GGUFInfo.expected_size`): a download
that a server cut short, or announced with a wrong length, is caught there
even when no checksum is known.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.errors import GGUFError

__all__ = [
    "GGUFError",
    "GGUFArray",
    "GGUFInfo",
    "read_gguf",
    "check_complete",
    "FILE_TYPES",
    "GGML_TYPE_SIZES",
    "MAGIC",
    "quantization_name",
]

MAGIC = b"GGUF"
_MAGIC = MAGIC

# GGUF value types -> struct format of one item (strings and arrays are handled apart).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS: dict[int, str] = {
    _UINT8: "B",
    _INT8: "b",
    _UINT16: "H",
    _INT16: "h",
    _UINT32: "I",
    _INT32: "i",
    _FLOAT32: "f",
    _BOOL: "?",
    _UINT64: "Q",
    _INT64: "q",
    _FLOAT64: "d",
}
_TYPE_NAMES = {
    _UINT8: "uint8",
    _INT8: "int8",
    _UINT16: "uint16",
    _INT16: "int16",
    _UINT32: "uint32",
    _INT32: "int32",
    _FLOAT32: "float32",
    _BOOL: "bool",
    _STRING: "string",
    _ARRAY: "array",
    _UINT64: "uint64",
    _INT64: "int64",
    _FLOAT64: "float64",
}

#: llama.cpp's ``LLAMA_FTYPE`` enum (``general.file_type``) -> the name people use.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    33: "Q4_0_4_4",
    34: "Q4_0_4_8",
    35: "Q4_0_8_8",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

#: ggml tensor types -> (elements per block, bytes per block), from ggml's type traits.
#: A tensor of an unknown type makes the expected file size unknown, never wrong.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# Bounds that keep a corrupt header from asking for absurd work.
_MAX_KV = 1 << 20
_MAX_DEPTH = 8
_MAX_TENSORS = 1 << 20
_MAX_DIMS = 8
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFArray:
    """An array value whose payload was skipped."""

    item_type: str
    length: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    byte_order: str  # "little" | "big"
    tensor_count: int
    size_bytes: int
    metadata: dict[str, Any] = field(repr=False)
    #: The size the file must have to hold every tensor (read with ``tensors=True``;
    #: None when not read, or when a tensor's type is unknown).
    expected_size: int | None = None

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    @property
    def context_length(self) -> int | None:
        if self.architecture is None:
            return None
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def quantization(self) -> str | None:
        return quantization_name(self.file_type)


def quantization_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    return FILE_TYPES.get(file_type, f"ftype-{file_type}")


class _Cursor:
    """Reads typed values from a byte buffer, checking every bound."""

    __slots__ = ("buf", "end", "len_fmt", "order", "path", "pos")

    def __init__(self, buf: Any, path: Path, order: str, pos: int, wide: bool) -> None:
        self.buf = buf
        self.end = len(buf)
        self.path = path
        self.order = order
        self.pos = pos
        self.len_fmt = "Q" if wide else "I"

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(f"truncated or corrupt GGUF file: {self.path} (needs {n} bytes at offset {self.pos})")

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct(self.order + fmt)
        self._need(s.size)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def length(self) -> int:
        return int(self.unpack(self.len_fmt))

    def string(self) -> str:
        n = self.length()
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # Strings in an array each carry their own length, so the walk is one
        # unpack per item over the memory map: no copies, no reads.
        s = struct.Struct(self.order + self.len_fmt)
        buf, pos, end, size = self.buf, self.pos, self.end, s.size
        for _ in range(count):
            if pos + size > end:
                pos = end + 1
                break
            (n,) = s.unpack_from(buf, pos)
            pos += size + n
        if pos > end:
            raise GGUFError(f"truncated or corrupt GGUF file: {self.path} (a string array runs past the end)")
        self.pos = pos

    def value(self, vtype: int, depth: int = 0) -> Any:
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            return self.unpack(fmt)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(depth)
        raise GGUFError(f"corrupt GGUF file: {self.path} (unknown value type {vtype} at offset {self.pos - 4})")

    def array(self, depth: int) -> GGUFArray:
        if depth >= _MAX_DEPTH:
            raise GGUFError(f"corrupt GGUF file: {self.path} (arrays nested deeper than {_MAX_DEPTH})")
        item_type = int(self.unpack("I"))
        count = self.length()
        fmt = _SCALARS.get(item_type)
        if fmt is not None:
            n = struct.calcsize(fmt) * count
            self._need(n)
            self.pos += n
        elif item_type == _STRING:
            self.skip_strings(count)
        elif item_type == _ARRAY:
            for _ in range(count):
                self.array(depth + 1)
        else:
            raise GGUFError(f"corrupt GGUF file: {self.path} (unknown array item type {item_type})")
        return GGUFArray(_TYPE_NAMES[item_type], count)


def read_gguf(path: str | Path, *, tensors: bool = False) -> GGUFInfo:
    """Read a GGUF file's header and metadata; raise :class:`GGUFError` if it is not one.

    With ``tensors``, read the tensor infos as well and fill in ``expected_size``.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8 or head[:4] != _MAGIC:
                raise GGUFError(f"not a GGUF file: {path} (it starts with {head[:4]!r}, expected {_MAGIC!r})")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path, size, tensors)
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(buf: Any, path: Path, size: int, tensors: bool = False) -> GGUFInfo:
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if not 1 <= version <= 0xFFFF:
        swapped = struct.unpack_from(">I", buf, 4)[0]
        if 1 <= swapped <= 0xFFFF:
            order, version = ">", swapped
    if version not in (1, 2, 3):
        raise GGUFError(f"unsupported GGUF version {version}: {path}")
    cur = _Cursor(buf, path, order, 8, wide=version >= 2)
    tensor_count = cur.length()
    kv_count = cur.length()
    if kv_count > _MAX_KV:
        raise GGUFError(f"corrupt GGUF file: {path} (claims {kv_count} metadata entries)")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        vtype = int(cur.unpack("I"))
        metadata[key] = cur.value(vtype)
    return GGUFInfo(
        path=path,
        version=version,
        byte_order="little" if order == "<" else "big",
        tensor_count=tensor_count,
        size_bytes=size,
        metadata=metadata,
        expected_size=_expected_size(cur, tensor_count, metadata) if tensors else None,
    )


def _expected_size(cur: _Cursor, tensor_count: int, metadata: dict[str, Any]) -> int | None:
    """Where the last tensor's data ends: the smallest size a complete file has."""
    if tensor_count > _MAX_TENSORS:
        raise GGUFError(f"corrupt GGUF file: {cur.path} (claims {tensor_count} tensors)")
    end = 0
    known = True
    for _ in range(tensor_count):
        cur.string()  # the tensor's name
        n_dims = int(cur.unpack("I"))
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"corrupt GGUF file: {cur.path} (a tensor with {n_dims} dimensions)")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.length()
        ggml_type = int(cur.unpack("I"))
        offset = int(cur.unpack("Q"))
        block = GGML_TYPE_SIZES.get(ggml_type)
        if block is None:
            known = False
            continue
        per_block, block_bytes = block
        end = max(end, offset + -(-elements // per_block) * block_bytes)
    if not known:
        return None
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        alignment = _DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // alignment) * alignment
    return data_start + end if tensor_count else cur.pos


def check_complete(path: str | Path) -> GGUFInfo:
    """Read a GGUF file with its tensor infos and refuse one shorter than its tensors need."""
    info = read_gguf(path, tensors=True)
    if info.expected_size is not None and info.size_bytes < info.expected_size:
        raise GGUFError(
            f"the GGUF file is incomplete: it has {info.size_bytes} bytes, its tensors need {info.expected_size}"
        )
    return info
