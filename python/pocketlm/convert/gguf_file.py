"""The GGUF container (llama.cpp's model file format), read as hostile input.

Layout (GGUF v2 and v3, little-endian; github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count     x  key: string | value_type u32 | value
    tensor_count x  name: string | n_dims u32 | dims u64[n_dims] (innermost first) | type u32 | offset u64
    padding to general.alignment (default 32), then the data section; tensor offsets count from its start
    string: length u64 + UTF-8 bytes;  array: element type u32 + count u64 + elements

Every count, length and offset in the file is checked, in Python integers (no wrap-around), against
the bytes that remain before anything sized by it is built, as csrc/format/bundle_reader.cpp does
for .plm files. Tensors must lie inside the data section, aligned, without overlapping. Values are
decoded on request only, so an array nobody reads costs no memory. `gguf.GGUFReader` is not used:
it builds one numpy object per array element before any check (gigabytes for a hostile count).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketlm.errors import BundleError, UnsupportedModelError, shown

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.md, "gguf_metadata_value_type").
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_DTYPES = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
                  FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
INTEGER_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
FLOAT_TYPES = frozenset({FLOAT32, FLOAT64})
TYPE_NAMES = {UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32", INT32: "int32",
              FLOAT32: "float32", BOOL: "bool", STRING: "string", ARRAY: "array", UINT64: "uint64",
              INT64: "int64", FLOAT64: "float64"}

# Limits. The spec's own: a key is at most 65535 bytes, a tensor name at most 64, a tensor has at
# most 4 dimensions (GGML_MAX_DIMS). Ours, far above any real file and low enough that a hostile
# file cannot make the reader allocate gigabytes: pocketlm's architectures have about 15 tensors
# a layer; the largest vocabularies and merge lists have under a million entries (Gemma 3:
# 262,144 tokens); the longest chat templates are tens of kilobytes.
MAX_KEY_BYTES = 65535
MAX_NAME_BYTES = 64
MAX_DIMS = 4
MAX_TENSORS = 1 << 16
MAX_KVS = 1 << 16
MAX_ARRAY_LEN = 1 << 22
MAX_STRING_BYTES = 1 << 20

# Smallest encodings, to bound counts by the bytes left before reading them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, a uint8
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_MIN_ELEMENT_BYTES = {**{t: np.dtype(d).itemsize for t, d in _SCALAR_DTYPES.items()}, STRING: 8}


@dataclass(frozen=True)
class Field:
    """One metadata entry, not yet decoded."""

    key: str
    type: int  # a GGUF value type
    elem_type: int | None  # an array's element type
    count: int  # an array's length; 1 for a scalar or string
    offset: int  # file offset of the value (of an array's first element)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    type_id: int  # a GGML type id (gguf.GGMLQuantizationType)
    type_name: str
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Outermost first, as pocketlm and numpy write it: GGUF [K, N] is (N, K)."""
        return tuple(reversed(self.dims))


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


