"""Tensor types of the .plm format. Mirrors csrc/common.h; ids are stored in files."""

from __future__ import annotations

import enum


class DType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q8_0 = 2
    Q4_0 = 3
    Q4_1 = 4
    Q4_0_G64 = 5
    Q4_0_G128 = 6
    Q4_1_G64 = 7
    Q4_1_G128 = 8
    I8 = 9
    # GGUF block layouts, kept byte for byte from GGUF files (docs/format.md)
    Q5_0 = 10
    Q5_1 = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 15
    # Row-interleaved forms for matmul weights (groups of 16 rows; layout in csrc/common.h)
    Q8_0_X16 = 16
    Q4_0_X16 = 17
    Q4_1_X16 = 18
    I8_X16 = 19
    Q5_0_X16 = 20
    Q5_1_X16 = 21
    Q4_0_G64_X16 = 22
    Q4_0_G128_X16 = 23
    Q4_1_G64_X16 = 24
    Q4_1_G128_X16 = 25
    # 2:4-sparse 4-bit (two of every four columns kept), in records of 16 rows x 64 columns
    Q4_0_24_X16 = 26
    # 2:4-sparse int8 with the int8 mode's per-row scale (records of 16 rows x 64 columns, then the row scales)
    I8_24_X16 = 27
    # unstructured-sparse int8: a bitmask per 64 columns, the stored values packed, row pointers and
    # the per-row scale (bytes depend on the values: csrc/common.h)
    I8_BITMASK = 28

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def block_elems(self) -> int:
        return _TRAITS[self][0]

    @property
    def block_bytes(self) -> int:
        return _TRAITS[self][1]

    @property
    def quantized(self) -> bool:
        return self not in (DType.F32, DType.F16, DType.BF16)

    @property
    def x16(self) -> bool:
        """A row-interleaved type (groups of 16 rows, see csrc/common.h)."""
        return self in X16_BASE

    @property
    def base(self) -> "DType":
        """The row-major type an x16 type interleaves (itself for the others)."""
        return X16_BASE.get(self, self)

    @property
    def sparse(self) -> bool:
        """A sparse type (only the kept weights stored, with their positions)."""
        return self in (DType.Q4_0_24_X16, DType.I8_24_X16)

    @property
    def bitmask(self) -> bool:
        """The unstructured-sparse type (a bitmask of stored columns per 64, row pointers)."""
        return self == DType.I8_BITMASK

    @property
    def variable(self) -> bool:
        """A type whose bytes depend on the values, not only on the shape (tensor_nbytes refuses it)."""
        return self == DType.I8_BITMASK

    @classmethod
    def from_label(cls, label: str) -> "DType":
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown tensor type {label!r}") from None


# (elements per block, bytes per block); I8 is per row (see tensor_nbytes).
_TRAITS = {
    DType.F32: (1, 4),
    DType.F16: (1, 2),
    DType.Q8_0: (32, 34),
    DType.Q4_0: (32, 18),
    DType.Q4_1: (32, 20),
    DType.Q4_0_G64: (64, 34),
    DType.Q4_0_G128: (128, 66),
    DType.Q4_1_G64: (64, 36),
    DType.Q4_1_G128: (128, 68),
    DType.I8: (1, 1),
    DType.Q5_0: (32, 22),
    DType.Q5_1: (32, 24),
    DType.Q4_K: (256, 144),
    DType.Q5_K: (256, 176),
    DType.Q6_K: (256, 210),
    DType.BF16: (1, 2),
    DType.Q8_0_X16: (32, 34),
    DType.Q4_0_X16: (32, 18),
    DType.Q4_1_X16: (32, 20),
    DType.I8_X16: (32, 32),
    DType.Q5_0_X16: (32, 22),
    DType.Q5_1_X16: (32, 24),
    DType.Q4_0_G64_X16: (64, 34),
    DType.Q4_0_G128_X16: (128, 66),
    DType.Q4_1_G64_X16: (64, 36),
    DType.Q4_1_G128_X16: (128, 68),
    DType.Q4_0_24_X16: (64, 24),  # per row: 64 columns in 24 bytes (384 per record of 16 rows)
    DType.I8_24_X16: (64, 38),    # per row: 64 columns in 38 bytes (608 per record), + its f32 scale
    DType.I8_BITMASK: (64, 0),    # variable: bitmask_nbytes
}

X16_ROWS = 16
X16_BASE = {DType.Q8_0_X16: DType.Q8_0, DType.Q4_0_X16: DType.Q4_0, DType.Q4_1_X16: DType.Q4_1,
            DType.I8_X16: DType.I8, DType.Q5_0_X16: DType.Q5_0, DType.Q5_1_X16: DType.Q5_1,
            DType.Q4_0_G64_X16: DType.Q4_0_G64, DType.Q4_0_G128_X16: DType.Q4_0_G128,
            DType.Q4_1_G64_X16: DType.Q4_1_G64, DType.Q4_1_G128_X16: DType.Q4_1_G128}
X16_OF = {base: x for x, base in X16_BASE.items()}


def tensor_nbytes(dtype: DType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` stored as `dtype` (rows = prod(shape[:-1]))."""
    if dtype.variable:
        raise ValueError(f"{dtype.label} tensors take bytes that depend on their values (pocketlm.quant.quantize)")
    cols = int(shape[-1])
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    be = dtype.block_elems
    if cols % be:
        raise ValueError(f"{dtype.label} needs the last dimension to be a multiple of {be}, got {cols}")
    if (dtype.x16 or dtype.sparse) and (len(shape) != 2 or rows % X16_ROWS):
        raise ValueError(f"{dtype.label} needs a 2-D shape with rows a multiple of {X16_ROWS}, got {tuple(shape)}")
    nbytes = rows * (cols // be) * dtype.block_bytes
    if dtype in (DType.I8, DType.I8_X16, DType.I8_24_X16):
        nbytes += rows * 4
    return nbytes
