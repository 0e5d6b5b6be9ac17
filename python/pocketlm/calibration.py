"""Calibration of activation precision: which matmul sites of a model keep two-level activations.

`activations="auto"` (pocketlm.passes.precision) gives matmuls with 6-bit or wider weights two levels
and decides the others per model, by measurement: the model scores a fixed calibration text once
with two levels everywhere (the reference) and once with one level at every site but the wide
weights. If the mean KL divergence of the second from the reference is within `BUDGET`, one level
it is. Otherwise each site alone is put back to one level (the rest at two) to see what it costs, and
sites go back to two levels, costliest first, until the estimate (the sum of the remaining sites'
costs) is within the budget; that choice is run and checked, and more sites go back if it is not.

The budget, 2e-4 nats per token, is a fraction of a percent of what 4-bit weights cost (Qwen2.5-0.5B
int4 vs f32: 0.087) and is set by SmolLM2-135M Q4_1, whose greedy answers sit on near-ties: with
ffn_down alone at one level (4.7e-4) its answer to "What is the capital of France?" changes, with
attn_output alone (5.7e-5) it does not (docs/quant.md has the figures).

The result depends only on the bundle's bytes: it is cached per bundle (the SHA-256 of its header,
which holds the hashes of its metadata, index and data) in $POCKETLM_CALIBRATION_DIR, else
$POCKETLM_CACHE/calibration (default
~/.cache/pocketlm), written atomically. `pocketlm convert` calibrates what it writes, so loading
never waits for it; a bundle from elsewhere is calibrated on its first load with "auto" (a few
scoring passes of 128 tokens: ~0.5 s for SmolLM2, a few seconds for a 1.5B model).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from pocketlm.passes.precision import SITES, auto_spec

BUDGET = 2e-4        # mean KL divergence (nats per token) one level may add, measured on TEXT
MAX_TOKENS = 128     # tokens of TEXT scored
VERSION = 3          # of the procedure, TEXT and the two-level format (3: d2 = d/256): another version is redone

TEXT = """The committee met on Tuesday to review the budget for the coming year. After a long
discussion, the members agreed to fund the new library wing, to repair the roof of the old school,
and to postpone the parking garage until the spring.

def moving_average(values, window=3):
    \"\"\"Return the running mean of `values` over `window` items.\"\"\"
    out = []
    for i in range(len(values) - window + 1):
        out.append(sum(values[i:i + window]) / window)
    return out

Q: What is the boiling point of water at sea level? A: 100 degrees Celsius, or 212 Fahrenheit.
Le chat dort sur le canapé pendant que la pluie tombe doucement sur les fenêtres."""


def cache_dir() -> Path:
    """$POCKETLM_CALIBRATION_DIR, else $POCKETLM_CACHE/calibration (default ~/.cache/pocketlm)."""
    own = os.environ.get("POCKETLM_CALIBRATION_DIR")
    if own:
        return Path(own).expanduser()
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")).expanduser() / "calibration"


def bundle_key(path: str | os.PathLike, secret: bytes | None = None) -> str:
    """The cache name of a bundle: its header's SHA-256, or an HMAC of it under `secret` (a decrypted
    bundle's, pocketlm.encryption: the name then says nothing about the plaintext)."""
    import hmac

    from pocketlm.bundle.layout import HEADER_BYTES

    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if secret is not None:
        return hmac.new(secret, head, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(head).hexdigest()[:32]


def cached(path: str | os.PathLike, secret: bytes | None = None) -> dict | None:
    try:
        entry = json.loads((cache_dir() / f"{bundle_key(path, secret)}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != VERSION or \
            not isinstance(entry.get("two_level"), list) or not set(entry["two_level"]) <= set(SITES):
        return None
    return entry


def _store(path, entry: dict, secret: bytes | None = None) -> None:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, d / f"{bundle_key(path, secret)}.json")
    except OSError:
        pass  # a read-only cache: calibrate again next time


def _logprobs(bundle, tokens: np.ndarray, spec: str, threads: int, kernels: str = "",
              sparse_layout: str = "auto") -> np.ndarray:
    """Log-softmax of the model's logits at every position, float32 with the normalizer summed in
    float64: within 4e-6 of a float64 log-softmax on Qwen2.5's 152k vocabulary (the budget is 2e-4),
    and 0.03 s instead of 0.06-0.46 s per run there."""
    from pocketlm import _core
    from pocketlm.engine import CompiledModel

    n = int(tokens.size)
    cm = CompiledModel(bundle, n, n, threads, all_logits=True, activations=spec, kernels=kernels,
                       sparse_layout=sparse_layout)
    state = _core.State(cm.program, n, "f32")
    x = state.run(tokens, 0)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


def _kld(ref: np.ndarray, p: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(ref || other) over the positions (p = exp(ref)); infinity if `other` is not finite
    (never chosen)."""
    v = float(np.einsum("ij,ij->i", p, ref - other, dtype=np.float64).mean())
    return v if np.isfinite(v) else float("inf")


def calibrate(bundle, tokenizer, threads: int, kernels: str = "", sparse_layout: str = "auto") -> dict:
    """Runs the procedure of the module doc on a loaded bundle; returns the cache entry (not stored)."""
    ids = tokenizer.encode(TEXT, add_special_tokens=True)[:MAX_TOKENS]
    vocab = int(bundle.metadata["config"]["vocab_size"])
    tokens = np.asarray([i for i in ids if 0 <= i < vocab] or [0], dtype=np.int32)
    run = lambda spec: _logprobs(bundle, tokens, spec, threads, kernels, sparse_layout)  # noqa: E731
    with np.errstate(all="ignore"):
        ref = run("int8x2")
        if not np.isfinite(ref).all():  # a broken model: keep two levels (generation reports the NaN)
            return {"version": VERSION, "budget": BUDGET, "tokens": int(tokens.size), "kld_one_level": None,
                    "site_cost": {}, "two_level": list(SITES), "note": "the reference logits are not finite"}
        return _choose(ref, run, int(tokens.size))


def _choose(ref: np.ndarray, run, n_tokens: int) -> dict:
    p = np.exp(ref)
    kld = lambda other: _kld(ref, p, other)  # noqa: E731
    one = kld(run("auto:" + auto_spec(())))
    entry = {"version": VERSION, "budget": BUDGET, "tokens": n_tokens, "kld_one_level": one,
             "site_cost": {}, "two_level": []}
    if one > BUDGET:
        cost = {s: kld(run(f"auto:int8x2,{s}=int8")) for s in SITES}
        entry["site_cost"] = cost
        order = sorted(SITES, key=lambda s: -cost[s])
        two: list[str] = []
        while len(two) < len(SITES):
            if sum(cost[s] for s in SITES if s not in two) <= BUDGET:
                got = kld(run("auto:" + auto_spec(two)))
                entry["kld_chosen"] = got
                if got <= BUDGET:
                    break
            two.append(order[len(two)])
        entry["two_level"] = [s for s in SITES if s in two]
    return entry


def resolve_auto(bundle, tokenizer, threads: int, kernels: str = "", sparse_layout: str = "auto") -> tuple[str, dict]:
    """(the spec "auto" stands for on this bundle, the calibration entry), calibrating and caching
    it if needed (with the engine's kernels and sparse layout: the programs it runs are its own)."""
    secret = getattr(bundle, "cache_secret", None)
    entry = cached(bundle.path, secret)
    if entry is None:
        entry = calibrate(bundle, tokenizer, threads, kernels, sparse_layout)
        _store(bundle.path, entry, secret)
    return "auto:" + auto_spec(entry["two_level"]), entry
