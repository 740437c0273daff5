"""Symbolic expressions as data, as sympy, as torch and as Python source.

Symbolic distillation (:mod:`metarl.meta.symbolic`) produces a formula over a family's
inputs. It is stored in an artifact as a small JSON-able tree, never as text that is
evaluated, so loading an artifact runs no code:

- ``["sym", "A"]``: an input; ``["num", 0.2]``: a constant;
- ``["add", a, b, ...]``, ``["mul", a, b, ...]``, ``["pow", a, 2]`` (integer exponents),
  ``["max", a, b, ...]``, ``["min", a, b, ...]``, ``["tanh", a]``, ``["abs", a]``.

Subtraction, negation, division and squaring are written with these (``a - b`` is
``add(a, mul(-1, b))``, ``a / b`` is ``mul(a, pow(b, -1))``), which is how sympy writes them.

**Guarded division.** Wherever a base is raised to a negative power, a base with
``|b| < 1e-3`` is replaced by ``+-1e-3`` (its sign kept; ``+1e-3`` at exactly 0) before the
power, so ``1/b`` is at most ``1e3`` in size and the module is finite on the whole domain.
The gplearn backend fits with the same guard on each whole denominator (its ``div``);
sympy then rewrites the formula (``a / (b c)`` becomes ``a b^-1 c^-1``, ``x / x`` becomes
1), so the guard applies factor by factor in the module, and the two can differ inside the
guard band. Every loss metarl reports is measured on the module, after these rewrites.
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
OPS_NARY = {"add", "mul", "max", "min"}
OPS_UNARY = {"tanh", "abs"}


class ExpressionError(ValueError):
    """A tree that is not a valid expression of the allowed operators."""


def check_tree(tree, variables: Sequence[str]) -> None:
    """Raise :class:`ExpressionError` unless ``tree`` is a valid expression over ``variables``."""
    if not isinstance(tree, (list, tuple)) or not tree:
        raise ExpressionError(f"expected a non-empty list node, got {tree!r}")
    op, args = tree[0], tree[1:]
    if op == "sym":
        if len(args) != 1 or args[0] not in variables:
            raise ExpressionError(f"unknown input {args!r}; inputs are {', '.join(variables)}")
    elif op == "num":
        if len(args) != 1 or not isinstance(args[0], (int, float)) or not math.isfinite(args[0]):
            raise ExpressionError(f"a constant must be one finite number, got {args!r}")
    elif op in OPS_NARY:
        if len(args) < 2:
            raise ExpressionError(f"{op} takes at least two arguments, got {len(args)}")
        for a in args:
            check_tree(a, variables)
    elif op in OPS_UNARY:
        if len(args) != 1:
            raise ExpressionError(f"{op} takes one argument, got {len(args)}")
        check_tree(args[0], variables)
    elif op == "pow":
        if len(args) != 2 or not isinstance(args[1], int) or isinstance(args[1], bool):
            raise ExpressionError(f"pow takes a base and an integer exponent, got {args!r}")
        check_tree(args[0], variables)
    else:
        raise ExpressionError(
            f"unknown operator {op!r}; allowed: sym, num, pow, "
            f"{', '.join(sorted(OPS_NARY | OPS_UNARY))}")


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


def to_sympy(tree, symbols: dict):
    """The sympy expression of ``tree``; ``symbols`` maps input names to sympy symbols."""
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
    return {"add": sp.Add, "mul": sp.Mul, "max": sp.Max, "min": sp.Min,
            "tanh": sp.tanh, "abs": sp.Abs}[op](*sub)


def from_sympy(expr, variables: Sequence[str]):
    """The tree of a sympy expression built from the allowed operators."""
    import sympy as sp

    if expr.is_Symbol:
        if expr.name not in variables:
            raise ExpressionError(f"unknown input {expr.name!r}; inputs are "
                                  f"{', '.join(variables)}")
        return ["sym", expr.name]
    if expr.is_Integer:
        return ["num", int(expr)]
    if expr.is_Number:
        v = float(expr)
        if not math.isfinite(v):
            raise ExpressionError(f"non-finite constant {expr}")
        return ["num", v]
    if isinstance(expr, sp.Pow):
        base, exp = expr.args
        if not exp.is_Integer:
            raise ExpressionError(f"only integer powers are allowed, got {expr}")
        return ["pow", from_sympy(base, variables), int(exp)]
    for cls, name in ((sp.Add, "add"), (sp.Mul, "mul"), (sp.Max, "max"), (sp.Min, "min"),
                      (sp.tanh, "tanh"), (sp.Abs, "abs")):
        if isinstance(expr, cls):
            return [name, *[from_sympy(a, variables) for a in expr.args]]
    raise ExpressionError(f"operator {type(expr).__name__} is not allowed "
                          f"(allowed: + - * / max min square neg tanh abs)")


# --------------------------------------------------------------------------- torch


def _guard(b: torch.Tensor) -> torch.Tensor:
    sign = torch.where(b < 0, -1.0, 1.0).to(b.dtype)
    return torch.where(b.abs() < DIV_GUARD, sign * DIV_GUARD, b)


def compile_tree(tree, variables: Sequence[str],
                 finite: bool = True) -> Callable[..., torch.Tensor]:
    """A function of the inputs (tensors, in ``variables`` order) evaluating ``tree``;
    ``finite`` passes the result through ``nan_to_num`` (the artifact's module does)."""
    check_tree(tree, variables)
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
    return f"torch.{op}({sub[0]})"
