"""The converter's x16 rule written out independently, for the conversion and model tests."""

from __future__ import annotations

import numpy as np

from pocketlm import quant
from pocketlm.dtypes import X16_OF, DType


def wants_x16(base: DType, shape) -> bool:
    """The converter's x16 rule, written out: a 2-D weight of a type with an x16 form (Q8_0, Q4_0
    and Q4_1 of every group size, I8, Q5_0, Q5_1) whose rows come in groups of 16 and whose width
    is whole 32-blocks is stored row-interleaved."""
    return base in X16_OF and len(shape) == 2 and shape[0] % 16 == 0 and shape[-1] % 32 == 0


def assert_type(info, base: DType) -> None:
    """`info` holds `base`, in its x16 form exactly when the rule asks for it."""
    assert info.dtype.base == base, (info.name, info.dtype, base)
    assert info.dtype.x16 == wants_x16(base, info.shape), (info.name, info.dtype, info.shape)


def row_major(b, name: str) -> np.ndarray:
    """The tensor's bytes in its base type's row-major layout (x16 ones de-interleaved)."""
    info, raw = b.info(name), np.asarray(b.tensor(name))
    return quant.deinterleave(raw, info.dtype.base, info.shape) if info.dtype.x16 else raw
