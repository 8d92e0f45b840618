"""The bounded jinja2 sandbox a chat template renders in: no runaway loop, allocation or include.

A chat template comes with the export, so from whoever made it. jinja2's
ImmutableSandboxedEnvironment (what transformers renders templates in) already keeps a template
away from Python internals and from mutating lists and dicts, but it does not bound work: two
nested `range(100000)` loops spin for hours, `'a' * 10**9` allocates a gigabyte, and
`{% include %}` asks for a template loader. `BoundedEnvironment` adds, for each render
(`budget()`):

- steps: at most MAX_STEPS loop iterations, calls, filter calls and operators, and MAX_SECONDS
  of wall time, checked at every step (loops are counted by wrapping each `for` iterable);
- sizes: what an operator (`+ * ** %`, `~`), a filter or a method call would make is checked
  before it is made, from its operands: at most MAX_SIZE characters or items (counted through
  nested lists, so `[s] * n` counts n copies of s) and MAX_BITS-bit integers; so is every value
  printed and the rendered text itself;
- one template: `include`, `import`, `from` and `extends` are refused when the template compiles.

Breaking a bound raises `TemplateLimitError`, a jinja2 TemplateError, which ChatTemplate turns
into one line. Real chat templates stay far inside: a few dozen steps per message.
"""

from __future__ import annotations

import re
import time
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_STEPS = 1_000_000  # loop iterations + calls + operators in one render
MAX_SECONDS = 2.0  # wall time of one render (real templates take milliseconds)
MAX_SIZE = 2**22  # characters or items in one value (4 M: 8x a 128k-token prompt's text)
MAX_BITS = 4096  # bits of an integer an operator makes
MAX_SUMMED = 4096  # items `sum` may add when it concatenates lists or strings (quadratic)


class TemplateLimitError(SecurityError):
    """A chat template went past one of the sandbox's bounds."""


@dataclass
class _Budget:
    steps: int
    deadline: float


_BUDGET: ContextVar[_Budget | None] = ContextVar("edgevlm_template_budget", default=None)


@contextmanager
def budget():
    """Bound the renders inside: MAX_STEPS steps and MAX_SECONDS, for this thread alone."""
    token = _BUDGET.set(_Budget(MAX_STEPS, time.monotonic() + MAX_SECONDS))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _step() -> None:
    b = _BUDGET.get()
    if b is None:  # compile-time constant folding: bounded by the sizes alone
        return
    b.steps -= 1
    if b.steps < 0:
        raise TemplateLimitError(f"more than {MAX_STEPS:,} steps (loop iterations, calls and "
                                 "operations)")
    if time.monotonic() > b.deadline:
        raise TemplateLimitError(f"rendering took more than {MAX_SECONDS:g} s")


