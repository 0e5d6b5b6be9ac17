"""Activation precision per matmul: how each integer matmul quantizes its input rows.

A matmul with quantized weights multiplies int8 codes by its activations quantized to int8 per
block of 32, either in one level (``int8``: llama.cpp's kind, fastest) or in two (``int8x2``: a
second int8 level holds the residual, ~15-bit precision, one more integer dot product per block,
which prefill and batched decode pay for).

An activation spec names a default and per-site overrides, each ``int8`` or ``int8x2``:
``"int8x2"``, ``"int8"``, or e.g. ``"int8,ffn_down=int8x2"``. Sites (`SITES`) follow the tensor
names of the bundle (llama.cpp's): ``attn_qkv`` (the q, k and v projections), ``attn_output``,
``ffn_up`` (gate and up, or GPT-2's first MLP layer), ``ffn_down`` and ``output`` (the head).

``"auto"`` (the default) decides per matmul, from measurements (docs/quality.md, "Activation
precision"):
- two levels where a weight has 6 bits or more (Q6_K, Q8_0, int8): there the activations' rounding
  is most of the error (Qwen2.5-0.5B int8 weights: one level raises the KL divergence to the f32
  model by 40 %, Q8_0 blocks 4.3x);
- elsewhere (4- and 5-bit weights, whose own rounding dominates: one level adds 0.8 % to the int4
  model's) what the model's calibration says (`pocketlm.calibration`): one level at every site unless
  that moves the model's output by more than a budget, then two levels at the sites that matter most.
The pass writes each matmul op's ``act_levels`` (1 or 2, csrc/runtime/ops.def).
"""

from __future__ import annotations

from pocketlm.dtypes import DType
from pocketlm.ir.graph import Graph

LEVELS = {"int8": 1, "int8x2": 2}
SITES = ("attn_qkv", "attn_output", "ffn_up", "ffn_down", "output")
MATMUL_OPS = ("matmul", "matmul_multi", "matmul_swiglu", "matmul_geglu")

# Weight types of 6 bits or more: "auto" gives their matmuls two levels.
WIDE_WEIGHTS = frozenset({DType.Q6_K, DType.Q8_0, DType.Q8_0_X16, DType.I8, DType.I8_X16, DType.I8_24_X16,
                          DType.I8_BITMASK})

_ROLE_OF = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "attn_qkv": "attn_qkv",
            "attn_output": "attn_output", "ffn_gate": "ffn_up", "ffn_up": "ffn_up", "ffn_down": "ffn_down",
            "output": "output", "token_embd": "output"}


def parse(spec: str) -> tuple[int, dict[str, int]]:
    """(default levels, {site: levels}) of an activation spec ("auto" is resolved by
    `make_activation_levels`); ValueError naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("activations: expected 'auto', 'int8x2', 'int8' or e.g. 'int8,ffn_down=int8x2'")
    if spec.strip() == "auto":
        return 0, {}
    parts = [p.strip() for p in spec.split(",")]
    head, rest = parts[0], parts[1:]
    if head not in LEVELS:
        raise ValueError(f"activations: the default must be int8 or int8x2 (or 'auto'), got {head!r}")
    sites: dict[str, int] = {}
    for p in rest:
        site, eq, level = p.partition("=")
        site, level = site.strip(), level.strip()
        if not eq or site not in SITES or level not in LEVELS:
            raise ValueError(f"activations: {p!r} is not SITE=int8|int8x2 with SITE one of {', '.join(SITES)}")
        if site in sites:
            raise ValueError(f"activations: {site} is given twice")
        sites[site] = LEVELS[level]
    return LEVELS[head], sites


def auto_spec(two_level_sites) -> str:
    """The spec "auto" stands for once calibration chose the sites that keep two levels (besides
    the wide weights): one level elsewhere."""
    return ",".join(["int8"] + [f"{s}=int8x2" for s in SITES if s in set(two_level_sites)])


def site_of(g: Graph, node) -> str | None:
    """The site of a matmul node, from its (first) weight's name; None if the name says nothing."""
    if g.outputs and node.outputs[0] in g.outputs:
        return "output"
    w = node.inputs[1]
    stem = w.rsplit(".", 1)[0] if w.endswith(".weight") else w
    return _ROLE_OF.get(stem.rsplit(".", 1)[-1])


def make_activation_levels(spec: str, weight_types: dict[str, DType] | None = None):
    """The pass that writes `act_levels` on every matmul op for `spec` (checked here, at once).
    weight_types: each weight's stored type, for the rule of auto specs (`auto_spec` output marked
    by a leading "auto:"): two levels wherever a weight is in WIDE_WEIGHTS."""
    wide_rule = spec.startswith("auto:")
    default, sites = parse(spec.removeprefix("auto:"))
    if default == 0:
        raise ValueError("activations: 'auto' must be resolved (calibrated) before compiling")
    types = weight_types or {}

    def activation_levels(g: Graph) -> Graph:
        nodes = []
        for n in g.nodes:
            if n.op in MATMUL_OPS:
                site = site_of(g, n)
                levels = sites.get(site, default) if site else default
                weights = n.inputs[1::2] if n.op == "matmul_multi" else n.inputs[1:3] if n.op != "matmul" else n.inputs[1:2]
                if wide_rule and any(types.get(w) in WIDE_WEIGHTS for w in weights):
                    levels = 2
                n = n.with_(attrs=tuple((k, v) for k, v in n.attrs if k != "act_levels") + (("act_levels", levels),))
            nodes.append(n)
        out = g.copy()
        out.nodes = nodes
        return out

    return activation_levels
