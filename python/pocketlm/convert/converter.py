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


def _encode(t: SourceTensor, dtype: DType) -> np.ndarray:
    """The tensor's bytes as `dtype`: copied when the source already stores it so, else encoded.
    Refuses a NaN or an infinity in the source (copied bytes included: their values, or their
    blocks' f16 scales and minimums) and one that encoding makes (a value past the f16 range)."""
    base, shape = dtype.base, _rows_cols(t.shape)
    if t.native == base and t.load_native is not None:
        raw = t.load_native()
        where = quant.first_nonfinite(raw, base, shape)
        if where is not None:
            at = f"block {where}'s f16 scale or minimum" if base.quantized else f"element {where}"
            raise BundleError(f"tensor {shown(t.name)} contains NaN or infinite values ({t.source_type}, {at})")
    else:
        x = t.load_f32()
        if not np.all(np.isfinite(x)):
            raise BundleError(f"tensor {shown(t.name)} contains NaN or infinite values")
        with np.errstate(over="ignore"):  # an overflow to infinity is refused just below, by name
            raw = quant.quantize(x.reshape(shape), base)
        if quant.first_nonfinite(raw, base, shape) is not None:
            raise ConversionError(
                f"tensor {shown(t.name)} has values too large for {base.label} (largest magnitude "
                f"{float(np.max(np.abs(x))):.6g}); convert it with a wider type (--quant f32)")
    return quant.interleave(raw, base, shape) if dtype.x16 else raw


def plan(model: SourceModel, recipe: Recipe) -> tuple[list[tuple[SourceTensor, DType]], list[str], list[str]]:
    """[(tensor, type)] in canonical order, names that fell back to F16, names requantized in keep mode."""
    order = {name: i for i, name in enumerate(expected_shapes(model.config, model.architecture))}
    planned, fallback, requantized = [], [], []
    for t in sorted(model.tensors, key=lambda t: order[t.name]):
        keep = None
        if recipe.mode == "keep":
            keep = t.native if t.native is not None else model.keep_fallback[t.name]
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


def convert(src: str | os.PathLike, out: str | os.PathLike, quant: str | None = None, group_size: int | None = None,
            symmetric: bool = True, progress: bool = True, head: str | None = None) -> Path:
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
    recipe = Recipe(mode, group_size, symmetric, head)

    out = Path(out)
    if out.is_dir():
        out = out / f"{src.stem if src.is_file() else src.resolve().name}.plm"
    out.parent.mkdir(parents=True, exist_ok=True)

    planned, fallback, requantized = plan(model, recipe)
    metadata = _metadata(model, recipe, planned, fallback, requantized)
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
                    encoding[j] = pool.submit(_encode, *planned[j])
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
