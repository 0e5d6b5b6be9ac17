"""A jinja2 sandbox that bounds the work a chat template can do, not only what it can reach.

A chat template comes inside the model file, so it is as hostile as the file. jinja2's
ImmutableSandboxedEnvironment stops escapes (no private attributes, no changes to the caller's
data) but not work: two nested loops over range(100000), `'x' * 10**10` or `'%999999999s' % x` run
until the process is killed or out of memory. Here a template's source is at most
MAX_TEMPLATE_CHARS long (compiling it is not otherwise bounded), and each render has

- a deadline (MAX_RENDER_SECONDS), checked at every loop iteration, call, attribute or item access,
  intercepted operator, filter and comparison, so a render ends within the deadline plus one
  bounded step;
- a size limit on every value it builds (MAX_VALUE_SIZE characters, or items for a list),
  checked *before* each operation that can make its result much larger than its operands:
  repetition, concatenation, `%` and `format` widths, padding methods and filters (center, ljust,
  zfill, expandtabs, indent, wordwrap's wrapstring), replace, join, translate, tojson and pprint
  (indent and depth), batch's fill, lipsum, and turning a container into text (its printed size
  is estimated without building it);
- a budget of characters and items built over the whole render (MAX_RENDER_CHARS), so that
  many bounded values cannot add up to gigabytes;
- a bound on comparisons and sorts, whose cost grows with the operands' nested size (a list of a
  million references to one long string compares a million long strings);
- a bound on the nesting of tuples that are hashed (dict keys, `in` a dict, unique): CPython hashes
  them by C recursion with no depth check, so a deep enough tuple crashes the process;
- the output size (MAX_OUTPUT_CHARS), counted as it is produced.

Each limit fails with ChatTemplateError naming it. The environment renders like transformers'
(see chat.py): the rewriting below changes only how operations are checked, never their results.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import operator
import re
import time
from collections.abc import Iterator
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.runtime import LoopContext, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, pass_environment
from markupsafe import Markup

from pocketlm.errors import ChatTemplateError

MAX_RENDER_SECONDS = 2.0
# The template's source. jinja2 compiles a template to Python at about 10 us and 1-3 KB of memory per
# character, outside any check (128 KiB took 2.2 s and 400 MB here, 10 MB took 105 s and 9 GB);
# released chat templates are 1-15 KB.
MAX_TEMPLATE_CHARS = 64 * 1024
# The rendered prompt, in characters: about 500k tokens of text, more than any context we run.
MAX_OUTPUT_CHARS = 2 * 1024 * 1024
# Any one value a template builds: characters of a string, items of a list, printed size of a container.
MAX_VALUE_SIZE = MAX_OUTPUT_CHARS
# Characters and items built over a whole render (a long conversation through a template that
# rebuilds its prompt message by message stays far below this).
MAX_RENDER_CHARS = 32 * MAX_OUTPUT_CHARS
# Nested size of the operands of one comparison, sort, min/max, unique or groupby.
MAX_COMPARE_SIZE = 8 * MAX_VALUE_SIZE
MAX_INT_BITS = 1 << 16
# Nesting of a tuple hashed as a dict key or set member: CPython hashes nested tuples by C recursion
# with no depth check (a 300k-deep tuple crashes the process), and does not cache tuple hashes
# (a tuple holding itself twice, 40 levels deep, hashes 2^40 tuples).
MAX_HASH_NESTING = 256
# tojson's indent plus separators, in characters (templates use 2 or 4).
MAX_JSON_INDENT = 16
# urlize and wordwrap run regular expressions that are quadratic on crafted input.
MAX_REGEX_FILTER_CHARS = 20_000


class _Budget:
    __slots__ = ("deadline", "seconds", "chars_left")

    def __init__(self, seconds: float, chars: int):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.chars_left = chars


# The budget of the render running in this thread (None outside a render, e.g. when jinja folds
# constants at compile time: then only the per-value limits apply).
_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("pocketlm_chat_budget", default=None)


def _tick() -> None:
    budget = _budget.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise ChatTemplateError(f"chat template exceeded its time limit of {budget.seconds:g} s "
                                "(pocketlm.chat_sandbox.MAX_RENDER_SECONDS)")


def _charge(size: int, items: bool = False) -> None:
    """Accounts for a value of `size` characters (or list items) about to be built, or just built.
    An item costs the budget 32: a pointer, and often a small object behind it."""
    if size > MAX_VALUE_SIZE:
        raise ChatTemplateError(f"chat template builds a value of {size:,} characters or items, over the limit "
                                f"of {MAX_VALUE_SIZE:,} (pocketlm.chat_sandbox.MAX_VALUE_SIZE)")
    budget = _budget.get()
    if budget is not None:
        budget.chars_left -= 32 * size if items else size
        if budget.chars_left < 0:
            raise ChatTemplateError(f"chat template built more than {MAX_RENDER_CHARS:,} characters and items in "
                                    "all (pocketlm.chat_sandbox.MAX_RENDER_CHARS)")


def _charge_value(value: Any) -> None:
    _charge(len(value), items=not isinstance(value, str))


_END = object()


def _printed_size(value: Any, indent: int = 0, per_item: int = 2, limit: int = MAX_VALUE_SIZE) -> int:
    """An estimate of len(str(value)) (or of its JSON with `indent` spaces per level and `per_item`
    characters of separators), counted without building it and given up once past `limit`. Shared
    references count each time, as printing repeats them; cycles just add up to the limit."""
    if type(value) is str:
        return len(value)
    total, steps = 0, 0
    stack: list[tuple[Iterator, int]] = [(iter((value,)), 0)]
    while stack:
        items, depth = stack[-1]
        v = next(items, _END)
        if v is _END:
            stack.pop()
            continue
        steps += 1
        if not steps & 0xFFF:
            _tick()
        overhead = per_item + indent * depth
        if isinstance(v, str):
            total += len(v) + overhead
        elif isinstance(v, bool) or v is None:
            total += 5 + overhead
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2 + overhead
        elif isinstance(v, float):
            total += 24 + overhead
        elif isinstance(v, dict):
            total += 2 + 2 * len(v) + overhead
            stack.append((itertools.chain.from_iterable(v.items()), depth + 1))
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + overhead
            stack.append((iter(v), depth + 1))
        elif isinstance(v, Namespace):
            attrs = object.__getattribute__(v, "_Namespace__attrs")
            total += 14 + overhead
            stack.append((itertools.chain.from_iterable(attrs.items()), depth + 1))
        elif isinstance(v, Undefined):
            total += overhead
        else:  # macros, loop objects, generators: a short repr
            total += 64 + overhead
        if total > limit:
            return total
    return total


def _check_printed(value: Any, factor: int = 1, **kw: Any) -> None:
    """Refuses to turn `value` into text when the text would be over the value limit."""
    if type(value) is str and factor == 1:
        return
    size = _printed_size(value, **kw) * factor
    if size > MAX_VALUE_SIZE:
        _charge(size)  # raises, naming the limit


class _Bounded:
    """What a `{% for %}` loop iterates: the same items, with the deadline checked at each one."""

    __slots__ = ("_iterable",)

    def __init__(self, iterable: Any):
        self._iterable = iterable

    def __len__(self) -> int:  # loop.length stays O(1) for sized iterables
        return len(self._iterable)

    def __iter__(self) -> Iterator:
        return _ticking(self._iterable)


def _ticking(iterable: Any) -> Iterator:
    for n, item in enumerate(iterable, 1):
        if n > MAX_VALUE_SIZE:
            raise ChatTemplateError(f"chat template iterates over more than {MAX_VALUE_SIZE:,} items "
                                    "(pocketlm.chat_sandbox.MAX_VALUE_SIZE)")
        _tick()
        yield item


def _materialize(iterable: Any) -> list:
    return iterable if isinstance(iterable, list) else list(_ticking(iterable))


# -- operators ---------------------------------------------------------------------------------

def _int_bits(x: Any) -> int:
    return x.bit_length() if isinstance(x, int) else 0


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise ChatTemplateError(f"chat template computes an integer of about {bits:,} bits, over the limit of "
                                f"{MAX_INT_BITS:,} (pocketlm.chat_sandbox.MAX_INT_BITS)")


# %[(key)][flags][width][.precision][length]type
_PRINTF_SPEC = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def _printf_size(fmt: str, args: Any) -> int:
    """An upper bound on len(fmt % args), from the widths, precisions and arguments."""
    positional = args if isinstance(args, tuple) else (args,)
    total, i = len(fmt), 0
    for key, width, precision, conversion in _PRINTF_SPEC.findall(fmt):
        if conversion == "%":
            continue
        if "*" in (width, precision):
            raise ChatTemplateError("chat template uses a '*' width in % formatting, which pocketlm does not allow")
        if key and isinstance(args, dict):
            arg = args.get(key)
        elif isinstance(args, dict):
            arg = args
        else:
            arg = positional[i] if i < len(positional) else None
            i += 1
        for n in (width, precision):
            if n and len(n) > 9:
                _charge(MAX_VALUE_SIZE + 1)
        # Floats print up to 309 integer digits before the precision's.
        total += max(int(width or 0), int(precision or 0)) + 320 + _printed_size(arg)
        if total > MAX_VALUE_SIZE:
            break
    return total


def _check_binop(op: str, left: Any, right: Any) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _charge(len(seq) * max(n, 0), items=not isinstance(seq, str))
                return
        if isinstance(left, int) and isinstance(right, int):
            _check_int_bits(_int_bits(left) + _int_bits(right))
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _charge(len(left) + len(right), items=not isinstance(left, str))
    elif op == "%":
        if isinstance(left, str):
            _charge(_printf_size(left, right))
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_int_bits(right * _int_bits(left))


_COMPARISONS = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
    "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}
_CHEAP = (str, int, float, type(None), Undefined)


def _check_compare(op: str, a: Any, b: Any) -> None:
    if op in ("in", "notin"):
        if isinstance(b, (dict, set, frozenset)):
            check_hashable(a)
            return  # hashed containers compare equal hashes only
        if isinstance(b, (str, range)) or not isinstance(b, (list, tuple)):
            return  # substring search is linear
        cost = _printed_size(b, limit=MAX_COMPARE_SIZE)
    else:
        if isinstance(a, _CHEAP) or isinstance(b, _CHEAP):
            return
        cost = min(_printed_size(a, limit=MAX_COMPARE_SIZE), _printed_size(b, limit=MAX_COMPARE_SIZE))
    _check_compare_cost(cost)


def _check_compare_cost(cost: int) -> None:
    if cost > MAX_COMPARE_SIZE:
        raise ChatTemplateError(f"chat template compares or sorts values of nested size over {MAX_COMPARE_SIZE:,} "
                                "(pocketlm.chat_sandbox.MAX_COMPARE_SIZE)")


def check_hashable(value: Any) -> None:
    """Refuses to hash a value whose tuples nest deeper than MAX_HASH_NESTING or hold too many
    tuples (counted along every path, as hashing visits them). Lists on the way are followed
    too, for dict(pairs)."""
    if not isinstance(value, (tuple, list)):
        return
    nodes = 0
    stack: list[tuple[Iterator, int]] = [(iter((value,)), 0)]
    while stack:
        items, depth = stack[-1]
        v = next(items, _END)
        if v is _END:
            stack.pop()
            continue
        if isinstance(v, (tuple, list)):
            nodes += len(v) + 1
            if depth >= MAX_HASH_NESTING:
                raise ChatTemplateError(f"chat template hashes a value nested more than {MAX_HASH_NESTING} deep "
                                        "(pocketlm.chat_sandbox.MAX_HASH_NESTING)")
            if nodes > MAX_COMPARE_SIZE:
                _check_compare_cost(nodes)
            if not nodes & 0xFFF:
                _tick()
            stack.append((iter(v), depth + 1))


def compare(op: str, a: Any, b: Any) -> bool:
    _tick()
    _check_compare(op, a, b)
    return _COMPARISONS[op](a, b)


def compare_chain(first: Any, *rest: tuple[str, Any]) -> bool:
    """`a < b < c`: later operands are thunks, evaluated only as far as the chain goes, as in Python."""
    left = first
    for op, thunk in rest:
        right = thunk()
        if not compare(op, left, right):
            return False
        left = right
    return True


# -- str methods and str.format ----------------------------------------------------------------

def _int_arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _replace_size(s: str, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Checks a str method call before it runs; returns its arguments (an iterable to join comes
    back as a list, since checking it consumed it)."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _int_arg(args, kwargs, 0, "width", 0)
        if isinstance(width, int):
            _charge(max(len(s), width))
    elif name == "expandtabs":
        tabsize = _int_arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(tabsize, int):
            _charge(len(s) + s.count("\t") * max(tabsize, 0))
    elif name == "replace":
        _charge(_replace_size(s, _int_arg(args, kwargs, 0, "old", ""), _int_arg(args, kwargs, 1, "new", ""),
                              _int_arg(args, kwargs, 2, "count", -1)))
    elif name == "join" and len(args) == 1:
        items = _materialize(args[0])
        _charge(sum(len(x) for x in items if isinstance(x, str)) + max(len(items) - 1, 0) * len(s))
        args = (items,)
    elif name == "translate" and len(args) == 1:
        table = args[0]
        widest = max((len(v) for v in table.values() if isinstance(v, str)), default=1) \
            if isinstance(table, dict) else 1
        _charge(len(s) * max(widest, 1))
    return args


class _BoundedFormatter(SandboxedFormatter):
    """str.format in the sandbox, with each field's width and the total output checked."""

    def __init__(self, env: Any, **kwargs: Any):
        super().__init__(env, **kwargs)
        self._size = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            _check_printed(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        _tick()
        widest = max((int(n) if len(n) <= 9 else MAX_VALUE_SIZE + 1 for n in re.findall(r"\d+", format_spec)),
                     default=0)
        _charge(widest + 320 + _printed_size(value))
        text = super().format_field(value, format_spec)
        self._size += len(text)
        if self._size > MAX_VALUE_SIZE:
            _charge(self._size)
        return text


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


# -- filters, tests, globals -------------------------------------------------------------------

def _check_filter(name: str, a: dict[str, Any]) -> None:
    """Checks before the filter `name` runs, from its bound arguments `a` (named as in jinja2.filters)."""
    value = a.get("value", a.get("s"))
    if name in _STRINGIFYING:
        _check_printed(value, factor=_STRINGIFYING[name])
    if name == "center":
        if isinstance(a["width"], int):
            _charge(a["width"])
    elif name == "indent":
        width = a["width"]
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = str(value).count("\n") + 1
        _charge(_printed_size(value) + lines * max(pad, 0))
    elif name == "wordwrap":
        text = str(value)
        _check_regex_input(name, text)
        wrap = a["wrapstring"]
        _charge(len(text) * (1 + (len(wrap) if isinstance(wrap, str) else 1)))
    elif name == "urlize":
        _check_regex_input(name, str(value))
    elif name == "replace":
        _charge(_replace_size(str(value), a["old"], a["new"], a["count"]))
    elif name == "format":
        _charge(_printf_size(str(value), a["kwargs"] or a["args"]))
    elif name == "batch":
        if a["fill_with"] is not None and isinstance(a["linecount"], int):
            _charge(a["linecount"], items=True)
    elif name == "slice":
        if isinstance(a["slices"], int):
            _charge(a["slices"], items=True)
    elif name == "tojson":
        indent, separators = a.get("indent"), a.get("separators")
        pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        between = (sum(len(x) for x in separators if isinstance(x, str))
                   if isinstance(separators, (tuple, list)) else 2)
        if max(pad, between) > MAX_JSON_INDENT:
            raise ChatTemplateError(f"chat template asks tojson for an indent or separators of {max(pad, between):,} "
                                    f"characters, over the limit of {MAX_JSON_INDENT} "
                                    "(pocketlm.chat_sandbox.MAX_JSON_INDENT)")
        escaped = 12 if a.get("ensure_ascii") else 1  # \ud83d\ude00 for one character
        _charge(_printed_size(value, indent=max(pad, 0), per_item=2 + between) * escaped)
    elif name == "pprint":
        _charge(_printed_size(value, indent=1, per_item=3))


# Filters that turn their value into text, with the growth factor of that text (escaping).
_STRINGIFYING = {
    "string": 1, "safe": 1, "trim": 1, "upper": 3, "lower": 3, "capitalize": 3, "title": 3, "wordcount": 1,
    "striptags": 1, "truncate": 1, "center": 1, "indent": 1, "wordwrap": 1, "replace": 1, "format": 1,
    "e": 6, "escape": 6, "forceescape": 6, "urlencode": 9, "urlize": 6, "xmlattr": 6,
}
# Filters checked from their named arguments in _check_filter.
_ARG_CHECKED = {"center", "indent", "wordwrap", "urlize", "replace", "format", "batch", "slice", "tojson", "pprint"}
# Filters whose cost grows with the nested size of their value (they compare items).
_COMPARING = {"sort", "dictsort", "unique", "min", "max", "groupby"}
# Filters that return (part of) their input rather than build something: not charged again.
_PASSTHROUGH = {"first", "last", "default", "d", "attr", "random", "min", "max", "length", "count", "abs",
                "int", "float", "round", "safe"}


def _check_regex_input(name: str, text: str) -> None:
    if len(text) > MAX_REGEX_FILTER_CHARS:
        raise ChatTemplateError(f"chat template applies {name} to {len(text):,} characters, over the limit of "
                                f"{MAX_REGEX_FILTER_CHARS:,} (pocketlm.chat_sandbox.MAX_REGEX_FILTER_CHARS)")


def _guard_filter(name: str, func: Any) -> Any:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a C function without a text signature (markupsafe 2.1.2's escape)
        if name in _ARG_CHECKED:  # its arguments are checked by name: never unchecked
            raise
        signature = None
    passes = getattr(func, "jinja_pass_arg", None) is not None
    # jinja2's async variants pass the eval context to a function whose signature does not name it.
    first = next(iter(signature.parameters), "") if signature is not None else ""
    skip = 1 if passes and first not in ("environment", "env", "eval_ctx", "context") else 0
    value_at = 1 if passes else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if name in _COMPARING and len(args) > value_at:
            value = args[value_at]
            if not isinstance(value, (list, tuple, dict, str)):
                value = _materialize(value)
                args = (*args[:value_at], value, *args[value_at + 1:])
            _check_compare_cost(_printed_size(value, limit=MAX_COMPARE_SIZE))
            if name == "unique":
                check_hashable(value)
        elif name == "join" and len(args) > 1:
            value = _materialize(args[1])
            args = (args[0], value, *args[2:])
            sep = args[2] if len(args) > 2 else kwargs.get("d", "")
            _charge(_printed_size(value) + len(value) * _printed_size(sep))
        elif name in _ARG_CHECKED:
            try:
                bound = signature.bind(*args[skip:], **kwargs)
            except TypeError:
                pass  # the filter itself will raise, with its own message
            else:
                bound.apply_defaults()
                _check_filter(name, bound.arguments)
        elif name in _STRINGIFYING and len(args) > value_at:
            _check_printed(args[value_at], factor=_STRINGIFYING[name])
        result = func(*args, **kwargs)
        if isinstance(result, Iterator):
            return _ticking(result)
        if name not in _PASSTHROUGH and isinstance(result, (str, list, tuple, dict)):
            _charge_value(result)
        return result

    return guarded


@pass_environment
def _bounded_sum(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """jinja2's sum filter, adding through the checked `+` (builtin sum over lists is quadratic in C)."""
    if attribute is not None:
        from jinja2.filters import make_attrgetter

        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in _ticking(iterable):
        total = environment.call_binop(None, "+", total, item)
    return total



def _compare_test(op: str) -> Any:
    def guarded(a: Any, b: Any) -> bool:
        return compare(op, a, b)

    return guarded


_COMPARE_TESTS = {
    "==": "eq", "eq": "eq", "equalto": "eq", "!=": "ne", "ne": "ne", ">": "gt", "gt": "gt", "greaterthan": "gt",
    ">=": "gteq", "ge": "gteq", "<": "lt", "lt": "lt", "lessthan": "lt", "<=": "lteq", "le": "lteq", "in": "in",
}


def _bounded_lipsum(lipsum: Any) -> Any:
    def bounded(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
        if isinstance(n, int) and isinstance(max, int):
            _charge(n * max * 16)
        return lipsum(n, html, min, max)

    return bounded


# -- the environment ---------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Sends `~`, comparisons, slices and dict displays through the environment's checked versions."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:  # keys are hashed: see check_hashable
        self.write("environment.bounded_dict((")
        for item in node.items:
            self.write("(")
            self.visit(item.key, frame)
            self.write(", ")
            self.visit(item.value, frame)
            self.write("), ")
        self.write("))")

    @optimizeconst
    def visit_Getitem(self, node: nodes.Getitem, frame: Any) -> None:
        if not isinstance(node.arg, nodes.Slice):  # jinja2 sends slices past environment.getitem
            return super().visit_Getitem(node, frame)
        self.write("environment.bounded_slice(")
        self.visit(node.node, frame)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            self.write(", ")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write(")")

    @optimizeconst
    def visit_Compare(self, node: nodes.Compare, frame: Any) -> None:
        if len(node.ops) == 1:
            self.write(f"environment.bounded_compare({node.ops[0].op!r}, ")
            self.visit(node.expr, frame)
            self.write(", ")
            self.visit(node.ops[0].expr, frame)
            self.write(")")
            return
        self.write("environment.bounded_compare_chain(")
        self.visit(node.expr, frame)
        for op in node.ops:
            self.write(f", ({op.op!r}, lambda: ")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the limits in this module's docstring. Render with
    `render(template, **variables)`, which sets up a budget; outside it only the per-value limits hold."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    bounded_compare = staticmethod(compare)
    bounded_compare_chain = staticmethod(compare_chain)

    def __init__(self, **kwargs: Any):
        super().__init__(finalize=self._finalize_output, **kwargs)
        self.filters["sum"] = _bounded_sum
        self.filters["_pocketlm_bounded_iter"] = _Bounded
        self.globals["lipsum"] = _bounded_lipsum(self.globals["lipsum"])
        for name, op in _COMPARE_TESTS.items():
            if name in self.tests:
                self.tests[name] = _compare_test(op)

    def guard_filters(self) -> None:
        """Wraps every filter (call after adding the environment's own filters)."""
        for name, func in list(self.filters.items()):
            if name != "_pocketlm_bounded_iter" and not getattr(func, "_pocketlm_guarded", False):
                guarded = _guard_filter(name, func)
                guarded._pocketlm_guarded = True
                self.filters[name] = guarded

    # Every `{% for %}` iterates through _Bounded, which checks the deadline at each item.
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, "_pocketlm_bounded_iter", [], [], None, None,
                                     lineno=loop.lineno).set_environment(self)
        return tree

    @staticmethod
    def _finalize_output(value: Any) -> Any:  # `{{ value }}`
        _tick()
        if type(value) is not str:
            _charge(_printed_size(value))
        return value

    @staticmethod
    def concat(pieces: Any) -> str:  # the captured output of macros, call and set blocks
        pieces = _materialize(pieces)
        _charge(sum(map(len, pieces)))
        return "".join(pieces)

    @staticmethod
    def bounded_concat(items: tuple) -> str:  # `a ~ b`
        _charge(sum(len(v) if type(v) is str else _printed_size(v) for v in items))
        return "".join(map(str, items))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return self.binop_table[operator](left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        check_hashable(argument)
        value = super().getitem(obj, argument)
        if isinstance(argument, slice) and isinstance(value, (str, list, tuple)):
            _charge_value(value)
        return value

    @staticmethod
    def bounded_dict(pairs: tuple) -> dict:  # `{key: value, ...}`
        for key, _ in pairs:
            check_hashable(key)
        return dict(pairs)

    @staticmethod
    def bounded_slice(obj: Any, start: Any, stop: Any, step: Any) -> Any:  # `obj[start:stop:step]`
        _tick()
        value = obj[start:stop:step]
        if isinstance(value, (str, list, tuple)):
            _charge_value(value)
        return value

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (_Bounded(args[0]), *args[1:])
        elif isinstance(owner, LoopContext) and getattr(__obj, "__name__", "") == "changed":  # compares with ==
            _check_compare_cost(_printed_size(args, limit=MAX_COMPARE_SIZE))
        elif __obj is dict:
            check_hashable(args)
        elif isinstance(owner, (list, tuple)) and getattr(__obj, "__name__", "") in ("index", "count"):
            _check_compare_cost(_printed_size(owner, limit=MAX_COMPARE_SIZE))
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(owner, str) and isinstance(result, (str, bytes, list, tuple)):
            _charge(len(result), items=isinstance(result, (list, tuple)))
        return result

    def wrap_str_format(self, value: Any) -> Any:
        if super().wrap_str_format(value) is None:
            return None
        text: str = value.__self__
        is_format_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            formatter = (_BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup)
                         else _BoundedFormatter(self))
            return type(text)(formatter.vformat(text, args, kwargs))

        return bounded_format

    def compile_template(self, source: str) -> Any:
        """from_string within the limits: compiling folds constant expressions, which runs filters."""
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"chat template is {len(source):,} characters, over the limit of "
                                    f"{MAX_TEMPLATE_CHARS:,} (pocketlm.chat_sandbox.MAX_TEMPLATE_CHARS)")
        token = _budget.set(_Budget(MAX_RENDER_SECONDS, MAX_RENDER_CHARS))
        try:
            return self.from_string(source)
        finally:
            _budget.reset(token)

    def render(self, template: Any, seconds: float | None = None, **variables: Any) -> str:
        """Renders a template compiled by this environment within the limits."""
        seconds = MAX_RENDER_SECONDS if seconds is None else seconds
        token = _budget.set(_Budget(seconds, MAX_RENDER_CHARS))
        try:
            pieces, size = [], 0
            for piece in template.generate(**variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"chat template output is over {MAX_OUTPUT_CHARS:,} characters "
                                            "(pocketlm.chat_sandbox.MAX_OUTPUT_CHARS)")
                pieces.append(piece)
            return "".join(pieces)
        finally:
            _budget.reset(token)
