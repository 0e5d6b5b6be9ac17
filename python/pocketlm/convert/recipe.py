"""The quantization recipe: which .plm type each tensor gets (docs/quant.md).

  1-D tensors (norms, biases, rope_freqs)   F32 in every mode
  f32                                       F32
  f16                                       F16
  int8                                      I8 (one f32 scale per output row; per token for embeddings);
                                            with group_size=32, Q8_0 (one f16 scale per 32 weights)
  int4                                      linear weights Q4_0/Q4_1 at the chosen group size;
                                            token_embd and output Q8_0 (most error-sensitive)
  sparse="auto" (int4 g32 symmetric, or     block linear weights with at most two non-zeros in every
  int8 with row scales)                     four columns (pruned 2:4 at conversion or in the source):
                                            Q4_0_24_X16, 2:4-sparse 4-bit (3.0 bits per weight), or
                                            I8_24_X16, 2:4-sparse int8 (4.75 bits per weight); in
                                            int8, half zeros or more otherwise: I8_BITMASK
  head="int4" (int4 or int8 mode)           token_embd and output 4-bit as well (Q4_0/Q4_1, the
                                            linears' group size; 32 in int8 mode): the head is
                                            ~40 % of a small model's bytes per decoded token
  keep (quant=None, GGUF)                   the source type when pocketlm stores it bit-exactly,
                                            else the source's fallback (see gguf_source.py)

A 2-D tensor whose last dimension is not a multiple of 32 (the quantized matmul kernels work on
32-wide blocks of K, i8 included) or of the chosen type's block falls back to F16.
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketlm.dtypes import X16_OF, X16_ROWS, DType

# Quantized matmul kernels walk K in blocks of 32, for every quantized type (i8 too).
QUANT_K_MULTIPLE = 32
MODES = ("f32", "f16", "int8", "int4", "keep")
GROUP_SIZES = (32, 64, 128)
INT8_GROUP_SIZES = (None, 32)  # None: one scale per row
HEAD_TYPES = ("int8", "int4")

_Q4 = {
    (True, 32): DType.Q4_0, (True, 64): DType.Q4_0_G64, (True, 128): DType.Q4_0_G128,
    (False, 32): DType.Q4_1, (False, 64): DType.Q4_1_G64, (False, 128): DType.Q4_1_G128,
}
# Kept at 8 bits in int4 mode: the embeddings and the output head.
HIGH_PRECISION = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class Recipe:
    mode: str
    group_size: int | None = None  # int4: 32 when None; int8: None = per row, or 32
    symmetric: bool = True
    head: str | None = None  # int4/int8 modes: "int8" (default) or "int4" for token_embd and output
    sparse: str = "auto"     # "auto": 2:4 block linear weights as Q4_0_24_X16 / I8_24_X16; "off": dense

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.sparse not in ("auto", "off"):
            raise ValueError(f"sparse must be 'auto' or 'off', got {self.sparse!r}")
        if self.head is not None:
            if self.head not in HEAD_TYPES:
                raise ValueError(f"head must be one of {', '.join(HEAD_TYPES)}, got {self.head!r}")
            if self.mode not in ("int4", "int8"):
                raise ValueError(f"a head type applies to int4 and int8 conversions, not to {self.mode!r}")
        elif self.mode in ("int4", "int8"):
            object.__setattr__(self, "head", "int8")
        if self.mode == "int8":
            if self.group_size not in INT8_GROUP_SIZES:
                raise ValueError(f"int8 group_size must be None (one scale per row) or 32, got {self.group_size!r}")
            if not self.symmetric:
                raise ValueError("int8 is symmetric only (asymmetric groups are an int4 option)")
        elif self.group_size is None:
            object.__setattr__(self, "group_size", 32)
        elif self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    def wanted(self, name: str, shape: tuple[int, ...], keep: DType | None = None) -> DType:
        """The type the recipe asks for, before the block-size check. `keep`: the type for keep mode."""
        if len(shape) == 1 or name == "rope_freqs.weight" or self.mode == "f32":
            return DType.F32
        if self.mode == "keep":
            assert keep is not None
            return keep
        if self.mode == "f16":
            return DType.F16
        if name in HIGH_PRECISION and self.head == "int4":
            return _Q4[(self.symmetric, self.group_size if self.mode == "int4" else 32)]
        if self.mode == "int8":
            return DType.I8 if self.group_size is None else DType.Q8_0
        if name in HIGH_PRECISION:
            return DType.Q8_0
        return _Q4[(self.symmetric, self.group_size)]

    def choose(self, name: str, shape: tuple[int, ...], keep: DType | None = None) -> tuple[DType, bool]:
        """(type, fell_back): the wanted type, or F16 when the last dimension does not fit its blocks."""
        dtype = self.wanted(name, shape, keep)
        if dtype.quantized and shape[-1] % max(QUANT_K_MULTIPLE, dtype.block_elems):
            return DType.F16, True
        return x16_layout(dtype, shape), False

    def describe(self) -> dict:
        if self.mode == "int4":
            return {"mode": "int4", "group_size": self.group_size, "symmetric": self.symmetric, "head": self.head,
                    "sparse": self.sparse}
        if self.mode == "int8":  # group_size None: one scale per row; no zero point
            return {"mode": "int8", "group_size": self.group_size, "symmetric": True, "head": self.head,
                    "sparse": self.sparse}
        return {"mode": self.mode, "group_size": None, "symmetric": None}


def x16_layout(dtype: DType, shape: tuple[int, ...]) -> DType:
    """The row-interleaved form of `dtype` for a 2-D weight whose rows come in groups of 16 (the
    layout the matmul kernels stream fastest, csrc/common.h), else `dtype` itself. Same bytes
    per tensor; embeddings read through it too (a row is gathered back)."""
    if dtype in X16_OF and len(shape) == 2 and shape[0] % X16_ROWS == 0 and shape[-1] % 32 == 0:
        return X16_OF[dtype]
    return dtype