def size(value, limit: int = MAX_SIZE) -> int:
    """Characters of the strings plus items of the containers in `value`, through nested
    containers and counting a shared item each time it appears (it expands when printed);
    stops counting once past `limit`."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, dict):
            total += len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset, range)):
            total += len(v)
            if total <= limit and not isinstance(v, range):
                stack.extend(v)
        else:
            total += 1
        if total > limit:
            return total
    return total


def _check(n: int, what: str) -> None:
    if n > MAX_SIZE:
        raise TemplateLimitError(f"{what} would hold over {MAX_SIZE:,} characters or items")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_SEQUENCES = (str, list, tuple)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")


def _format_size(fmt: str, args) -> int:
    """What formatting `fmt` with `args` can make: the text, the arguments and every field
    width or precision (a `*` or nested `{}` width comes from an integer argument)."""
    numbers = [w for m in _PERCENT_SPEC.finditer(fmt) for w in m.groups() if w and w != "*"]
    numbers += [w for spec in _BRACE_SPEC.findall(fmt) for w in re.findall(r"\d+", spec)]
    if any(len(w) > 9 for w in numbers):
        return MAX_SIZE + 1
    flat = args if isinstance(args, (tuple, list)) else [args]
    stars = sum(abs(a) for a in flat if _is_int(a)) if "*" in fmt or "{" in fmt else 0
    return len(fmt) + sum(int(w) for w in numbers) + stars + size(args)


def _check_binop(operator: str, left, right) -> None:
    """Refuse `left operator right` when its result would pass the bounds."""
    if operator == "*":
        seq, n = (left, right) if _is_int(right) else (right, left)
        if isinstance(seq, _SEQUENCES) and _is_int(n):
            _check(size(seq) * max(n, 0), "a repeated string or list")
        elif _is_int(left) and _is_int(right) and \
                left.bit_length() + right.bit_length() > MAX_BITS:
            raise TemplateLimitError(f"a product would have over {MAX_BITS} bits")
    elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _check(size(left) + size(right), "a joined string or list")
    elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
        if left.bit_length() * right > MAX_BITS:
            raise TemplateLimitError(f"a power would have over {MAX_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        _check(_format_size(left, right), "a %-formatted string")


def _check_str_method(method, args, kwargs) -> None:
    """str methods whose result can outgrow their input: bound it before calling."""
    s, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args and _is_int(args[0]):
        _check(max(args[0], len(s)), f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _check(len(s) + s.count("\t") * (tab if _is_int(tab) else 8), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        _check(len(s) + (s.count(args[0]) if args[0] else len(s) + 1) * len(args[1]),
               "str.replace")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else []
        _check(size(items) + len(s) * len(items), "str.join")


def _check_filter(name: str, value, args, kwargs) -> None:
    """The filters whose result can outgrow their input: bound it before calling."""
    first = args[0] if args else None
    if name == "indent":
        width = kwargs.get("width", first if first is not None else 4)
        width = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        text = value if isinstance(value, str) else ""
        _check(len(text) + (text.count("\n") + 1) * width, "the indent filter")
    elif name == "replace" and len(args) >= 2 and isinstance(value, str):
        old, new = str(args[0]), str(args[1])
        _check(len(value) + (value.count(old) if old else len(value) + 1) * len(new),
               "the replace filter")
    elif name == "format" and isinstance(value, str):
        _check(_format_size(value, args or kwargs), "the format filter")
    elif name == "center" and _is_int(kwargs.get("width", first)):
        _check(kwargs.get("width", first), "the center filter")
    elif name == "sum" and not _is_int(kwargs.get("start", args[1] if len(args) > 1 else 0)):
        if size(value, MAX_SUMMED) > MAX_SUMMED:
            raise TemplateLimitError(f"sum over more than {MAX_SUMMED} lists or strings")


def _bounded_filter(name: str, func):
    """`func` counted as a step, its arguments and result held within MAX_SIZE."""
    passes = getattr(func, "jinja_pass_arg", None) is not None  # context/env first

    @wraps(func)
    def bounded(*args, **kwargs):
        _step()
        value, rest = (args[1], args[2:]) if passes else (args[0], args[1:])
        for a in (value, *rest, *kwargs.values()):
            if _is_int(a):
                _check(a, f"an argument of the {name} filter")
            else:
                _check(size(a), f"an argument of the {name} filter")
        _check_filter(name, value, rest, kwargs)
        result = func(*args, **kwargs)
        _check(size(result) if isinstance(result, (*_SEQUENCES, dict)) else 0,
               f"the result of the {name} filter")
        return result

    return bounded


class _BoundedCode(CodeGenerator):
    """Compiles loops to count their iterations and `~` to check its size; refuses every
    statement that would load another template."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("counted"), [node.iter], [], None,
                               None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _one_template(self, node, frame) -> None:
        verb = {"Include": "include", "Import": "import", "FromImport": "import from",
                "Extends": "extend"}[type(node).__name__]
        self.fail(f"a chat template may not {verb} another template (an export holds its "
                  "template whole)", node.lineno)

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _one_template


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with the bounds in the module docstring."""

    code_generator_class = _BoundedCode
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options):
        super().__init__(finalize=self._printed, **options)
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no template needs it
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def add_filter(self, name: str, func) -> None:
        """Register a filter under the same bounds as jinja's own."""
        self.filters[name] = _bounded_filter(name, func)

    @staticmethod
    def counted(iterable: Iterable) -> Iterator:
        for item in iterable:
            _step()
            yield item

    @staticmethod
    def _printed(value):
        if not isinstance(value, str):
            _check(size(value), "a printed value")
        return value

    def concat(self, pieces: Iterable) -> str:
        """Every output, set block, macro body and `~` joins here, checked as it grows."""
        out, total = [], 0
        for piece in pieces:
            if not isinstance(piece, str):
                _check(size(piece), "a joined value")
                piece = str(piece)
            total += len(piece)
            _check(total, "the rendered text")
            out.append(piece)
        return "".join(out)

    def call_binop(self, context, operator: str, left, right):
        _step()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _step()
        if __obj is not __self.counted:  # a loop's iterable: counted item by item instead
            for a in (*args, *kwargs.values()):
                _check(a if _is_int(a) else size(a), "a call's argument")
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self.counted(args[0]), *args[1:])
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox's str.format wrapper
        if isinstance(method, types.BuiltinMethodType) and isinstance(
                getattr(method, "__self__", None), str):
            if method.__name__ in ("format", "format_map"):
                _check(_format_size(method.__self__, [*args, *kwargs.values()]), "str.format")
            else:
                _check_str_method(method, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _check(size(result) if isinstance(result, (*_SEQUENCES, dict)) else 0,
               "a call's result")
        return result