class GGUFFile:
    """A validated GGUF file: `fields` (key -> Field), `tensors` (in file order), `value(key)` and
    `tensor_bytes(tensor)`. The file stays memory-mapped while the object lives."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < 24:
                raise BundleError(f"{self.name}: {self.size} bytes, too short for a GGUF header (truncated?)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        self.fields: dict[str, Field] = {}
        self.tensors: list[TensorInfo] = []
        self._parse()

    # --- reading primitives: every read checked against the end of the file -------------------------------------

    def _fail(self, what: str) -> BundleError:
        return BundleError(f"{self.name}: {what}")

    def _take(self, n: int, what: str) -> int:
        """Reserves n bytes at the cursor; returns their offset."""
        start = self._pos
        if n > self.size - start:
            raise self._fail(f"the file ends inside {what} (at byte {start}: {n} bytes wanted, "
                             f"{self.size - start} left; truncated?)")
        self._pos = start + n
        return start

    def _u32(self, what: str) -> int:
        return struct.unpack_from("<I", self._map, self._take(4, what))[0]

    def _u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self._map, self._take(8, what))[0]

    def _string(self, what: str, limit: int) -> str:
        n = self._u64(f"the length of {what}")
        if n > limit:
            start = self._take(min(n, 48), what)  # some of it, to show in the message
            head = bytes(self._map[start:start + 48]).decode("utf-8", "replace")
            raise self._fail(f"{what} is {n} bytes long, more than {limit} ({shown(head)}...)")
        start = self._take(n, what)
        try:
            return str(self._map[start:start + n], "utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {start} is not valid UTF-8") from None

    # --- the header and the tensor table ------------------------------------------------------------------------

    def _parse(self) -> None:
        if self._map[:4] != MAGIC:
            raise self._fail("not a GGUF file (bad magic)")
        self._pos = 4
        version = self._u32("the version")
        if version & 0xFFFF == 0 and version:
            raise UnsupportedModelError(f"{self.name}: big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise UnsupportedModelError(f"{self.name}: GGUF version {version} is not supported "
                                        f"(supported: {', '.join(map(str, VERSIONS))})")
        self.version = version
        n_tensors = self._u64("the tensor count")
        n_kv = self._u64("the metadata count")
        room = self.size - self._pos
        if n_tensors > MAX_TENSORS or n_tensors > room // _MIN_TENSOR_INFO_BYTES:
            raise self._fail(f"the header claims {n_tensors} tensors; the file has room for at most "
                             f"{min(MAX_TENSORS, room // _MIN_TENSOR_INFO_BYTES)}")
        if n_kv > MAX_KVS or n_kv > room // _MIN_KV_BYTES:
            raise self._fail(f"the header claims {n_kv} metadata entries; the file has room for at most "
                             f"{min(MAX_KVS, room // _MIN_KV_BYTES)}")
        for i in range(n_kv):
            self._parse_field(i)
        if (n_tensors * _MIN_TENSOR_INFO_BYTES > self.size - self._pos):
            raise self._fail(f"the header claims {n_tensors} tensors; the {self.size - self._pos} bytes after "
                             "the metadata cannot hold their descriptions (truncated?)")

        self.alignment = DEFAULT_ALIGNMENT
        field = self.fields.get("general.alignment")
        if field is not None:
            if field.type != UINT32:
                raise self._fail(f"general.alignment is a {TYPE_NAMES[field.type]}, it must be a uint32")
            self.alignment = self.value("general.alignment")
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise self._fail(f"general.alignment {self.alignment} is not a power of two")

        types = _ggml_types()
        names: set[str] = set()
        for i in range(n_tensors):
            self.tensors.append(self._parse_tensor_info(i, types, names))
        self.data_start = -(-self._pos // self.alignment) * self.alignment
        if self.data_start > self.size and not self.tensors:  # a vocabulary-only file may end unpadded
            self.data_start = self.size
        if self.data_start > self.size:
            raise self._fail(f"the data section would start at byte {self.data_start}, past the end of the "
                             f"{self.size}-byte file (truncated?)")
        self._check_layout()

    def _parse_field(self, index: int) -> None:
        key = self._string(f"metadata key {index}", MAX_KEY_BYTES)
        if key in self.fields:
            raise self._fail(f"metadata key {shown(key)} appears twice")
        vtype = self._u32(f"the type of {shown(key)}")
        offset = self._pos
        if vtype == ARRAY:
            elem = self._u32(f"the element type of {shown(key)}")
            count = self._u64(f"the length of {shown(key)}")
            if elem not in _MIN_ELEMENT_BYTES:
                what = "arrays of arrays are" if elem == ARRAY else f"element type {elem} is"
                raise self._fail(f"metadata {shown(key)}: {what} not supported")
            if count > (self.size - self._pos) // _MIN_ELEMENT_BYTES[elem]:
                raise self._fail(f"metadata {shown(key)} claims {count} elements; the rest of the file "
                                 f"({self.size - self._pos} bytes) cannot hold them (truncated?)")
            offset = self._pos
            self._skip_values(elem, count, key)
            self.fields[key] = Field(key, ARRAY, elem, count, offset)
            return
        if vtype not in _MIN_ELEMENT_BYTES:
            raise self._fail(f"metadata {shown(key)} has unknown value type {vtype}")
        self._skip_values(vtype, 1, key)
        self.fields[key] = Field(key, vtype, None, 1, offset)

    def _skip_values(self, vtype: int, count: int, key: str) -> None:
        if vtype != STRING:
            self._take(count * _MIN_ELEMENT_BYTES[vtype], f"the value of {shown(key)}")
            return
        if count > MAX_ARRAY_LEN:  # walking the lengths is a Python loop: bound its time
            raise self._fail(f"metadata {shown(key)} has {count} strings, more than {MAX_ARRAY_LEN}")
        unpack, data, end, pos = struct.Struct("<Q").unpack_from, self._map, self.size, self._pos
        for _ in range(count):
            if end - pos < 8:
                raise self._fail(f"the file ends inside the value of {shown(key)} (truncated?)")
            (n,) = unpack(data, pos)
            if n > end - pos - 8:
                raise self._fail(f"a string of {n} bytes in {shown(key)} runs past the end of the file")
            pos += 8 + n
        self._pos = pos

    def _parse_tensor_info(self, index: int, types: dict, names: set) -> TensorInfo:
        name = self._string(f"the name of tensor {index}", MAX_NAME_BYTES)
        if not name:
            raise self._fail(f"tensor {index} has an empty name")
        if name in names:
            raise self._fail(f"tensor {shown(name)} appears twice")
        names.add(name)
        where = f"tensor {shown(name)}"
        n_dims = self._u32(f"the dimension count of {where}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"{where} has {n_dims} dimensions, not 1 to {MAX_DIMS}")
        dims = tuple(self._u64(f"the dimensions of {where}") for _ in range(n_dims))
        type_id = self._u32(f"the type of {where}")
        offset = self._u64(f"the offset of {where}")
        if type_id not in types:
            raise UnsupportedModelError(f"{self.name}: {where} has unknown GGML type {type_id}")
        type_name, block_elems, block_bytes = types[type_id]
        if any(d < 1 for d in dims):
            raise self._fail(f"{where} has a dimension of size 0 (shape {list(dims)})")
        if dims[0] % block_elems:
            raise self._fail(f"{where}: {type_name} needs the innermost dimension to be a multiple of "
                             f"{block_elems}, got {dims[0]}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block_elems * block_bytes  # exact: Python integers
        if n_bytes > self.size:
            raise self._fail(f"{where} of shape {list(dims)} ({type_name}) needs {n_bytes} bytes, more than "
                             f"the whole file ({self.size})")
        return TensorInfo(name, dims, type_id, type_name, offset, n_bytes)

    def _check_layout(self) -> None:
        """Each tensor aligned and inside the data section; no two overlap."""
        data_bytes = self.size - self.data_start
        for t in self.tensors:
            if t.offset % self.alignment:
                raise self._fail(f"tensor {shown(t.name)}: offset {t.offset} is not a multiple of the "
                                 f"alignment ({self.alignment})")
            if t.offset > data_bytes or t.n_bytes > data_bytes - t.offset:
                raise self._fail(f"tensor {shown(t.name)}: bytes [{t.offset}, +{t.n_bytes}) lie outside the "
                                 f"data section ({data_bytes} bytes; truncated?)")
        by_offset = sorted(self.tensors, key=lambda t: t.offset)
        for prev, t in zip(by_offset, by_offset[1:]):
            if prev.offset + prev.n_bytes > t.offset:
                raise self._fail(f"tensor {shown(t.name)} overlaps tensor {shown(prev.name)}")

    # --- decoding on request ------------------------------------------------------------------------------------

    def value(self, key: str, max_len: int = MAX_ARRAY_LEN, max_string: int = MAX_STRING_BYTES):
        """The Python value of `key`: int, float, bool, str, or a list of one of these.
        Raises BundleError for an array longer than `max_len` or a string longer than `max_string` bytes."""
        f = self.fields[key]
        if f.type == ARRAY:
            if f.count > max_len:
                raise self._fail(f"metadata {shown(key)} has {f.count} elements, more than pocketlm reads "
                                 f"({max_len})")
            if f.elem_type == STRING:
                return self._strings(f, max_string)
            arr = np.frombuffer(self._map, dtype=_SCALAR_DTYPES[f.elem_type], count=f.count, offset=f.offset)
            return arr.astype(bool).tolist() if f.elem_type == BOOL else arr.tolist()
        if f.type == STRING:
            (n,) = struct.unpack_from("<Q", self._map, f.offset)
            if n > max_string:
                raise self._fail(f"metadata {shown(key)} is a string of {n} bytes, more than pocketlm reads "
                                 f"({max_string})")
            try:
                return str(self._map[f.offset + 8:f.offset + 8 + n], "utf-8")
            except UnicodeDecodeError:
                raise self._fail(f"metadata {shown(key)} is not valid UTF-8") from None
        v = np.frombuffer(self._map, dtype=_SCALAR_DTYPES[f.type], count=1, offset=f.offset)[0]
        return bool(v) if f.type == BOOL else v.item()

    def _strings(self, f: Field, max_string: int) -> list[str]:
        unpack, data, pos = struct.Struct("<Q").unpack_from, self._map, f.offset
        out = []
        for i in range(f.count):  # lengths were checked against the file by _skip_values
            (n,) = unpack(data, pos)
            if n > max_string:
                raise self._fail(f"metadata {shown(f.key)}[{i}] is a string of {n} bytes, more than pocketlm "
                                 f"reads ({max_string})")
            try:
                out.append(str(data[pos + 8:pos + 8 + n], "utf-8"))
            except UnicodeDecodeError:
                raise self._fail(f"metadata {shown(f.key)}[{i}] is not valid UTF-8") from None
            pos += 8 + n
        return out

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view of the mapped file (bounds checked at open)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=t.n_bytes, offset=self.data_start + t.offset)
