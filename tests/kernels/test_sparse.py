"""The 2:4-sparse types Q4_0_24_X16 (4-bit) and I8_24_X16 (int8, per-row scales): their encodings
against an independent reading of the layouts in csrc/common.h, every variant's matmul against the
dense Q4_0 / I8 kernel on the same weights with their zeros, and hostile pattern codes refused by
the bundle reader."""

from __future__ import annotations

import numpy as np
import pytest
from kernelutil import REMOTE, kernels, make_matmul_case, simd_variants, variants

from pocketlm.dtypes import DType
from pocketlm.quant import SPARSE24_PAIRS, dequantize, is_2_of_4, quantize

S24 = DType.Q4_0_24_X16
I24 = DType.I8_24_X16


def _pruned(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    g = w.reshape(rows, cols // 4, 4)
    np.put_along_axis(g, np.argsort(np.abs(g), axis=-1)[..., :2], 0.0, axis=-1)
    g[rng.random(g.shape[:2]) < 0.1, :] = 0.0      # groups with no weight
    one = rng.random(g.shape[:2]) < 0.1            # groups with one
    g[one, 0] = 0.0
    return w


def _pattern_codes(rec: np.ndarray, pat: int, i: int) -> list[int]:
    """Row i's 16 pattern codes from a record whose codes start at byte `pat`, bit by bit as the doc says."""
    codes = []
    for g in range(16):
        u, k = (g % 8) // 2, (2 if g >= 8 else 0) + g % 2
        bit = pat * 8 + 24 * 8 * u + 12 * i + 3 * k
        codes.append(sum(((rec[(bit + t) // 8] >> ((bit + t) % 8)) & 1) << t for t in range(3)))
    return codes


def _read_layout(raw: np.ndarray, rows: int, cols: int):
    """The doc's layout read byte by byte: (d [rows, cols/64], q [rows, cols/64, 32], code [rows, cols/64, 16])."""
    nb = cols // 64
    d = np.zeros((rows, nb), np.float32)
    q = np.zeros((rows, nb, 32), np.int64)
    code = np.zeros((rows, nb, 16), np.int64)
    for n in range(rows):
        for b in range(nb):
            rec = raw[((n // 16) * nb + b) * 384:][:384]
            i = n % 16
            d[n, b] = rec[2 * i:2 * i + 2].copy().view("<f2")[0]
            for j in range(16):
                byte = rec[32 + 64 * (j // 4) + 4 * i + j % 4]
                q[n, b, j], q[n, b, 16 + j] = byte & 15, byte >> 4
            code[n, b] = _pattern_codes(rec, 288, i)
    return d, q, code


def _read_layout_i8(raw: np.ndarray, rows: int, cols: int):
    """I8_24_X16 read byte by byte: (s [rows], q [rows, cols/64, 32], code [rows, cols/64, 16])."""
    nb = cols // 64
    s = raw[(rows // 16) * nb * 608:].copy().view("<f4")
    q = np.zeros((rows, nb, 32), np.int64)
    code = np.zeros((rows, nb, 16), np.int64)
    for n in range(rows):
        for b in range(nb):
            rec = raw[((n // 16) * nb + b) * 608:][:608]
            i = n % 16
            for v in range(32):
                q[n, b, v] = rec[64 * (v // 4) + 4 * i + v % 4:][:1].view(np.int8)[0]
            code[n, b] = _pattern_codes(rec, 512, i)
    return s, q, code


def _place(q, code, fill) -> np.ndarray:
    """Values q [rows, nb, 32] at the columns their pattern codes say: [rows, nb * 64], `fill` elsewhere."""
    rows, nb, _ = q.shape
    full = np.full((rows, nb, 64), fill, np.int64)
    for g in range(16):
        pairs = np.array(SPARSE24_PAIRS)[code[:, :, g]]
        np.put_along_axis(full[:, :, 4 * g:4 * g + 4], pairs[..., :1], q[:, :, 2 * g, None], axis=-1)
        np.put_along_axis(full[:, :, 4 * g:4 * g + 4], pairs[..., 1:], q[:, :, 2 * g + 1, None], axis=-1)
    return full.reshape(rows, nb * 64)


def _dense_i8(s, q, code) -> np.ndarray:
    """The same weights as dense I8 bytes (the codes, the pruned ones 0, then the row scales)."""
    return np.concatenate([_place(q, code, 0).astype(np.int8).reshape(-1).view(np.uint8),
                           s.astype("<f4").view(np.uint8)])


def _dense(raw, dtype, rows, cols) -> tuple[DType, np.ndarray]:
    """(dense type, its bytes) holding the same weights as the sparse `raw`, from the documented layout."""
    if dtype == S24:
        return DType.Q4_0, _dense_q4_0(*_read_layout(raw, rows, cols))
    return DType.I8, _dense_i8(*_read_layout_i8(raw, rows, cols))


def _dense_q4_0(d, q, code) -> np.ndarray:
    """The same weights as dense Q4_0 bytes (each 64-column scale in both of its 32-blocks, pruned
    columns code 8), GGUF's nibble order."""
    rows, nb, _ = q.shape
    blocks = _place(q, code, 8).reshape(rows, nb * 2, 32)
    out = np.zeros((rows, nb * 2, 18), np.uint8)
    out[:, :, :2] = np.repeat(d, 2, axis=1).astype("<f2")[..., None].view(np.uint8)
    out[:, :, 2:] = (blocks[:, :, :16] | blocks[:, :, 16:] << 4).astype(np.uint8)
    return out.reshape(-1)


def test_encoding_follows_the_documented_layout():
    rng = np.random.default_rng(0)
    w = _pruned(rng, 32, 192)
    raw = quantize(w, S24)
    assert raw.size == 32 * 192 // 64 * 24
    d, q, code = _read_layout(raw, 32, 192)
    assert code.max() < 6
    # the kept columns hold the non-zeros, and are the values Q4_0 quantizes (d = v / -8)
    for n in range(32):
        for b in range(3):
            vals = []
            for g in range(16):
                a, c = SPARSE24_PAIRS[code[n, b, g]]
                grp = w[n, 64 * b + 4 * g:64 * b + 4 * g + 4]
                assert set(np.flatnonzero(grp)) <= {a, c}
                vals += [grp[a], grp[c]]
            vals = np.array(vals, np.float32)
            want = quantize(vals[None, :], DType.Q4_0)
            assert want[:2].view("<f2")[0] == np.float16(d[n, b])
            np.testing.assert_array_equal(dequantize(want, DType.Q4_0, (1, 32))[0], d[n, b] * (q[n, b] - 8))
    # dequantize places them back, zeros elsewhere
    wd = dequantize(raw, S24, w.shape)
    assert np.all(wd[w == 0] == 0)
    np.testing.assert_array_equal(wd, dequantize(_dense_q4_0(d, q, code), DType.Q4_0, w.shape))


def test_i8_encoding_follows_the_documented_layout():
    rng = np.random.default_rng(1)
    w = _pruned(rng, 32, 192)
    raw = quantize(w, I24)
    assert raw.size == 32 * 192 // 64 * 38 + 32 * 4
    s, q, code = _read_layout_i8(raw, 32, 192)
    assert code.max() < 6
    # one scale per row, over the kept values: the int8 mode's (I8) scale of the pruned row
    want = quantize(w, DType.I8)
    np.testing.assert_array_equal(s, want[32 * 192:].view("<f4"))
    np.testing.assert_array_equal(_place(q, code, 0).reshape(32, 192), want[:32 * 192].view(np.int8).reshape(32, 192))
    for n in range(32):
        for b in range(3):
            for g in range(16):
                a, c = SPARSE24_PAIRS[code[n, b, g]]
                assert set(np.flatnonzero(w[n, 64 * b + 4 * g:64 * b + 4 * g + 4])) <= {a, c}
    wd = dequantize(raw, I24, w.shape)
    assert np.all(wd[w == 0] == 0)
    np.testing.assert_array_equal(wd, dequantize(want, DType.I8, w.shape))


def test_refuses_what_is_not_2_of_4():
    w = np.zeros((16, 64), np.float32)
    w[3, 4:7] = 1.0  # three in one group
    assert not is_2_of_4(w)
    with pytest.raises(ValueError, match="2:4"):
        quantize(w, S24)
    with pytest.raises(ValueError, match="2:4"):
        quantize(w, I24)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(np.zeros((8, 64), np.float32), S24)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(np.zeros((16, 96), np.float32), S24)


@pytest.mark.parametrize("dtype", [S24, I24], ids=lambda d: d.label)
@pytest.mark.parametrize("variant", variants())
def test_matches_the_dense_kernel_on_the_same_weights(variant, dtype):
    """Each variant's sparse matmul (one and two activation levels, decode and prefill token counts,
    row ranges off the 16-row grid) against its own dense Q4_0 / I8 kernel on the weights with zeros."""
    for i, (T, K, N, n0, n1) in enumerate([(1, 64, 16, 0, 16), (1, 896, 48, 0, 48), (1, 1536, 32, 5, 27),
                                           (3, 576, 32, 0, 32), (17, 320, 48, 16, 47), (64, 256, 64, 1, 63),
                                           (4, 4864, 16, 0, 16)]):
        rng = np.random.default_rng(10 + i)
        raw = quantize(_pruned(rng, N, K), dtype)
        base, dense = _dense(raw, dtype, N, K)
        x = rng.standard_normal((T, K)).astype(np.float32)
        x[-1, :32] *= 100
        wd = dequantize(raw, dtype, (N, K))
        scale = np.abs(x) @ (np.abs(wd) + 8 * np.abs(wd).max()).T  # the offsets' (-8, +128) cancellation
        for fn in ("matmul", "matmul2"):
            want = getattr(kernels, fn)(variant, int(base), dense, N, K, x, n0, n1)
            got = getattr(kernels, fn)(variant, int(dtype), raw, N, K, x, n0, n1)
            assert not got[:, :n0].any() and not got[:, n1:].any()
            assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (fn, variant, dtype, T, K, N, n0, n1)


@pytest.mark.skipif(bool(REMOTE), reason="reads a bundle on this machine")
@pytest.mark.parametrize("dtype", [S24, I24], ids=lambda d: d.label)
def test_reader_refuses_invalid_pattern_codes(tmp_path, dtype):
    from pocketlm.bundle import TensorSpec, read_bundle, write_bundle
    from pocketlm.errors import BundleError

    rng = np.random.default_rng(5)
    raw = quantize(_pruned(rng, 32, 128), dtype)
    write_bundle(tmp_path / "ok.plm", {}, [TensorSpec("w", dtype, (32, 128), lambda: raw)])
    assert read_bundle(tmp_path / "ok.plm").info("w").dtype == dtype
    rec, pat = (384, 288) if dtype == S24 else (608, 512)
    for byte, value in [(pat, 0b110), (rec + pat + 95, 0xFF), (pat + 24 * 3, 0x38)]:
        bad = raw.copy()
        bad[byte] |= value  # some 3-bit code becomes 6 or 7
        write_bundle(tmp_path / "bad.plm", {}, [TensorSpec("w", dtype, (32, 128), lambda b=bad: b)])
        with pytest.raises(BundleError, match="invalid 2:4 pattern code"):
            read_bundle(tmp_path / "bad.plm")


@pytest.mark.parametrize("dtype", [S24, I24], ids=lambda d: d.label)
@pytest.mark.parametrize("variant", simd_variants())
def test_any_pattern_bytes_are_safe(variant, dtype):
    """Pattern codes 6 and 7 never reach a kernel through a bundle, but kernels called directly
    with them must not read outside the weights or the activations: they act as pattern 0."""
    rng = np.random.default_rng(6)
    raw = quantize(_pruned(rng, 16, 128), dtype)
    rec, pat = (384, 288) if dtype == S24 else (608, 512)
    raw[pat:rec] = 0xFF
    raw[rec + pat:2 * rec] = 0xFF
    for T in (1, 2, 40):  # decode, and both prefill paths
        x = rng.standard_normal((T, 128)).astype(np.float32)
        want = kernels.matmul("ref", int(dtype), raw, 16, 128, x)
        got = kernels.matmul(variant, int(dtype), raw, 16, 128, x)
        assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=1e-4, atol=1e-3)


def test_case_helper_prunes_for_the_sparse_type():
    raw, wd, x = make_matmul_case(S24, 1, 128, 16, 0)
    assert is_2_of_4(wd) and raw.size == 16 * 128 // 64 * 24


# ---- I8_BITMASK: unstructured-sparse int8 ----
BM = DType.I8_BITMASK


def _unstructured(rng, rows, cols, zeros=0.6):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < zeros] = 0.0
    w[rows // 2] = 0.0                          # a row with nothing stored
    w[0, :64] = rng.standard_normal(64) + 3.0   # a block with everything stored
    return w


def _read_bitmask(raw: np.ndarray, rows: int, cols: int):
    """The doc's layout read field by field: (row pointers, masks [rows, nb], values per row, scales)."""
    nb = cols // 64
    starts = [int.from_bytes(bytes(raw[8 * r:8 * r + 8]), "little") for r in range(rows + 1)]
    scales = raw[8 * (rows + 1):8 * (rows + 1) + 4 * rows].copy().view("<f4")
    area = 8 * (rows + 1) + 4 * rows
    masks = np.zeros((rows, nb), np.uint64)
    values = []
    for r in range(rows):
        row = raw[area + starts[r]:area + starts[r + 1]]
        for b in range(nb):
            masks[r, b] = int.from_bytes(bytes(row[8 * b:8 * b + 8]), "little")
        values.append(row[8 * nb:].view(np.int8).astype(np.int64))
    return starts, masks, values, scales


def test_bitmask_encoding_follows_the_documented_layout():
    rng = np.random.default_rng(11)
    w = _unstructured(rng, 7, 192)
    raw = quantize(w, BM)
    starts, masks, values, scales = _read_bitmask(raw, 7, 192)
    assert starts[0] == 0 and starts[-1] == raw.size - 8 * 8 - 4 * 7
    dense_i8 = quantize(w, DType.I8)  # the int8 mode's codes and row scales
    np.testing.assert_array_equal(scales, dense_i8[7 * 192:].view("<f4"))
    codes = dense_i8[:7 * 192].view(np.int8).reshape(7, 192)
    for r in range(7):
        bits = np.array([(int(masks[r, j // 64]) >> (j % 64)) & 1 for j in range(192)], bool)
        np.testing.assert_array_equal(bits, w[r] != 0)  # the non-zeros are stored, in column order
        np.testing.assert_array_equal(values[r], codes[r][bits])
        assert starts[r + 1] - starts[r] == 8 * 3 + bits.sum()
    np.testing.assert_array_equal(dequantize(raw, BM, w.shape), dequantize(dense_i8, DType.I8, w.shape))
    assert starts[4] - starts[3] == 8 * 3  # the empty row: masks only


@pytest.mark.parametrize("variant", variants())
def test_bitmask_matches_the_dense_i8_kernel_on_the_same_weights(variant):
    for i, (T, K, N, n0, n1) in enumerate([(1, 64, 5, 0, 5), (1, 896, 48, 3, 41), (2, 320, 17, 0, 17),
                                           (17, 576, 33, 1, 32), (64, 256, 16, 0, 16), (3, 1536, 9, 8, 9)]):
        rng = np.random.default_rng(40 + i)
        w = _unstructured(rng, N, K)
        raw, dense = quantize(w, BM), quantize(w, DType.I8)
        x = rng.standard_normal((T, K)).astype(np.float32)
        x[-1, :32] *= 100
        wd = dequantize(raw, BM, (N, K))
        scale = np.abs(x) @ (np.abs(wd) + 128 * np.abs(wd).max()).T  # the +128 offset's cancellation
        for fn in ("matmul", "matmul2"):
            want = getattr(kernels, fn)(variant, int(DType.I8), dense, N, K, x, n0, n1)
            got = getattr(kernels, fn)(variant, int(BM), raw, N, K, x, n0, n1)
            assert not got[:, :n0].any() and not got[:, n1:].any()
            assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30), (fn, variant, T, K, N, n0, n1)


def _bad_bitmasks(raw: np.ndarray, rows: int):
    """(what is wrong, bytes): row pointers out of range or order, a row whose values do not match its masks."""
    area = raw.size - 8 * (rows + 1) - 4 * rows
    starts = [int.from_bytes(bytes(raw[8 * r:8 * r + 8]), "little") for r in range(rows + 1)]
    def with_pointer(r, v):
        bad = raw.copy()
        bad[8 * r:8 * r + 8] = np.frombuffer(int(v).to_bytes(8, "little"), np.uint8)
        return bad
    first = int.from_bytes(bytes(raw[8:16]), "little")
    yield "pointer past the end", with_pointer(2, area + 1)
    yield "huge pointer", with_pointer(1, 2 ** 63 + 5)
    yield "a row one byte longer than its masks say", with_pointer(1, first + 1)
    yield "pointers out of order", with_pointer(2, starts[1] - 1)
    yield "first pointer not 0", with_pointer(0, 1)
    yield "last pointer short", with_pointer(rows, area - 1)
    bad = raw.copy()
    bad[8 * (rows + 1) + 4 * rows] ^= 0x01  # row 0's first mask gains or loses a bit: its values no longer match
    yield "mask and values disagree", bad
    yield "truncated", raw[:-1].copy()


def test_bitmask_hostile_tensors_are_refused(tmp_path):
    from pocketlm.bundle import TensorSpec, read_bundle, write_bundle
    from pocketlm.errors import BundleError

    rng = np.random.default_rng(12)
    w = _unstructured(rng, 6, 128)
    raw = quantize(w, BM)
    write_bundle(tmp_path / "ok.plm", {}, [TensorSpec("w", BM, (6, 128), lambda: raw)])
    assert read_bundle(tmp_path / "ok.plm").info("w").dtype == BM
    x = rng.standard_normal((1, 128)).astype(np.float32)
    for what, bad in _bad_bitmasks(raw, 6):
        if not REMOTE:
            write_bundle(tmp_path / "bad.plm", {}, [TensorSpec("w", BM, (6, 128), lambda b=bad: b)])
            with pytest.raises(BundleError, match="bad i8_bitmask tensor"):
                read_bundle(tmp_path / "bad.plm")
        with pytest.raises(ValueError):
            kernels.matmul("ref", int(BM), bad, 6, 128, x)
        with pytest.raises(ValueError):
            dequantize(bad, BM, (6, 128))
    if not REMOTE:  # rows so many that 8 (rows + 1) + 4 rows wraps round 2^64: refused, not followed
        rows = (2 ** 64 - 4) // 12
        tiny = np.zeros(64, np.uint8)
        tiny[8:16] = np.frombuffer((9).to_bytes(8, "little"), np.uint8)
        write_bundle(tmp_path / "huge.plm", {}, [TensorSpec("w", BM, (rows, 64), lambda: tiny)])
        with pytest.raises(BundleError, match="bad i8_bitmask tensor|too small|overflow"):
            read_bundle(tmp_path / "huge.plm")
