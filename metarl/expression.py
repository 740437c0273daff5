"""Symbolic expressions as data, as sympy, as torch and as Python source.

Symbolic distillation (:mod:`metarl.meta.symbolic`) produces a formula over a family's
inputs. It is stored in an artifact as a small JSON-able tree, never as text that is
evaluated, so loading an artifact runs no code:

- ``["sym", "A"]``: an input; ``["num", 0.2]``: a constant;
- ``["add", a, b, ...]``, ``["mul", a, b, ...]``, ``["pow", a, 2]`` (integer exponents),
  ``["max", a, b, ...]``, ``["min", a, b, ...]``, ``["tanh", a]``, ``["abs", a]``,
  ``["exp", a]``, ``["relu", a]``.

Subtraction, negation, division and squaring are written with these (``a - b`` is
``add(a, mul(-1, b))``, ``a / b`` is ``mul(a, pow(b, -1))``), which is how sympy writes them.

**Operator sets.** A family chooses the operators its formulas may use, named as the
paper names them (Goldie et al. 2025, "How Should We Meta-Learn Reinforcement Learning
Algorithms?"): :data:`BASE_OPERATORS` ``+ - * / max min square neg tanh abs`` for drifts,
and :data:`OPTIM_OPERATORS`, the same plus ``exp`` and ``relu``, for optimisers. The
arithmetic nodes ``add``, ``mul`` and ``pow`` are always allowed (sympy writes ``+ - * /``,
``square`` and ``neg`` with them); each further node (``max``, ``min``, ``tanh``, ``abs``,
``exp``, ``relu``) only when its operator is in the set. :func:`check_tree`,
:func:`from_sympy` and :func:`compile_tree` take the set (default :data:`BASE_OPERATORS`),
so a drift artifact whose tree holds ``exp`` is refused as damaged.

**relu** is ``max(x, 0)``. In sympy it is the function :func:`sympy_relu` (named
``relu``; a constant argument evaluates to its value), not ``Max(0, x)``, so that it stays
one node of the tree and its size is counted as the search counted it.

**Guarded division.** Wherever a base is raised to a negative power, a base with
``|b| < 1e-3`` is replaced by ``+-1e-3`` (its sign kept; ``+1e-3`` at exactly 0) before the
power, so ``1/b`` is at most ``1e3`` in size and the module is finite on the whole domain.
The gplearn backend fits with the same guard on each whole denominator (its ``div``);
sympy then rewrites the formula (``a / (b c)`` becomes ``a b^-1 c^-1``, ``x / x`` becomes
1), so the guard applies factor by factor in the module, and the two can differ inside the
guard band. Every loss metarl reports is measured on the module, after these rewrites.

**Guarded exp.** ``exp(a)`` is computed as ``exp(min(a, 10))`` (:data:`EXP_MAX`), so it is
at most ``e^10 ~ 22026`` and never overflows; the gplearn backend fits with the same
clamp, and :func:`to_sympy` applies it to a constant argument. sympy rewrites products and
powers of ``exp`` (``exp(a)^2`` becomes ``exp(2a)``, ``1/exp(a)`` becomes ``exp(-a)``), so
the clamp then applies to the rewritten argument; as for division, the loss metarl
reports is the module's.

Large intermediate values are the only other hazard: outputs are passed through
``nan_to_num`` (NaN -> 0, +-inf -> +-1e6) as a last line of defence, and a formula whose
raw value (before ``nan_to_num``) is not finite on the fitting grid is rejected before it
becomes an artifact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DIV_GUARD = 1e-3
#: the largest argument ``exp`` sees: ``exp(a)`` is ``exp(min(a, EXP_MAX))``, at most ~22026
EXP_MAX = 10.0
OPS_NARY = {"add", "mul", "max", "min"}
OPS_UNARY = {"tanh", "abs", "exp", "relu"}

#: the operators of a drift formula (the paper's set, for LPO)
BASE_OPERATORS = ("+", "-", "*", "/", "max", "min", "square", "neg", "tanh", "abs")
#: the operators of an optimiser formula: the base set plus ``exp`` and ``relu``
OPTIM_OPERATORS = BASE_OPERATORS + ("exp", "relu")
#: every operator name a set may hold
KNOWN_OPERATORS = OPTIM_OPERATORS
#: the tree nodes that need an operator of the set (``add``, ``mul``, ``pow`` never do)
_FUNCTION_NODES = ("max", "min", "tanh", "abs", "exp", "relu")


def check_operators(operators: Sequence[str]) -> tuple[str, ...]:
    """``operators`` as a tuple, or :class:`ExpressionError` naming an unknown one."""
    ops = tuple(operators)
    unknown = [o for o in ops if o not in KNOWN_OPERATORS]
    if unknown:
        raise ExpressionError(f"unknown operator(s) {', '.join(map(repr, unknown))}; known: "
                              f"{' '.join(KNOWN_OPERATORS)}")
    return ops


def tree_nodes(operators: Sequence[str] = BASE_OPERATORS) -> set[str]:
    """The tree nodes a formula over ``operators`` may hold (besides ``sym`` and ``num``)."""
    ops = check_operators(operators)
    return {"add", "mul", "pow"} | {n for n in _FUNCTION_NODES if n in ops}


class ExpressionError(ValueError):
    """A tree that is not a valid expression of the allowed operators."""


def check_tree(tree, variables: Sequence[str],
               operators: Sequence[str] = BASE_OPERATORS) -> None:
    """Raise :class:`ExpressionError` unless ``tree`` is a valid expression over
    ``variables`` that uses only the nodes of ``operators`` (see :func:`tree_nodes`)."""
    _check(tree, variables, tree_nodes(operators))


def _check(tree, variables: Sequence[str], nodes: set[str]) -> None:
    if not isinstance(tree, (list, tuple)) or not tree:
        raise ExpressionError(f"expected a non-empty list node, got {tree!r}")
    op, args = tree[0], tree[1:]
    if not isinstance(op, str):
        raise ExpressionError(f"a node starts with its operator's name, got {op!r}")
    if op == "sym":
        if len(args) != 1 or args[0] not in variables:
            raise ExpressionError(f"unknown input {args!r}; inputs are {', '.join(variables)}")
    elif op == "num":
        if len(args) != 1 or not isinstance(args[0], (int, float)) or not math.isfinite(args[0]):
            raise ExpressionError(f"a constant must be one finite number, got {args!r}")
    elif op not in nodes:
        raise ExpressionError(
            f"unknown operator {op!r}; allowed: sym, num, {', '.join(sorted(nodes))}")
    elif op in OPS_NARY:
        if len(args) < 2:
            raise ExpressionError(f"{op} takes at least two arguments, got {len(args)}")
        for a in args:
            _check(a, variables, nodes)
    elif op in OPS_UNARY:
        if len(args) != 1:
            raise ExpressionError(f"{op} takes one argument, got {len(args)}")
        _check(args[0], variables, nodes)
    elif op == "pow":
        if len(args) != 2 or not isinstance(args[1], int) or isinstance(args[1], bool):
            raise ExpressionError(f"pow takes a base and an integer exponent, got {args!r}")
        _check(args[0], variables, nodes)
    else:  # pragma: no cover - every node of tree_nodes is handled above
        raise ExpressionError(f"unknown operator {op!r}")


def substitute(tree, values: dict):
    """``tree`` with the inputs named in ``values`` replaced by constants."""
    if tree[0] == "sym":
        return ["num", values[tree[1]]] if tree[1] in values else list(tree)
    if tree[0] == "num":
        return list(tree)
    if tree[0] == "pow":
        return ["pow", substitute(tree[1], values), tree[2]]
    return [tree[0], *[substitute(a, values) for a in tree[1:]]]


def size(tree) -> int:
    """Number of nodes (inputs, constants and operators)."""
    if tree[0] in ("sym", "num"):
        return 1
    if tree[0] == "pow":
        return 1 + size(tree[1]) + 1
    return 1 + sum(size(a) for a in tree[1:])


def depth(tree) -> int:
    if tree[0] in ("sym", "num"):
        return 1
    if tree[0] == "pow":
        return 1 + depth(tree[1])
    return 1 + max(depth(a) for a in tree[1:])


# --------------------------------------------------------------------------- sympy


_SYMPY_RELU = None


def sympy_relu():
    """The sympy function ``relu(x) = max(x, 0)`` (one class, made on first use so that
    importing this module does not import sympy). A number as argument evaluates to its
    value; ``rewrite(sympy.Max)`` gives ``Max(x, 0)``; ``lambdify`` prints it as
    ``maximum(x, 0)`` for numpy."""
    global _SYMPY_RELU
    if _SYMPY_RELU is None:
        import sympy as sp

        class relu(sp.Function):  # lower case: printed as the operator's name
            nargs = 1

            @classmethod
            def eval(cls, x):
                if x.is_number and x.is_extended_real:
                    return sp.Max(x, 0)
                if x.is_extended_nonnegative:
                    return x
                if x.is_extended_nonpositive:
                    return sp.Integer(0)
                return None

            def _eval_rewrite_as_Max(self, x, **kwargs):  # sympy's rewrite hook
                return sp.Max(x, 0)

            def _numpycode(self, printer):
                return f"numpy.maximum({printer._print(self.args[0])}, 0)"

        _SYMPY_RELU = relu
    return _SYMPY_RELU


def to_sympy(tree, symbols: dict):
    """The sympy expression of ``tree``; ``symbols`` maps input names to sympy symbols.
    The guards apply to constants: a constant base of a negative power inside the
    division guard band becomes ``+-1e-3``, a constant argument of ``exp`` above
    :data:`EXP_MAX` becomes ``EXP_MAX``."""
    import sympy as sp

    op, args = tree[0], tree[1:]
    if op == "sym":
        return symbols[args[0]]
    if op == "num":
        v = args[0]
        return sp.Integer(v) if isinstance(v, int) else sp.Float(v)
    if op == "pow":
        base = to_sympy(args[0], symbols)
        if args[1] < 0 and base.is_number and abs(float(base)) < DIV_GUARD:
            base = sp.Float(-DIV_GUARD if float(base) < 0 else DIV_GUARD)  # the guard
        return sp.Pow(base, sp.Integer(args[1]))
    sub = [to_sympy(a, symbols) for a in args]
    if op == "exp":
        (a,) = sub
        if a.is_number and float(a) > EXP_MAX:
            a = sp.Float(EXP_MAX)  # the guard
        return sp.exp(a)
    if op == "relu":
        return sympy_relu()(*sub)
    return {"add": sp.Add, "mul": sp.Mul, "max": sp.Max, "min": sp.Min,
            "tanh": sp.tanh, "abs": sp.Abs}[op](*sub)


def from_sympy(expr, variables: Sequence[str], operators: Sequence[str] = BASE_OPERATORS):
    """The tree of a sympy expression built from ``operators`` (see :func:`tree_nodes`).
    A constant subexpression sympy keeps unevaluated (``E``, ``sqrt(2)``) becomes its
    value."""
    import sympy as sp

    nodes = tree_nodes(operators)

    def convert(expr):
        if expr.is_Symbol:
            if expr.name not in variables:
                raise ExpressionError(f"unknown input {expr.name!r}; inputs are "
                                      f"{', '.join(variables)}")
            return ["sym", expr.name]
        if expr.is_Integer:
            return ["num", int(expr)]
        if expr.is_Number:
            return constant(expr)
        if isinstance(expr, sp.Pow) and expr.args[1].is_Integer:
            return ["pow", convert(expr.args[0]), int(expr.args[1])]
        for cls, name in ((sp.Add, "add"), (sp.Mul, "mul"), (sp.Max, "max"),
                          (sp.Min, "min"), (sp.tanh, "tanh"), (sp.Abs, "abs"),
                          (sp.exp, "exp"), (sympy_relu(), "relu")):
            if isinstance(expr, cls) and name in nodes:
                return [name, *[convert(a) for a in expr.args]]
        if expr.is_number:
            return constant(expr)
        if isinstance(expr, sp.Pow):
            raise ExpressionError(f"only integer powers are allowed, got {expr}")
        raise ExpressionError(f"operator {type(expr).__name__} is not allowed "
                              f"(allowed: {' '.join(check_operators(operators))})")

    def constant(expr):
        try:
            v = float(expr)
        except TypeError:
            raise ExpressionError(f"the constant {expr} is not a real number") from None
        if not math.isfinite(v):
            raise ExpressionError(f"non-finite constant {expr}")
        return ["num", v]

    return convert(expr)


# --------------------------------------------------------------------------- torch


def _guard(b: torch.Tensor) -> torch.Tensor:
    sign = torch.where(b < 0, -1.0, 1.0).to(b.dtype)
    return torch.where(b.abs() < DIV_GUARD, sign * DIV_GUARD, b)


def compile_tree(tree, variables: Sequence[str], finite: bool = True,
                 operators: Sequence[str] = BASE_OPERATORS) -> Callable[..., torch.Tensor]:
    """A function of the inputs (tensors, in ``variables`` order) evaluating ``tree``
    (checked against ``operators`` first); ``finite`` passes the result through
    ``nan_to_num`` (the artifact's module does)."""
    check_tree(tree, variables, operators)
    index = {v: i for i, v in enumerate(variables)}

    def build(node):
        op, args = node[0], node[1:]
        if op == "sym":
            i = index[args[0]]
            return lambda xs: xs[i]
        if op == "num":
            c = float(args[0])
            return lambda xs: torch.full_like(xs[0], c)
        if op == "pow":
            base, e = build(args[0]), args[1]
            if e < 0:
                return lambda xs: _guard(base(xs)) ** e
            return lambda xs: base(xs) ** e
        fs = [build(a) for a in args]
        if op == "tanh":
            return lambda xs: torch.tanh(fs[0](xs))
        if op == "abs":
            return lambda xs: torch.abs(fs[0](xs))
        if op == "exp":
            return lambda xs: torch.exp(torch.clamp(fs[0](xs), max=EXP_MAX))
        if op == "relu":
            return lambda xs: torch.relu(fs[0](xs))
        combine = {"add": torch.add, "mul": torch.mul, "max": torch.maximum,
                   "min": torch.minimum}[op]

        def nary(xs):
            out = fs[0](xs)
            for f in fs[1:]:
                out = combine(out, f(xs))
            return out
        return nary

    f = build(tree)
    if not finite:
        return lambda *xs: f(xs)
    return lambda *xs: torch.nan_to_num(f(xs), nan=0.0, posinf=1e6, neginf=-1e6)


def guard_source(body: str) -> list[str]:
    """The lines defining ``guard`` (the division guard) for printed source whose ``body``
    (from :func:`to_source`) uses it; none otherwise."""
    if "guard(" not in body:
        return []
    return ["", "def guard(b):",
            f"    # division guard: |b| < {DIV_GUARD} becomes +-{DIV_GUARD}",
            "    sign = torch.where(b < 0, -1.0, 1.0)",
            f"    return torch.where(b.abs() < {DIV_GUARD}, sign * {DIV_GUARD}, b)", ""]


def to_source(tree, variables: Sequence[str]) -> str:
    """A Python/torch expression string for ``tree`` (what :func:`compile_tree` computes)."""
    op, args = tree[0], tree[1:]
    if op == "sym":
        return args[0]
    if op == "num":
        return repr(args[0])
    if op == "pow":
        b = to_source(args[0], variables)
        if args[1] < 0:
            return f"guard({b}) ** {args[1]}"
        return f"({b}) ** {args[1]}"
    sub = [to_source(a, variables) for a in args]
    if op == "add":
        return "(" + " + ".join(sub) + ")"
    if op == "mul":
        return "(" + " * ".join(sub) + ")"
    if op in ("max", "min"):
        fn = "torch.maximum" if op == "max" else "torch.minimum"
        # torch.maximum/minimum take tensors only: constants become tensors
        sub = [f"torch.tensor({s})" if a[0] == "num" else s for a, s in zip(args, sub)]
        out = sub[0]
        for s in sub[1:]:
            out = f"{fn}({out}, {s})"
        return out
    if op == "exp":
        return f"torch.exp(torch.clamp({sub[0]}, max={EXP_MAX!r}))"
    return f"torch.{op}({sub[0]})"
