"""Hostile GGUF files (issue 10, items 3, 5 and 8): each gives one specific PocketLMError through the
Python API, and `pocketlm: error: ...` with exit status 1 through `convert` and `run` (which converts
into the cache), within a memory and time bound, leaving no file behind.

The files are built byte by byte (gguf_raw.py) from a small valid 2-layer llama GGUF holding every
tensor type pocketlm keeps (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), which
converts cleanly (test_base_converts). Expected messages come from the case: the key, tensor or
type the file gets wrong must be named.
"""

from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import gguf_raw as G
from gguf_craft import random_kquant
from gguf_raw import GGUF, KV, Tensor
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert, convert_to_cache
from pocketlm.errors import BundleError, ConversionError, UnsupportedModelError

DIM, N_HEADS, N_KV_HEADS, FFN, N_LAYERS = 256, 4, 2, 256, 2
MEMORY_LIMIT = 2 << 30  # bytes of address space for the CLI runs
CLI_TIMEOUT = 60


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (the byte-level BPE vocabulary's first 256 tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


TOKENS = [*_byte_alphabet(), "Ġt", "<|end|>"]
EOS = len(TOKENS) - 1

# canonical name -> GGML type; the rest are F32
TYPES = {"blk.0.attn_q.weight": G.F16, "blk.0.attn_k.weight": G.BF16, "blk.0.attn_v.weight": G.Q8_0,
         "blk.0.attn_output.weight": G.Q4_0, "blk.0.ffn_gate.weight": G.Q4_1, "blk.0.ffn_up.weight": G.Q4_K,
         "blk.0.ffn_down.weight": G.Q6_K, "blk.1.attn_q.weight": G.Q5_0, "blk.1.attn_k.weight": G.Q5_1,
         "blk.1.attn_v.weight": G.Q5_K}


def _shapes() -> dict[str, tuple[int, ...]]:
    kv_rows = N_KV_HEADS * DIM // N_HEADS
    shapes = {"token_embd.weight": (len(TOKENS), DIM), "output_norm.weight": (DIM,)}
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (DIM,), p + "attn_q.weight": (DIM, DIM),
                       p + "attn_k.weight": (kv_rows, DIM), p + "attn_v.weight": (kv_rows, DIM),
                       p + "attn_output.weight": (DIM, DIM), p + "ffn_norm.weight": (DIM,),
                       p + "ffn_gate.weight": (FFN, DIM), p + "ffn_up.weight": (FFN, DIM),
                       p + "ffn_down.weight": (DIM, FFN)})
    return shapes


def _encode(x: np.ndarray, type_id: int, rng) -> bytes:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if type_id == G.F32:
        return x.astype("<f4").tobytes()
    if type_id == G.F16:
        return x.astype("<f2").tobytes()
    if type_id in (G.Q4_K, G.Q5_K, G.Q6_K):  # random payload, sane scales (gguf cannot quantize to these)
        return random_kquant(x.shape[0], x.shape[1], Q(type_id), rng).tobytes()
    return np.ascontiguousarray(gguf.quants.quantize(x, Q(type_id))).tobytes()


def base_gguf() -> GGUF:
    rng = np.random.default_rng(0)
    kvs = [
        KV("general.architecture", G.STRING, "llama"),
        KV("llama.block_count", G.UINT32, N_LAYERS),
        KV("llama.context_length", G.UINT32, 256),
        KV("llama.embedding_length", G.UINT32, DIM),
        KV("llama.feed_forward_length", G.UINT32, FFN),
        KV("llama.attention.head_count", G.UINT32, N_HEADS),
        KV("llama.attention.head_count_kv", G.UINT32, N_KV_HEADS),
        KV("llama.attention.layer_norm_rms_epsilon", G.FLOAT32, 1e-5),
        KV("llama.rope.freq_base", G.FLOAT32, 10000.0),
        KV("tokenizer.ggml.model", G.STRING, "gpt2"),
        KV("tokenizer.ggml.pre", G.STRING, "default"),
        KV("tokenizer.ggml.tokens", G.ARRAY, TOKENS, G.STRING),
        KV("tokenizer.ggml.token_type", G.ARRAY, [1] * (len(TOKENS) - 1) + [3], G.INT32),
        KV("tokenizer.ggml.merges", G.ARRAY, ["Ġ t"], G.STRING),
        KV("tokenizer.ggml.eos_token_id", G.UINT32, EOS),
    ]
    tensors = []
    for name, shape in _shapes().items():
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if len(shape) == 1:
            x += 1.0
        type_id = TYPES.get(name, G.F32)
        tensors.append(Tensor(name, tuple(reversed(shape)), type_id, _encode(x.reshape(-1, shape[-1]), type_id, rng)))
    return GGUF(kvs, tensors)


