"""A bundle whose metadata holds a 10 MB string (or a 10 MB key) where the loader's schema wants
something else: the BundleError names the entry and quotes the value shortened (errors.shown), so
the message stays one short line. Before, metadata.py echoed the whole value (a 10 MB message).

The bundles are written with write_bundle and no loader check (the converter would refuse them),
holding only metadata: the schema runs when the reader parses it."""

from __future__ import annotations

import pytest

from pocketlm.bundle import read_bundle, write_bundle
from pocketlm.errors import BundleError, shown

BIG = "x" * (10 << 20)
CONFIG = {"vocab_size": 320, "hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
          "ffn_dim": 128, "rope_dim": 16, "max_position": 256, "rms_eps": 1e-5, "rope_theta": 1e4}

# case -> (metadata sections, what the message must say)
CASES = {
    "config.rope_theta": ({"config": {**CONFIG, "rope_theta": BIG}}, "config.rope_theta must be a finite number"),
    "config.rms_eps": ({"config": {**CONFIG, "rms_eps": BIG}}, "config.rms_eps must be a finite number"),
    "config.vocab_size": ({"config": {**CONFIG, "vocab_size": BIG}}, "config.vocab_size must be an integer"),
    "config.tie_embeddings": ({"config": {**CONFIG, "tie_embeddings": BIG}}, "config.tie_embeddings must be true"),
    "config.sliding_window": ({"config": {**CONFIG, "sliding_window": BIG}}, "config.sliding_window: window 'x"),
    "config.layer_windows[1]": ({"config": {**CONFIG, "layer_windows": [0, BIG]}}, "config.layer_windows[1]: window"),
    "rope_scaling.type": ({"config": {**CONFIG, "rope_scaling": {"type": BIG}}}, "config.rope_scaling.type must be"),
    "rope_scaling.factor": ({"config": {**CONFIG, "rope_scaling": {"type": "linear", "factor": BIG}}},
                            "config.rope_scaling.factor must be a number"),
    "generation.top_k": ({"config": CONFIG, "generation": {"top_k": BIG}}, "generation.top_k must be an integer"),
    "special_tokens.bos_id": ({"config": CONFIG, "special_tokens": {"bos_id": BIG}}, "special_tokens.bos_id must be"),
    "special_tokens.pad_id": ({"config": CONFIG, "special_tokens": {"pad_id": BIG}}, "special_tokens.pad_id must be"),
    "special_tokens.add_bos": ({"config": CONFIG, "special_tokens": {"add_bos": BIG}},
                               "special_tokens.add_bos must be true or false"),
    "a list of 1000 strings": ({"config": {**CONFIG, "rope_theta": [BIG[:10_000]] * 1000}},
                               "config.rope_theta must be a finite number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_value_is_quoted_shortened(case, tmp_path):
    meta, words = CASES[case]
    path = tmp_path / "long.plm"
    write_bundle(path, meta, [])
    with pytest.raises(BundleError) as info:
        _ = read_bundle(path).metadata
    message = str(info.value)
    assert words in message, message[:2000]
    assert len(message) < 1000, message[:2000]


def test_shown():
    assert shown("ab") == "'ab'"
    assert shown("x" * 100) == repr("x" * 80) + "... (100 characters)"
    assert shown("x" * 100, limit=10) == "'xxxxxxxxxx'... (100 characters)"
    assert shown(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"  # bounded work, not a 7 MB repr
    assert shown([BIG] * 3).endswith("... (3 entries)") and len(shown([BIG] * 3)) < 120
    assert shown(10**5000) == "an integer of 16610 bits"  # str() refuses past 4300 digits
    assert shown(1e-300) == "1e-300" and shown(None) == "None"
