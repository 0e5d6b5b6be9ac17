"""Source checkpoint -> .plm bundle: pick each tensor's type (recipe.py), encode it lazily, write.

Data flow: read_hf / read_gguf -> SourceModel (canonical names, lazy tensors, tokenizer, special
tokens) -> one TensorSpec per tensor whose load() decodes/requantizes just that tensor ->
bundle.write_bundle (atomic, streaming).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pocketlm import __version__, quant
from pocketlm.bundle import TensorSpec, write_bundle
from pocketlm.convert.gguf_source import is_gguf_file, read_gguf
from pocketlm.convert.hf import is_hf_folder, read_hf
from pocketlm.convert.progress import ProgressBar
from pocketlm.convert.recipe import GROUP_SIZES, Recipe
from pocketlm.convert.source import SourceModel, SourceTensor, expected_shapes
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ConversionError, shown
from pocketlm.metadata import metadata_problem

# Bump when the converter's output for the same input changes (invalidates the GGUF cache).
CONVERTER_VERSION = 7  # 2: SentencePiece space prefix follows the GGUF flag (llama.cpp parity); 3: compact tokenizer.json;
# 4: 2-D Q8_0/Q4_0/Q4_1/I8 weights in their row-interleaved x16 forms; 5: Q5_0/Q5_1 too; 6: Q4 groups 64/128;
# 7: a default repetition penalty of 1.1 where the source gives no sampling settings
QUANT_CHOICES = (None, "keep", "f32", "f16", "int8", "int4")
# Threads encoding tensors (each holds one tensor's float32 copy and its encoding). On 2 cores a
# 1.1B-parameter bf16 checkpoint to int4 took 12.1-12.3 s with one, 10.0-10.1 s with two, 9.8-10.5
# with four (bench/convert_speed.py's llama-1b-shape, in-process).
ENCODE_THREADS = 4


def read_source(src: Path) -> SourceModel:
    """Detects the source kind and reads it (tensors stay on disk until written)."""
    if not src.exists():
        raise BundleError(f"{src}: no such file or folder")
    if src.is_dir():
        if not is_hf_folder(src):
            raise BundleError(f"{src.name}: folder has no config.json; expected a Hugging Face checkpoint folder")
        return read_hf(src)
    if is_gguf_file(src):
        return read_gguf(src)
    if src.suffix == ".safetensors" or src.name == "config.json":
        raise BundleError(f"{src.name}: pass the Hugging Face checkpoint folder, not a file inside it")
    raise BundleError(f"{src.name}: not a GGUF file (bad magic) nor a Hugging Face checkpoint folder")


def _rows_cols(shape) -> tuple[int, int]:
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def _encode(t: SourceTensor, dtype: DType, pruner=None) -> np.ndarray:
    """The tensor's bytes as `dtype`: copied when the source already stores it so, else encoded.
    Refuses a NaN or an infinity in the source (copied bytes included: their values, or their
    blocks' f16 scales and minimums) and one that encoding makes (a value past the f16 range).
    pruner(name, w2d) -> w2d: the weights with the pruned ones zeroed, before quantization."""
    base, shape = dtype.base, _rows_cols(t.shape)
    if (pruner is None or not pruner.applies(t.name)) and t.native == base and t.load_native is not None:
        raw = t.load_native()
        where = quant.first_nonfinite(raw, base, shape)
        if where is not None:
            at = f"block {where}'s f16 scale or minimum" if base.quantized else f"element {where}"
            raise BundleError(f"tensor {shown(t.name)} contains NaN or infinite values ({t.source_type}, {at})")
    else:
        x = t.load_f32()
        if not np.all(np.isfinite(x)):
            raise BundleError(f"tensor {shown(t.name)} contains NaN or infinite values")
        if pruner is not None:
            x = pruner(t.name, x.reshape(shape))
        with np.errstate(over="ignore"):  # an overflow to infinity is refused just below, by name
            raw = quant.quantize(x.reshape(shape), base)
        if quant.first_nonfinite(raw, base, shape) is not None:
            raise ConversionError(
                f"tensor {shown(t.name)} has values too large for {base.label} (largest magnitude "
                f"{float(np.max(np.abs(x))):.6g}); convert it with a wider type (--quant f32)")
    return quant.interleave(raw, base, shape) if dtype.x16 else raw


def _sparse_types(t: SourceTensor, recipe: Recipe) -> tuple[DType | None, DType | None]:
    """(the 2:4-sparse type, the unstructured-sparse type) a tensor may be stored as, each or None.
    A block linear weight with rows of a multiple of 64 columns: 2:4 in int4 mode, symmetric groups
    of 32 (Q4_0_24_X16), or in int8 mode with one scale per row (I8_24_X16), rows a multiple of 16;
    unstructured (I8_BITMASK) in int8 mode with one scale per row."""
    from pocketlm.prune import prunable

    if recipe.sparse != "auto" or not (prunable(t.name) and len(t.shape) == 2 and t.shape[1] % 64 == 0):
        return None, None
    rows16 = t.shape[0] % 16 == 0
    if recipe.mode == "int4" and recipe.symmetric and recipe.group_size == 32:
        return (DType.Q4_0_24_X16 if rows16 else None), None
    if recipe.mode == "int8" and recipe.group_size is None:
        return (DType.I8_24_X16 if rows16 else None), DType.I8_BITMASK
    return None, None


def plan(model: SourceModel, recipe: Recipe, prune_spec=None) -> tuple[list[tuple[SourceTensor, DType]], list[str], list[str]]:
    """[(tensor, type)] in canonical order, names that fell back to F16, names requantized in keep mode.
    With sparse="auto" (int4, or int8 with row scales), a block linear weight that is or will be 2:4
    (pruned here with a 2:4 pattern, or already so in a Hugging Face source: at most two non-zeros in
    every four columns) is stored as Q4_0_24_X16 or I8_24_X16; in int8 mode, one that is or will be
    at least half zeros otherwise (pruned here to 50 % or more in any pattern, or so in a Hugging Face
    source) as I8_BITMASK."""
    from pocketlm.quant import BITMASK_MIN_ZEROS, is_2_of_4

    order = {name: i for i, name in enumerate(expected_shapes(model.config, model.architecture))}
    planned, fallback, requantized = [], [], []
    two_of_four = prune_spec is not None and (prune_spec.n, prune_spec.m) == (2, 4)
    # any pattern that zeroes half or more (50 %+, 1:4, 4:8, 2:4 where the 2:4 type cannot take the shape)
    half_or_more = prune_spec is not None and prune_spec.sparsity >= BITMASK_MIN_ZEROS
    for t in sorted(model.tensors, key=lambda t: order[t.name]):
        keep = None
        if recipe.mode == "keep":
            keep = t.native if t.native is not None else model.keep_fallback[t.name]
        sparse, bitmask = _sparse_types(t, recipe)
        if sparse is not None and two_of_four:
            planned.append((t, sparse))
            continue
        if bitmask is not None and half_or_more:
            planned.append((t, bitmask))
            continue
        if (sparse or bitmask) is not None and prune_spec is None and model.source_format == "hf":
            # published pruned checkpoints are Hugging Face folders; reading a GGUF's every block
            # weight once more to look would slow every conversion of one
            w = t.load_f32().reshape(t.shape)  # pruned at the source?
            if sparse is not None and is_2_of_4(w):
                planned.append((t, sparse))
                continue
            if bitmask is not None and np.count_nonzero(w) <= (1 - BITMASK_MIN_ZEROS) * w.size:
                planned.append((t, bitmask))
                continue
        dtype, fell_back = recipe.choose(t.name, t.shape, keep)
        if fell_back:
            fallback.append(t.name)
        if recipe.mode == "keep" and len(t.shape) > 1 and t.native is None:
            requantized.append(t.name)
        planned.append((t, dtype))
    return planned, fallback, requantized


def _metadata(model: SourceModel, recipe: Recipe, planned, fallback: list[str], requantized: list[str]) -> dict:
    types = Counter(dtype.label for _, dtype in planned)
    provenance = {
        "source": model.source_name,
        "source_format": model.source_format,
        "source_sha256": model.source_sha256,
        "converter": f"pocketlm {__version__}",
        "converter_version": CONVERTER_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if model.source_format == "gguf":
        provenance["requantized"] = requantized
        provenance["source_types"] = dict(sorted(Counter(t.source_type for t in model.tensors).items()))
    return {
        "format_version": 1,
        "architecture": model.architecture,
        "config": model.config,
        "quantization": {**recipe.describe(), "types": dict(sorted(types.items())), "f16_fallback": fallback},
        "tokenizer": {"type": "hf-json", "json": model.tokenizer_json},
        "chat_template": model.chat_template,
        "special_tokens": model.special_tokens,
        "generation": model.generation,
        "provenance": provenance,
    }


def _pruner(src: Path, out: Path, spec, planned, calibration: Path | None, quant: str, progress: bool,
            threads: int | None):
    """(pruner(name, w) for _encode, the bundle's "pruning" record). For wanda, the input norms of
    every pruned weight come from the same conversion without pruning, written to a temporary
    bundle beside `out` (f32 or int8) and run over the calibration text (pocketlm.prune.input_norms)."""
    import hashlib
    import tempfile

    from pocketlm import prune as pruning
    from pocketlm.bundle import read_bundle
    from pocketlm.engine import load_tokenizer

    names = [t.name for t, dtype in planned if pruning.prunable(t.name) and len(t.shape) == 2]
    if not names:
        raise ValueError("this model has no block linear weights to prune")
    if spec.m:
        shapes = {t.name: t.shape for t, _ in planned}
        odd = [n for n in names if shapes[n][-1] % spec.m]
        if odd:
            raise ValueError(f"--prune {spec.label}: {odd[0]} has rows of a length not a multiple of {spec.m}")
    record = {**spec.describe(), "tensors": len(names)}
    norms: dict = {}
    if spec.method == "wanda":
        text = calibration.read_bytes()
        record["calibration"] = {"file": calibration.name, "sha256": hashlib.sha256(text).hexdigest()}
        with tempfile.TemporaryDirectory(prefix=".pocketlm-prune-", dir=out.parent) as tmp:
            # the dense model: f32 for an f32 output (so its masks are exactly transformers' own), else
            # int8 (near-float: KL divergence ~0.0015 on Qwen2.5-0.5B) for speed; f16 weights would cost
            # several times the minutes for norms within ~1e-3 of these
            dense = convert(src, Path(tmp) / "dense.plm", quant="f32" if quant == "f32" else "int8", progress=progress,
                            calibrate=False)
            tokens = np.asarray(load_tokenizer(read_bundle(dense)).encode(text.decode("utf-8", errors="replace")),
                                dtype=np.int32)[:pruning.CALIBRATION_TOKENS]
            if tokens.size < 16:
                raise ValueError(f"{calibration.name}: {tokens.size} tokens; wanda needs a calibration text of "
                                 "at least 16 tokens (a few thousand is usual)")
            record["calibration"]["tokens"] = int(tokens.size)
            bar = ProgressBar("wanda: input norms", len(names)) if progress else None
            norms = pruning.input_norms(dense, tokens, names, threads=threads or min(4, os.cpu_count() or 1),
                                        progress=(lambda i, name: bar.tensor_started(i)) if bar else None)
            if bar is not None:
                bar.finish()
    wanted = set(names)

    def pruner(name: str, w: np.ndarray) -> np.ndarray:
        if name not in wanted:
            return w
        return pruning.prune(w, spec, norms.get(name))

    pruner.applies = wanted.__contains__  # the others keep _encode's bit-exact copy where there is one
    return pruner, record


def convert(src: str | os.PathLike, out: str | os.PathLike, quant: str | None = None, group_size: int | None = None,
            symmetric: bool = True, progress: bool = True, head: str | None = None, prune: str | None = None,
            prune_method: str = "wanda", calibration: str | os.PathLike | None = None,
            threads: int | None = None, sparse: str = "auto", calibrate: bool = True) -> Path:
    """Converts a Hugging Face folder or a .gguf file into a .plm bundle at `out`; returns its path.

    quant: None keeps a GGUF's types (bit-exact where pocketlm has them) and means "f16" for
    Hugging Face checkpoints; or one of "f32", "f16", "int8", "int4" (see docs/quant.md).
    group_size: int4 groups of 32 (default), 64 or 128 weights; int8 has one scale per output row
    by default (per group of 32 for an embedding model), or per group of 32 weights with
    group_size=32 (Q8_0 blocks, as llama.cpp's Q8_0).
    symmetric=False (a per-group minimum) applies to int4. head: "int8" (default) keeps the token
    embeddings and the output head in Q8_0 blocks in int4 mode; "int4" makes them 4-bit too (int4
    and int8 modes), fewer bytes per decoded token for some accuracy (docs/quant.md). If `out` is a folder, the bundle is
    named after the source. Never leaves a partial file behind.

    prune: "2:4" (N:M) or "50%" sets the lowest-scoring weights of the blocks' linear layers to zero
    before quantization (pocketlm.prune); prune_method "wanda" (|W| x input norm, the norms from
    running the unpruned model over the text file `calibration`) or "magnitude" (|W|). Needs an
    explicit quant of f32, f16, int8 or symmetric int4 (types that store an exact zero).
    sparse: "auto" (default) stores block linear weights that are 2:4 (pruned so here, or in the
    source) as a 2:4-sparse type: Q4_0_24_X16 in int4 mode (3.0 bits per weight instead of 4.5),
    I8_24_X16 in int8 mode with row scales (4.75 instead of 8); in int8 mode, those at least half
    zeros otherwise (pruned 50 % or more here, or in the source) as I8_BITMASK (a bitmask per 64
    columns and the non-zeros: 5 bits per weight at 50 %); "off" keeps them dense.
    """
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of f32, f16, int8, int4 or None, got {quant!r}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    src = Path(src)
    if progress:
        print(f"reading {src.name} ...", file=sys.stderr, flush=True)
    model = read_source(src)
    mode = quant if quant not in (None, "keep") else ("keep" if model.source_format == "gguf" else "f16")
    if mode == "int8" and group_size is None and model.config.get("encoder"):
        # Embedding models take Q8_0 blocks (a scale per 32 weights), as llama.cpp quantizes them: on
        # all-MiniLM-L6-v2 one scale per row gave cosine 0.9985 to the f32 vectors, Q8_0 0.9996.
        group_size = 32
    if head is not None and mode not in ("int4", "int8"):
        raise ValueError(f"head={head!r} applies to int4 and int8 conversions (quant={quant!r})")
    recipe = Recipe(mode, group_size, symmetric, head, sparse)
    spec = None
    if prune is not None:
        from pocketlm import prune as pruning

        spec = pruning.parse_prune(prune, prune_method)
        if quant in (None, "keep") or not symmetric:
            raise ValueError("pruning needs --quant f32, f16, int8 or int4 (symmetric): the weights are "
                             "re-encoded, in a type that stores an exact zero")
        if spec.method == "wanda" and calibration is None:
            raise ValueError("wanda pruning needs a calibration text (--calibration FILE): its scores weigh "
                             "each weight by its input's size over that text")
        if spec.method == "magnitude" and calibration is not None:
            raise ValueError("magnitude pruning uses no calibration text (drop --calibration, or use wanda)")
        if calibration is not None:
            calibration = Path(calibration)
            if not calibration.is_file():
                raise ValueError(f"{calibration}: no such calibration file")

    out = Path(out)
    if out.is_dir():
        out = out / f"{src.stem if src.is_file() else src.resolve().name}.plm"
    out.parent.mkdir(parents=True, exist_ok=True)

    planned, fallback, requantized = plan(model, recipe, spec)
    metadata = _metadata(model, recipe, planned, fallback, requantized)
    pruner = None
    if spec is not None:
        pruner, metadata["pruning"] = _pruner(src, out, spec, planned, calibration, quant, progress, threads)
    # The reader's own metadata check, before any tensor is written: a value the loader would refuse
    # fails here in milliseconds (check_loadable, on the finished file, stays as the last net).
    problem = metadata_problem(metadata)
    if problem:
        raise BundleError(f"{model.source_name}: bad metadata: {problem}")

    bar = ProgressBar(f"converting {model.source_name}", len(planned)) if progress else None
    workers = min(ENCODE_THREADS, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pocketlm-encode")
    encoding: dict[int, concurrent.futures.Future] = {}

    def loader(i: int):
        def load():
            # Tensors are encoded on `workers` threads, up to `workers` ahead of the one being
            # written (numpy and the file reads release the GIL); written in order, one at a time.
            if bar is not None:
                bar.tensor_started(i)
            for j in range(i, min(i + workers + 1, len(planned))):
                if j not in encoding:
                    encoding[j] = pool.submit(_encode, *planned[j], pruner)
            return encoding.pop(i).result()
        return load

    from pocketlm.engine import check_loadable  # the loader's checks, run before the final rename

    specs = [TensorSpec(t.name, dtype, tuple(t.shape), loader(i)) for i, (t, dtype) in enumerate(planned)]
    checked = {}

    def check(tmp: str) -> None:
        checked["tokenizer"] = check_loadable(tmp)

    try:
        write_bundle(out, metadata, specs, progress=bar.bytes_written if bar is not None else None, check=check)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: the encodes still running
        encoding.clear()
        if bar is not None:
            bar.finish()
    if calibrate:  # (not for _pruner's temporary bundle: nothing would use its entry)
        _calibrate(out, progress, checked["tokenizer"])
    return out


def _calibrate(path: Path, progress: bool, tokenizer) -> None:
    """Calibrates the activation precision of "auto" for the new bundle (pocketlm.calibration,
    cached per bundle), so that its first load does not wait for it. Only bundles with integer
    weights have anything to calibrate. A failure here is reported and leaves the bundle as written
    (the first load calibrates again)."""
    from pocketlm.bundle import read_bundle

    bundle = read_bundle(path)
    if not any(DType(t.dtype).quantized for t in bundle.tensors):
        return
    try:
        from pocketlm.calibration import cached, resolve_auto
        from pocketlm.engine import physical_cores

        if cached(path) is not None:
            return
        if progress:
            print("calibrating activation precision ...", file=sys.stderr, flush=True)
        spec, _ = resolve_auto(bundle, tokenizer, physical_cores())
        if progress:
            print(f"activations (auto): {spec.removeprefix('auto:')} where weights have under 6 bits",
                  file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - the bundle is written and valid; loading calibrates again
        print(f"pocketlm: warning: calibration of {path.name} failed ({e}); its first load will retry",
              file=sys.stderr, flush=True)