# --- the cases: (change to the base file, expected error, words the message must hold) ---------------------------

def _set(key, vtype, v, elem=None):
    return lambda g: g.set(key, vtype, v, elem)


def _tensor(tensor_name, **changes):
    def change(g):
        for k, v in changes.items():
            setattr(g.tensor(tensor_name), k, v)
    return change


def _misaligned(g):
    last = g.tensors[-1]
    last.offset = g.natural_offsets()[-1] + 8


def _overlapping(g):
    g.tensors[-1].offset = g.natural_offsets()[-2]


def _rename(name, new):
    return _tensor(name, name=new)


def _raw_kv(key, raw):
    return lambda g: g.kvs.append(KV(key, G.ARRAY, None, raw=raw))


def _counts(n_tensors=None, n_kv=None):
    def change(g):
        g.counts = (n_tensors, n_kv)
    return change


def _version(v):
    def change(g):
        g.version = v
    return change


def _i8_norm(g):
    t = g.tensor("blk.1.ffn_norm.weight")
    t.type_id, t.data = G.I8, bytes(DIM)


HUGE_NAME = "blk.0." + "x" * (10 << 20)

CASES = {
    # item 5, as found
    "block_count 2^32-1": (_set("llama.block_count", G.UINT32, 2**32 - 1), BundleError, ["llama.block_count"]),
    "offset 2^64-32 wraps": (_tensor("blk.0.ffn_up.weight", offset=2**64 - 32), BundleError,
                             ["blk.0.ffn_up.weight", "outside the data section"]),
    "misaligned offset": (_misaligned, BundleError, ["not a multiple of the alignment"]),
    "overlapping offsets": (_overlapping, BundleError, ["overlaps"]),
    "head_count 0": (_set("llama.attention.head_count", G.UINT32, 0), BundleError, ["llama.attention.head_count"]),
    "I8 tensor": (_i8_norm, UnsupportedModelError, ["blk.1.ffn_norm.weight", "I8"]),
    # the class: counts, sizes, types and layout of the container
    "unknown tensor type": (_tensor("output_norm.weight", type_id=4242), UnsupportedModelError,
                            ["output_norm.weight", "4242"]),
    "tensor count 2^64-1": (_counts(n_tensors=2**64 - 1), BundleError, [f"{2**64 - 1} tensors"]),
    "kv count 2^63": (_counts(n_kv=2**63), BundleError, ["metadata entries"]),
    "array of 2^40": (_raw_kv("general.junk", struct.pack("<IQ", G.UINT8, 2**40)), BundleError, ["general.junk"]),
    "nested arrays": (_raw_kv("general.junk", struct.pack("<IQ", G.ARRAY, 1)), BundleError, ["arrays of arrays"]),
    "5 dimensions": (_tensor("output_norm.weight", dims=(DIM, 1, 1, 1, 1)), BundleError, ["5 dimensions"]),
    "dimension 0": (_tensor("output_norm.weight", dims=(0,)), BundleError, ["size 0"]),
    "row not whole blocks": (_tensor("blk.0.attn_v.weight", dims=(48, 2 * DIM // 3)), BundleError,
                             ["multiple of 32"]),
    "tensor larger than the file": (_tensor("output_norm.weight", dims=(2**62, 2**40)), BundleError,
                                    ["more than the whole file"]),
    "alignment 48": (_set("general.alignment", G.UINT32, 48), BundleError, ["general.alignment", "power of two"]),
    "alignment of type uint64": (_set("general.alignment", G.UINT64, 32), BundleError, ["uint32"]),
    "10 MB tensor name": (_rename("blk.0.attn_norm.weight", HUGE_NAME), BundleError, ["more than 64"]),
    "tensor name not UTF-8": (_rename("blk.0.attn_norm.weight", b"blk.0.\xff\xfe"), BundleError, ["UTF-8"]),
    "duplicate tensor": (_rename("blk.1.attn_norm.weight", "blk.0.attn_norm.weight"), BundleError, ["twice"]),
    "version 1": (_version(1), UnsupportedModelError, ["version 1"]),
    "big-endian": (_version(3 << 24), UnsupportedModelError, ["big-endian"]),
    # item 3 (metadata side) and 6's siblings the importer can see: types and ranges, naming the key
    "string for a number": (_set("llama.attention.head_count", G.STRING, "four"), BundleError,
                            ["'llama.attention.head_count' is a string", "integer"]),
    "array for a number": (_set("llama.embedding_length", G.ARRAY, [DIM], G.UINT32), BundleError,
                           ["llama.embedding_length", "array"]),
    "string for a float": (_set("llama.rope.freq_base", G.STRING, "1e4"), BundleError, ["llama.rope.freq_base"]),
    "tokens not strings": (_set("tokenizer.ggml.tokens", G.ARRAY, list(range(len(TOKENS))), G.UINT32),
                           BundleError, ["tokenizer.ggml.tokens"]),
    "head_count_kv 3": (_set("llama.attention.head_count_kv", G.UINT32, 3), BundleError, ["head_count_kv"]),
    "head_count > embedding": (_set("llama.attention.head_count", G.UINT32, DIM * 2), BundleError,
                               ["llama.attention.head_count"]),
    "context_length 0": (_set("llama.context_length", G.UINT32, 0), BundleError, ["llama.context_length"]),
    "freq_base -1": (_set("llama.rope.freq_base", G.FLOAT32, -1.0), BundleError, ["llama.rope.freq_base"]),
    "rms eps NaN": (_set("llama.attention.layer_norm_rms_epsilon", G.FLOAT32, float("nan")), BundleError,
                    ["layer_norm_rms_epsilon"]),
    "rms eps 1e-300": (_set("llama.attention.layer_norm_rms_epsilon", G.FLOAT64, 1e-300), BundleError,
                       ["layer_norm_rms_epsilon"]),
    "rope scaling factor 0": (lambda g: (g.set("llama.rope.scaling.type", G.STRING, "linear"),
                                         g.set("llama.rope.scaling.factor", G.FLOAT32, 0.0)),
                              BundleError, ["llama.rope.scaling.factor"]),
    "eos id out of range": (_set("tokenizer.ggml.eos_token_id", G.UINT32, 10**6), BundleError,
                            ["tokenizer.ggml.eos_token_id"]),
    "more tokens than rows": (_set("llama.vocab_size", G.UINT32, 100), BundleError, ["tokenizer.ggml.tokens"]),
    "rope dimension odd": (_set("llama.rope.dimension_count", G.UINT32, 63), BundleError, ["rope.dimension_count"]),
    "1 MB chat template": (_set("tokenizer.chat_template", G.STRING, "{{ x }}" * (1 << 18)), BundleError,
                           ["tokenizer.chat_template"]),
}


def _nan_in(name: str, byte: int, bits: bytes):
    def change(g):
        t = g.tensor(name)
        t.data = t.data[:byte] + bits + t.data[byte + len(bits):]
    return change


NAN32, INF16, NAN16, BF16_INF = struct.pack("<f", float("nan")), G.f16_bytes(np.inf), G.f16_bytes(np.nan), b"\x80\x7f"
# (tensor, byte offset of the NaN/Inf inside the tensor, the bits, the element or block index that holds it)
NONFINITE = {
    "F32": ("token_embd.weight", 4 * 777, NAN32, "element 777"),
    "F16": ("blk.0.attn_q.weight", 2 * 100, INF16, "element 100"),  # row 0: not moved by the Q un-permutation
    "BF16": ("blk.0.attn_k.weight", 2 * 5, BF16_INF, "element 5"),
    "Q8_0 d": ("blk.0.attn_v.weight", 34 * 3, INF16, "block 3"),
    "Q4_0 d": ("blk.0.attn_output.weight", 18 * 40, NAN16, "block 40"),
    "Q4_1 m": ("blk.0.ffn_gate.weight", 20 * 7 + 2, INF16, "block 7"),
    "Q5_0 d": ("blk.1.attn_q.weight", 22 * 2, NAN16, "block 2"),
    "Q5_1 m": ("blk.1.attn_k.weight", 24 * 5 + 2, NAN16, "block 5"),
    "Q4_K dmin": ("blk.0.ffn_up.weight", 144 * 11 + 2, NAN16, "block 11"),
    "Q5_K d": ("blk.1.attn_v.weight", 176 * 1, INF16, "block 1"),
    "Q6_K d": ("blk.0.ffn_down.weight", 210 * 4 + 208, INF16, "block 4"),
}
for case, (name, byte, bits, where) in NONFINITE.items():
    CASES[f"non-finite {case}"] = (_nan_in(name, byte, bits), BundleError,
                                   [f"'{name}' contains NaN or infinite values", where])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Case name -> the hostile file; "base" -> the valid one."""
    root = tmp_path_factory.mktemp("hostile_gguf")
    base, out = base_gguf(), {}
    for case, (change, _, _) in {"base": (lambda g: None, None, None), **CASES}.items():
        g = copy.deepcopy(base)
        change(g)
        path = root / f"{case.replace(' ', '_').replace('/', '_')}.gguf"
        path.write_bytes(g.to_bytes())
        out[case] = path
    return out


def test_base_converts(files, tmp_path):
    """The unchanged file converts, every type kept: the failures below come from the changes."""
    bundle = read_bundle(convert(files["base"], tmp_path / "base.plm", progress=False))
    assert {bundle.info(n).dtype.base.name for n in TYPES} == {
        "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}


def test_window_past_the_context_converts(tmp_path):
    """Phi-3-mini-128k's GGUF says sliding_window 262144 over a 131072 context: a window that
    wide is full attention, not a hostile value."""
    g = base_gguf()
    g.set("llama.attention.sliding_window", G.UINT32, 2 * 256)
    (tmp_path / "wide.gguf").write_bytes(g.to_bytes())
    read_bundle(convert(tmp_path / "wide.gguf", tmp_path / "wide.plm", progress=False))


@pytest.mark.parametrize("case", list(CASES))
def test_api(files, case, tmp_path, monkeypatch):
    _, exc, words = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(exc) as info:
        convert(files[case], out / "model.plm", progress=False)
    message = str(info.value)
    for w in words:
        assert w in message, message
    assert len(message) < 600  # a 10 MB name is not echoed whole
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(exc):
        convert_to_cache(files[case], progress=False)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def _cli(*args, env):
    return subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", "timeout", str(CLI_TIMEOUT), sys.executable, "-m",
                           "pocketlm", *map(str, args)], capture_output=True, text=True, env=env)


# `run` converts through the same code as `convert`: it is run on the cases the issue names and one
# of each kind (CLI runs cost ~0.3 s each).
RUN_CASES = {"block_count 2^32-1", "offset 2^64-32 wraps", "misaligned offset", "overlapping offsets",
             "head_count 0", "I8 tensor", "unknown tensor type", "string for a number", "10 MB tensor name",
             "eos id out of range", "non-finite F32", "non-finite Q8_0 d"}


@pytest.mark.parametrize("case", list(CASES))
def test_cli(files, case, tmp_path):
    _, exc, words = CASES[case]
    env = {**os.environ, "POCKETLM_CACHE": str(tmp_path / "cache")}
    (tmp_path / "out").mkdir()  # (convert refuses a directory that does not exist)
    commands = [("convert", files[case], "-o", tmp_path / "out" / "model.plm")]
    if case in RUN_CASES:
        commands.append(("run", files[case], "-p", "hi", "-n", "1"))
    for args in commands:
        r = _cli(*args, env=env)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1 and err and err[-1].startswith("pocketlm: error: "), (args[0], r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
        for w in words:
            assert w in err[-1], err[-1]
        assert len(err[-1]) < 600
    for folder in (tmp_path / "out", tmp_path / "cache"):
        assert not folder.exists() or list(folder.iterdir()) == []


def _sampling_defaults_gguf(tmp_path):
    g = base_gguf()
    g.set("general.sampling.top_k", G.INT32, -5)
    g.set("general.sampling.top_p", G.FLOAT32, 0.0)
    g.set("general.sampling.temp", G.FLOAT32, float("nan"))
    g.set("general.sampling.min_p", G.FLOAT32, 0.1)  # a good one, kept
    src = tmp_path / "sampling.gguf"
    src.write_bytes(g.to_bytes())
    return src


def test_out_of_range_sampling_defaults_are_dropped(tmp_path, capfd):
    """Sampling defaults the sampler would refuse (top_k -5, top_p 0, a NaN temperature) are left out
    with one warning line each, naming the GGUF key; the model converts with pocketlm's defaults
    for them (llama.cpp ignores such values too). A .plm holding one is still refused by the loader
    (tests/format/test_hostile_metadata.py: the converter never writes one)."""
    from pocketlm.convert.source import DEFAULT_GENERATION

    bundle = read_bundle(convert(_sampling_defaults_gguf(tmp_path), tmp_path / "x.plm", progress=False))
    generation = bundle.metadata["generation"]
    assert generation["top_k"] == DEFAULT_GENERATION["top_k"]
    assert generation["top_p"] == DEFAULT_GENERATION["top_p"]
    assert generation["temperature"] == DEFAULT_GENERATION["temperature"]
    assert abs(generation["min_p"] - 0.1) < 1e-6
    warnings = capfd.readouterr().err.strip().splitlines()
    assert len(warnings) == 3, warnings
    for key, line in zip(("general.sampling.temp", "general.sampling.top_k", "general.sampling.top_p"), warnings):
        assert line.startswith("pocketlm: warning: sampling.gguf: ") and key in line and "ignored" in line, line


def test_out_of_range_sampling_defaults_cli(tmp_path):
    src = _sampling_defaults_gguf(tmp_path)
    r = _cli("convert", src, "-o", tmp_path / "x.plm", env={**os.environ, "POCKETLM_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("pocketlm: warning: ")]
    assert len(warnings) == 3 and "general.sampling.top_k must be an integer in [0, 2147483647], got -5" in warnings[1]
    assert read_bundle(tmp_path / "x.plm").metadata["generation"]["top_k"] == 40


def test_overflow_on_encoding(files, tmp_path):
    """A finite source value past the f16 range becomes an infinity when encoded: refused, with a way out."""
    g = base_gguf()
    _nan_in("token_embd.weight", 4 * 12, struct.pack("<f", 1e6))(g)
    src = tmp_path / "big.gguf"
    src.write_bytes(g.to_bytes())
    with pytest.raises(ConversionError, match=r"'token_embd.weight' has values too large for f16 .*--quant f32"):
        convert(src, tmp_path / "x.plm", quant="f16", progress=False)
    convert(src, tmp_path / "x.plm", quant="f32", progress=False)  # a wider type holds it


def test_nan_scale_refused_when_requantized(files, tmp_path):
    """Not copied but decoded and quantized (int8): the decoded NaN is refused too."""
    with pytest.raises(BundleError, match="'blk.0.ffn_gate.weight' contains NaN or infinite values"):
        convert(files["non-finite Q4_1 m"], tmp_path / "x.plm", quant="int8", progress=False)
    assert not (tmp_path / "x.plm").exists()


def test_truncated_anywhere(files, tmp_path):
    """Cut at every 997th byte of the header and the tensor table: always a BundleError."""
    data = files["base"].read_bytes()
    header_end = data.index(b"token_embd.weight") + 200
    src = tmp_path / "cut.gguf"
    for n in range(0, header_end, 997):
        src.write_bytes(data[:n])
        with pytest.raises(BundleError):
            convert(src, tmp_path / "x.plm", progress=False)
    assert not (tmp_path / "x.plm").exists()


def test_keys_pocketlm_does_not_read_are_not_held_to_its_limits(tmp_path):
    """Older converters stored the whole tokenizer.json as a string (megabytes); a key nobody reads
    may be long, or even invalid UTF-8, as long as the container around it is sound."""
    g = base_gguf()
    g.set("tokenizer.huggingface.json", G.STRING, "{}" * (2 << 20))
    g.kvs.append(KV("general.notes", G.STRING, None, raw=G.string(b"\xff\xfe not UTF-8")))
    g.set("general.tags", G.ARRAY, ["x"] * 1000, G.STRING)
    src = tmp_path / "extra.gguf"
    src.write_bytes(g.to_bytes())
    assert read_bundle(convert(src, tmp_path / "x.plm", progress=False)).metadata["architecture"] == "llama"


def test_reader_agrees_with_gguf_package(files):
    """pocketlm's container reader against gguf.GGUFReader (the reference) on the crafted file:
    every key's value, every tensor's name, dims, type, offset and size. (On the real SmolLM2
    file, test_gguf.py compares every converted tensor's bytes with GGUFReader's.)"""
    import gguf

    from pocketlm.convert.gguf_file import GGUFFile

    for path in (files["base"],):
        ours, ref = GGUFFile(path), gguf.GGUFReader(path)
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(ours.fields) == keys
        for k in keys:
            assert ours.value(k) == ref.fields[k].contents(), k
        assert [(t.name, t.dims, t.type_id, ours.data_start + t.offset, t.n_bytes) for t in ours.tensors] == [
            (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in ref.tensors]
