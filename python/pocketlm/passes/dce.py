"""Dead-code elimination and the rewrite that makes it matter for generation.

`last_position_only` moves the graph outputs onto the last token row of each
sequence: generation needs logits for the last position of a prefill chunk only, so
the final norm and the vocabulary-sized output matmul run on one row per sequence of
the step (S rows) instead of T. The full-width
nodes it replaces become dead and `eliminate_dead_code` removes them.
"""

from __future__ import annotations

from pocketlm.ir.graph import S, T, Graph, Node
from pocketlm.ir.schema import SCHEMA


def _row_wise_on_input0(g: Graph, n: Node) -> bool:
    """Row r of n's one output depends on row r of input 0 only (a row-wise op of the schema whose
    other inputs are weights or consts), so a take_last below it can move above it."""
    schema = SCHEMA.get(n.op)
    return (schema is not None and schema.row_wise and len(n.outputs) == 1
            and all(x not in g.values for x in n.inputs[1:]))


def last_position_only(g: Graph) -> Graph:
    out = g.copy()
    prod = g.producers()
    new_outputs = []
    for o in g.outputs:
        # Walk up the row-wise chain ending at this output.
        chain: list[Node] = []
        cur = o
        while cur in prod and _row_wise_on_input0(g, g.nodes[prod[cur]]) and g.values[cur].rows == T:
            n = g.nodes[prod[cur]]
            chain.append(n)
            cur = n.inputs[0]
        if not chain:
            new_outputs.append(o)
            continue
        top = chain[-1]
        src = top.inputs[0]
        last = out.emit("take_last", [src], [(S, g.values[src].cols)], "last")[0]
        out.nodes.pop()  # re-insert below, after `src` is defined
        take = Node("take_last", (src,), (last,))
        rename = {src: last}
        tail: list[Node] = [take]
        for n in reversed(chain):
            outs = []
            for x in n.outputs:
                nx = out.fresh(x.split(".")[0] + "_last")
                out.values[nx] = type(g.values[x])(nx, S, g.values[x].cols)
                rename[x] = nx
                outs.append(nx)
            tail.append(n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs), outputs=tuple(outs)))
        out.nodes.extend(tail)
        new_outputs.append(rename[o])
    out.outputs = tuple(new_outputs)
    return out


HEAD_WEIGHTS = ("output.weight", "token_embd.weight")  # the output head, its own or tied to the embeddings


def hidden_states_output(g: Graph) -> Graph:
    """The graph's output moved from the logits to the final hidden states (the final norm's output,
    what the output head reads; llama.cpp's embeddings read the same): for embeddings. The head and
    what follows it (a final softcap) become dead. Raises ValueError if no head is found."""
    prod = g.producers()
    cur = g.outputs[0]
    while cur in prod:
        n = g.nodes[prod[cur]]
        if n.op == "matmul" and len(n.inputs) > 1 and n.inputs[1] in HEAD_WEIGHTS:
            out = g.copy()
            out.outputs = (n.inputs[0],)
            return out
        if not _row_wise_on_input0(g, n):
            break
        cur = n.inputs[0]
    raise ValueError("the graph's output is not an output head over the hidden states")


def eliminate_dead_code(g: Graph) -> Graph:
    live = set(g.outputs)
    keep: list[Node] = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(x for x in n.inputs if x)
    out = g.copy()
    out.nodes = list(reversed(keep))
    used = set(out.outputs) | {x for n in out.nodes for x in n.inputs + n.outputs}
    out.values = {k: v for k, v in g.values.items() if k in used}
    out.consts = {k: v for k, v in g.consts.items() if k in used}
    out.weights = {k: v for k, v in g.weights.items() if k in used}
    return out


def matmul_input_output(g: Graph, weight: str) -> tuple[Graph, tuple[str, ...]]:
    """The graph's output moved to the input of the matmul that reads `weight` (what pruning's
    Wanda scores need: a linear layer's input over calibration text); everything past it becomes
    dead. Returns the graph and the weights of every matmul reading that same input (q, k and v
    share theirs). ValueError if no matmul reads `weight`."""
    for n in g.nodes:
        if n.op == "matmul" and len(n.inputs) > 1 and n.inputs[1] == weight:
            src = n.inputs[0]
            shared = tuple(m.inputs[1] for m in g.nodes if m.op == "matmul" and len(m.inputs) > 1
                           and m.inputs[0] == src)
            out = g.copy()
            out.outputs = (src,)
            return out, shared
    raise ValueError(f"no matmul reads {weight}")
