"""The executor's op schema, read from the one file both languages share: ``ops.def``.

``csrc/runtime/ops.def`` writes every executor op once (name, input and output counts,
in-place pairs, row-wise flag, named int and float params with defaults); C++ builds its op
table from it as an X-macro and this module parses the same lines. A wheel carries a copy
next to this file (CMakeLists.txt installs it); a source tree is read in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    default: int | float | None  # None: required


@dataclass(frozen=True)
class OpSchema:
    name: str
    min_inputs: int
    max_inputs: int | None        # None: variadic
    n_outputs: int | None         # None: variadic
    row_wise: bool                # row r of each output depends on row r of the inputs only
    inplace: tuple[tuple[int, int], ...] = ()   # (output, input) pairs that may share memory
    ints: tuple[Param, ...] = ()
    floats: tuple[Param, ...] = ()

    def wire_params(self, attrs: Any) -> tuple[list[int], list[float]]:
        """The positional (ints, floats) lists of _core.Program from an object with
        ``attr(name, default)`` (a graph Node), every param written, defaults filled in."""
        def values(params: tuple[Param, ...], cast: type) -> list:
            out = []
            for p in params:
                v = attrs.attr(p.name, p.default)
                if v is None:
                    raise ValueError(f"{self.name}: missing param {p.name!r}")
                out.append(cast(v))
            return out
        return values(self.ints, int), values(self.floats, float)


def _find_def() -> Path:
    here = Path(__file__).resolve().parent
    for path in (here / "ops.def", here.parents[2] / "csrc" / "runtime" / "ops.def"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"ops.def is neither next to {here} nor in the source tree")


_LINE = re.compile(r"^\s*(PLM_\w+)\(([^)]*)\)")


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse(text: str) -> dict[str, OpSchema]:
    ops: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line.split("//", 1)[0])
        if not m:
            continue
        macro, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if macro == "PLM_OP":
            name, lo, hi, n_out, row_wise = args
            ops[name] = {"name": name, "min_inputs": int(lo), "max_inputs": None if int(hi) < 0 else int(hi),
                         "n_outputs": None if int(n_out) < 0 else int(n_out), "row_wise": row_wise == "1",
                         "inplace": [], "ints": [], "floats": []}
            continue
        op = ops.get(args[0])
        if op is None:
            raise ValueError(f"ops.def:{lineno}: {macro} names op {args[0]!r} before its PLM_OP line")
        if macro == "PLM_INPLACE":
            op["inplace"].append((int(args[1]), int(args[2])))
        elif macro in ("PLM_INT", "PLM_INT_OR", "PLM_FLOAT", "PLM_FLOAT_OR"):
            kind = op["ints" if macro.startswith("PLM_INT") else "floats"]
            default = _number(args[2]) if macro.endswith("_OR") else None
            if default is None and kind and kind[-1].default is not None:
                raise ValueError(f"ops.def:{lineno}: required {args[1]!r} after an optional param")
            kind.append(Param(args[1], float(default) if default is not None and "FLOAT" in macro else default))
        else:
            raise ValueError(f"ops.def:{lineno}: unknown entry {macro}")
    return {name: OpSchema(**{**op, "inplace": tuple(op["inplace"]), "ints": tuple(op["ints"]),
                              "floats": tuple(op["floats"])}) for name, op in ops.items()}


SCHEMA: dict[str, OpSchema] = parse(_find_def().read_text())
