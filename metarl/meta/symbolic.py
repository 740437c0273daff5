"""Symbolic distillation: fit readable formulas to a learned (or handcrafted) algorithm.

``metarl symbolic ART --backend gplearn|pysr`` evaluates the teacher (any artifact, or an
algorithm name) on synthetic inputs and runs symbolic regression with the teacher's output
as the target, using the operators and limits of Goldie et al. 2025 ("How Should We
Meta-Learn Reinforcement Learning Algorithms?") for the teacher's family: for drifts
``+ - * / max min square neg tanh abs``, at most 40 nodes and depth 8; for optimisers the
same plus ``exp`` and ``relu``, 60 nodes and depth 9. No environment samples are spent.

Everything family-specific comes from the teacher artifact's family,
``family.method("symbolic")`` (for the drift family
:class:`~metarl.families.drift.symbolic.DriftSymbolic`, for the optimiser family
:class:`~metarl.families.optim.symbolic.OptimSymbolic`), adapted to the teacher by its
``for_teacher(artifact)``: the formula's input names, the operators and limits, the data
and its options (``grid``), what a formula computes (for a drift, ``relu(f)``), the
family's constraint and its repair (if it has one), and how a formula becomes an
artifact. A family without symbolic distillation, or a teacher its family does not take,
is refused with the reason before any work.

Both backends return candidates that are turned into metarl expression trees
(:mod:`metarl.expression`) and scored here, the same way for both, on all the data: loss
is the mean squared error of what the formula's module computes against the teacher's
output; complexity is the number of nodes of the tree. The Pareto front (for each
complexity, the lowest loss, kept only if it beats every simpler one) is saved as
``front.csv`` / ``front.json`` with PySR's score (``-d log(loss) / d complexity``). Two
expressions become artifacts, as in the paper: the lowest-loss one (``lowest-loss.pt``) and
the best-scored one (``best-score.pt``: PySR's "best" rule, the highest score among the
candidates whose loss is within 1.5x of the lowest).

**Rejected candidates.** A backend's expression that cannot be turned into a tree of the
family's operators, a duplicate, or a tree over the size or depth limit is dropped (it
is not a candidate). Every other candidate is scored and written to ``candidates.json``
(before the choice, so the file is there even when no candidate can be chosen), with
``valid: false`` and the reason in ``rejected`` when it is rejected: ``"not finite on
the data"`` (its output, or its constraint measure, is NaN or infinite somewhere on the
data; its ``loss`` and ``r2`` are then null) or the family's constraint. Rejected
candidates are never chosen and are left out of the front.

**The family's constraint** (for a drift: 0 at ``r = 1``). With ``at_one="reject"`` (the
default, and the paper's choice) a candidate that breaks it by more than the family's
tolerance is rejected as above. With ``at_one="repair"`` every candidate is first repaired
by the family (for a drift ``f`` is replaced by ``f(log r, r-1, A) - f(0, 0, A)``, exactly 0
at ``r = 1`` and changed elsewhere); its loss is measured after the repair. The option
keeps the drift family's name (``--at-one``). A family without a constraint
(``violation_name`` None, as for optimisers) has every finite candidate valid; for it
``at_one="repair"`` is refused before any work, as there is nothing to repair.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl import artifact as art_mod
from metarl.expression import (
    BASE_OPERATORS,
    DIV_GUARD,
    EXP_MAX,
    ExpressionError,
    compile_tree,
    depth,
    from_sympy,
    size,
    sympy_relu,
    to_sympy,
)
from metarl.families import get_family
from metarl.logging import RunDir, refuse_other_run, write_json_atomic

METHOD = "symbolic"
BACKENDS = ("gplearn", "pysr")
AT_ONE = ("reject", "repair")


class BackendUnavailable(ImportError):
    """A symbolic-regression backend that cannot run on this machine."""


@dataclass
class SymbolicConfig:
    teacher: str
    backend: str = "gplearn"
    #: a candidate that breaks the family's constraint: "reject" it or "repair" it
    at_one: str = "reject"
    #: the family's data options (drift: a ``DriftGrid``, default ``SYMBOLIC_GRID``;
    #: optim: a ``SymbolicData``, 4,096 synthetic points); None: the family's default,
    #: filled in here when the teacher can be read, else at the start
    grid: Any = None
    #: the largest formula (nodes) and deepest; None: the family's (drift 40 and 8, optim
    #: 60 and 9), filled in here when the teacher can be read, else at the start
    max_size: int | None = None
    max_depth: int | None = None
    population: int = 1000
    generations: int = 20
    parsimony: float = 0.001
    seed: int = 0

    def __post_init__(self):
        if self.grid is None:
            self.grid = art_mod.default_data(self.teacher, METHOD)
        if self.max_size is None or self.max_depth is None:
            method = _family_method(self.teacher)
            if method is not None:
                self.max_size, self.max_depth = _limits(self, method)


def _family_method(teacher: str):
    """The symbolic-distillation object of the teacher's family, or None when the teacher
    cannot be read or its family has none (the run then says why)."""
    try:
        return get_family(art_mod.load(teacher).family).method(METHOD)
    except (ValueError, OSError):
        return None


def _limits(cfg: SymbolicConfig, method) -> tuple[int, int]:
    """``(max_size, max_depth)``: the configuration's, or the family's where None."""
    return (method.max_size if cfg.max_size is None else cfg.max_size,
            method.max_depth if cfg.max_depth is None else cfg.max_depth)


def _constrained(method) -> bool:
    """Whether the family has a constraint (a violation measure) on its formulas."""
    return getattr(method, "violation_name", None) is not None


def check_symbolic_config(cfg: SymbolicConfig) -> None:
    """Refuse bad settings (``ValueError``); the data options are checked by the family."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown symbolic backend {cfg.backend!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if cfg.at_one not in AT_ONE:
        raise ValueError(f"at_one must be one of {', '.join(AT_ONE)}, got {cfg.at_one!r}")
    for name in ("max_size", "max_depth", "population", "generations"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.parsimony) and cfg.parsimony >= 0):
        raise ValueError(f"parsimony must be a finite number >= 0, got {cfg.parsimony}")


# --------------------------------------------------------------------------- data


def load_teacher(name: str):
    """``(artifact, method)``: the teacher artifact and its family's symbolic-distillation
    object, adapted to the teacher (``for_teacher``). A family without it, or a teacher it
    does not take, is refused (``ValueError``)."""
    artifact = art_mod.load(name)
    method = get_family(artifact.family).method(METHOD)
    method.check_teacher(artifact, name)
    return artifact, method.for_teacher(artifact)


def check_method_options(cfg: SymbolicConfig, method) -> None:
    """Refuse settings the teacher's family cannot honour (``ValueError``): a repair for a
    family without a constraint."""
    if cfg.at_one == "repair" and not _constrained(method):
        raise ValueError(
            f"at_one='repair' (--at-one repair) repairs a formula that breaks its family's "
            f"constraint, and the {method.family} family has none: every finite formula "
            f"is valid, so there is nothing to repair. Use at_one='reject' (the default).")


# --------------------------------------------------------------------------- backends


def _div(x, y):
    sign = np.where(y < 0, -1.0, 1.0)
    return x / np.where(np.abs(y) < DIV_GUARD, sign * DIV_GUARD, y)


def _square(x):
    return np.clip(x, -1e150, 1e150) ** 2


def _exp(x):
    return np.exp(np.minimum(x, EXP_MAX))  # the module's clamp: finite everywhere


def _relu(x):
    return np.maximum(x, 0.0)


def _gplearn_functions(operators=BASE_OPERATORS):
    """gplearn's function set for the family's ``operators`` (protected: division guarded
    as the module is, ``square`` clipped, ``exp`` clamped at ``EXP_MAX``)."""
    from gplearn.functions import make_function

    functions = {"+": "add", "-": "sub", "*": "mul",
                 "/": make_function(function=_div, name="div", arity=2),
                 "max": "max", "min": "min", "neg": "neg", "abs": "abs",
                 "square": make_function(function=_square, name="square", arity=1),
                 "tanh": make_function(function=np.tanh, name="tanh", arity=1),
                 "exp": make_function(function=_exp, name="exp", arity=1),
                 "relu": make_function(function=_relu, name="relu", arity=1)}
    # gplearn draws functions by their index in the set, so the order is fixed (the drift
    # family's searches are repeatable across versions): the base set as it always was,
    # then exp and relu
    order = ("+", "-", "*", "/", "max", "min", "neg", "abs", "square", "tanh", "exp", "relu")
    return tuple(functions[op] for op in order if op in operators)


def _gplearn_to_sympy(program, symbols, inputs):
    import sympy as sp

    names = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
             "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
             "max": sp.Max, "min": sp.Min, "neg": lambda a: -a, "abs": sp.Abs,
             "square": lambda a: a ** 2, "tanh": sp.tanh, "exp": sp.exp,
             "relu": sympy_relu()}
    nodes = list(program)
    pos = 0

    def parse():
        nonlocal pos
        node = nodes[pos]
        pos += 1
        if isinstance(node, (int, np.integer)):
            return symbols[inputs[int(node)]]
        if isinstance(node, (float, np.floating)):
            return sp.Float(float(node))
        args = [parse() for _ in range(node.arity)]
        return names[node.name](*args)

    return parse()


def _program_to_sympy(program, symbols, inputs):
    """:func:`_gplearn_to_sympy`, or None where sympy cannot hold the program: a part made of
    constants alone that folds to nan or an infinity (``0.0 / 0.0``, which gplearn's
    guarded division evaluates to a number but sympy folds while building; inside ``Max``
    or ``Min`` sympy then refuses the argument)."""
    import sympy as sp

    try:
        expr = _gplearn_to_sympy(program, symbols, inputs)
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    if expr.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        return None
    return expr


def fit_gplearn(X, y, cfg: SymbolicConfig, inputs, log=print, metrics=lambda **kw: None,
                operators=BASE_OPERATORS):
    """Candidate sympy expressions over ``inputs`` (the names of ``X [N, d]``'s columns)
    from gplearn's genetic programming (every generation), with the family's
    ``operators``; ``cfg``'s limits must be set (:func:`symbolic_distill` fills them)."""
    try:
        from gplearn.genetic import SymbolicRegressor
    except ImportError:
        raise BackendUnavailable(
            "the gplearn backend needs gplearn and sympy: pip install 'metarl[symbolic]'"
        ) from None
    import sympy as sp

    model = SymbolicRegressor(
        population_size=cfg.population, generations=cfg.generations,
        function_set=_gplearn_functions(operators), metric="mse",
        parsimony_coefficient=cfg.parsimony,
        init_depth=(2, min(6, cfg.max_depth)), const_range=(-1.0, 1.0), p_crossover=0.7,
        p_subtree_mutation=0.1, p_hoist_mutation=0.05, p_point_mutation=0.1,
        feature_names=list(inputs), random_state=cfg.seed, low_memory=False,
        n_jobs=1, verbose=0)
    t0 = time.time()
    model.fit(X, y)
    log(f"gplearn: {cfg.generations} generations of {cfg.population} in "
        f"{time.time() - t0:.1f} s")
    details = model.run_details_
    for i, gen in enumerate(details["generation"]):
        metrics(generation=int(gen), best_mse=float(details["best_fitness"][i]),
                best_length=int(details["best_length"][i]),
                average_mse=float(details["average_fitness"][i]),
                average_length=float(details["average_length"][i]),
                generation_time=float(details["generation_time"][i]))
    # The lowest-fitness programs per length, over every generation kept.
    best: dict[int, list] = {}
    seen = set()
    for gen in model._programs:
        for prog in gen or ():
            if prog is None or not np.isfinite(prog.raw_fitness_):
                continue
            key = str(prog)
            if key in seen or prog.length_ > cfg.max_size + 10:
                continue
            seen.add(key)
            best.setdefault(prog.length_, []).append(prog)
    symbols = {n: sp.Symbol(n) for n in inputs}
    out, left_out = [], 0
    for length in sorted(best):
        for prog in sorted(best[length], key=lambda p: p.raw_fitness_)[:2]:
            expr = _program_to_sympy(prog.program, symbols, inputs)
            if expr is None:
                left_out += 1
            else:
                out.append(expr)
    if left_out:
        log(f"gplearn: {left_out} program(s) left out: a part of constants alone folds to "
            f"nan or an infinity in sympy")
    return out


def _pysr_available() -> str | None:
    """Why PySR cannot run here, or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("pysr") is None:
        return "PySR is not installed (pip install 'metarl[pysr]')"
    if not (shutil.which("julia") or os.environ.get("PYTHON_JULIAPKG_EXE")
            or os.environ.get("JULIA_BINDIR")):
        return ("PySR needs Julia, and no Julia installation was found (no `julia` on PATH, "
                "PYTHON_JULIAPKG_EXE and JULIA_BINDIR unset); PySR would try to download it, "
                "which needs internet access")
    return None


def _piecewise_to_minmax(expr):
    """PySR writes max/min as Piecewise((b, a < b), (a, True)); turn them back into Max/Min."""
    import sympy as sp

    def fix(e):
        if isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1][1] == sp.true:
            (b, cond), (a, _) = e.args
            if isinstance(cond, (sp.StrictLessThan, sp.LessThan)) and set(cond.args) == {a, b}:
                lhs = cond.args[0]
                return sp.Max(a, b) if lhs == a else sp.Min(a, b)
            if isinstance(cond, (sp.StrictGreaterThan, sp.GreaterThan)) and \
                    set(cond.args) == {a, b}:
                lhs = cond.args[0]
                return sp.Min(a, b) if lhs == a else sp.Max(a, b)
        return e

    return expr.replace(lambda e: isinstance(e, sp.Piecewise), fix)


def _pysr_unavailable(why: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"the pysr backend cannot run here: {why}. Use --backend gplearn (pure Python, "
        f"installed with pip install 'metarl[symbolic]'; it has every operator of both "
        f"families, exp and relu included) instead.")


def fit_pysr(X, y, cfg: SymbolicConfig, inputs, run_path: Path, log=print,
             operators=BASE_OPERATORS):
    """Candidate sympy expressions over ``inputs`` (the names of ``X [N, d]``'s columns)
    from PySR's hall of fame (needs Julia), with the family's ``operators``: PySR's own
    ``exp`` (unclamped: the module's clamp at ``EXP_MAX`` applies when candidates are
    scored) and ``relu`` (PySR's operator ``max(x, 0)``, read back as
    :func:`~metarl.expression.sympy_relu`)."""
    why = _pysr_available()
    if why:
        raise _pysr_unavailable(why)
    import pysr  # noqa: PLC0415 - imported only when chosen; it starts Julia

    model = pysr.PySRRegressor(
        niterations=cfg.generations, population_size=max(cfg.population // 15, 20),
        binary_operators=[op for op in operators if op in ("+", "-", "*", "/", "max", "min")],
        unary_operators=[op for op in operators
                         if op in ("square", "neg", "tanh", "abs", "exp", "relu")],
        extra_sympy_mappings={"relu": sympy_relu()} if "relu" in operators else None,
        maxsize=cfg.max_size, maxdepth=cfg.max_depth, parsimony=cfg.parsimony,
        random_state=cfg.seed, deterministic=True, parallelism="serial", progress=False,
        output_directory=str(run_path / "pysr"))
    model.fit(X, y, variable_names=list(inputs))
    return [_piecewise_to_minmax(e) for e in model.equations_["sympy_format"]]


# --------------------------------------------------------------------------- scoring


def score_candidates(exprs, X, y, cfg: SymbolicConfig, method=None) -> list[dict]:
    """Trees, complexities, losses and constraint flags of the candidates (sympy
    expressions over ``method.inputs``) on the data ``X [N, d]``, ``y [N]``, duplicates
    removed. ``method``: the family's symbolic-distillation object for the teacher
    (default: the teacher's family's). Each row: ``tree, formula, complexity, depth, loss,
    r2``, the family's violation (``method.violation_name``, e.g. ``at_one``; none for a
    family without a constraint) and report columns, ``valid`` and ``rejected`` (None, or
    why the candidate is not valid: ``"not finite on the data"``, with ``loss`` and
    ``r2`` None, or the family's constraint)."""
    import sympy as sp

    if method is None:
        method = load_teacher(cfg.teacher)[1]
    inputs, operators = method.inputs, method.operators
    max_size, max_depth = _limits(cfg, method)
    constrained = _constrained(method)
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    var = float(((yt - yt.mean()) ** 2).mean())
    rows, seen = [], set()
    for expr in exprs:
        try:
            tree = from_sympy(expr, inputs, operators)
            if cfg.at_one == "repair" and constrained:
                tree = method.repair(tree)
                expr = to_sympy(tree, {n: sp.Symbol(n) for n in inputs})
        except (ExpressionError, ValueError, TypeError):
            continue  # an operator we do not run, or a formula sympy cannot build
        key = str(tree)
        if key in seen:
            continue
        seen.add(key)
        cplx, dep = size(tree), depth(tree)
        if cplx > max_size or dep > max_depth:
            continue
        raw = compile_tree(tree, inputs, finite=False, operators=operators)  # see non-finite
        with torch.no_grad():
            pred = method.output(raw, Xt)
            violation, report = method.constraint(raw, Xt)
        row = {"tree": tree, "formula": str(sp.N(expr, 6)), "complexity": cplx, "depth": dep}
        if not (torch.isfinite(pred).all() and math.isfinite(violation)):
            # not finite on the data: kept, flagged, never an artifact
            rows.append({**row, "loss": None, "r2": None,
                         **({method.violation_name: None} if constrained else {}),
                         **dict.fromkeys(report), "valid": False,
                         "rejected": "not finite on the data"})
            continue
        mse = float(((pred - yt) ** 2).mean())
        valid = violation <= method.tolerance
        rows.append({**row, "loss": mse, "r2": 1.0 - mse / var if var > 0 else float("nan"),
                     **({method.violation_name: violation} if constrained else {}), **report,
                     "valid": valid,
                     "rejected": None if valid else (
                         f"{method.violation_name} {violation:.3g} > tolerance "
                         f"{method.tolerance:g}{method.constraint_note}")})
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """Lowest loss per complexity, kept only when it beats every simpler one; with scores.
    Rows without a loss (not finite on the data) are left out."""
    by_c: dict[int, dict] = {}
    for r in rows:
        if r["loss"] is None:
            continue
        if r["complexity"] not in by_c or r["loss"] < by_c[r["complexity"]]["loss"]:
            by_c[r["complexity"]] = r
    front, best_loss = [], math.inf
    for c in sorted(by_c):
        if by_c[c]["loss"] < best_loss:
            front.append(dict(by_c[c]))
            best_loss = by_c[c]["loss"]
    prev = None
    for r in front:
        if prev is None:
            r["score"] = 0.0
        else:
            lo = max(r["loss"], 1e-300)
            r["score"] = -(math.log(lo) - math.log(max(prev["loss"], 1e-300))) / (
                r["complexity"] - prev["complexity"])
        prev = r
    return front


def choose(rows: list[dict], at_one: str = "reject",
           constraint: str | None = "satisfies the family's constraint"
           ) -> tuple[dict, dict]:
    """(lowest-loss, best-score) on the Pareto front of the valid candidates (rejected
    candidates are removed before the front is built, so they neither hide a valid
    candidate nor set a score). ``constraint`` says what a valid candidate does, for the
    error when there is none; None for a family without a constraint (valid: finite)."""
    valid = [r for r in rows if r["valid"]]
    if not valid:
        if constraint is None:
            raise ValueError(
                f"no candidate expression is finite on the data within the size and depth "
                f"limits ({len(rows)} scored), so none can be chosen; run longer "
                f"(--generations, --population)")
        hint = "" if at_one == "repair" else " or use --at-one repair"
        raise ValueError(
            f"no candidate expression {constraint}, so none can "
            f"be chosen; run longer (--generations, --population){hint}")
    valid_front = pareto_front(valid)
    lowest = min(valid_front, key=lambda r: r["loss"])
    eligible = [r for r in valid_front if r["loss"] <= 1.5 * lowest["loss"]]
    best = max(eligible, key=lambda r: (r["score"], -r["complexity"]))
    return lowest, best


# --------------------------------------------------------------------------- the command


def symbolic_distill(cfg: SymbolicConfig, out: str | Path | None = None,
                     log=print) -> dict:
    """Run symbolic distillation; write the front and two artifacts; return results."""
    check_symbolic_config(cfg)
    if cfg.backend == "pysr":
        why = _pysr_available()
        if why:
            raise _pysr_unavailable(why)
    teacher, method = load_teacher(cfg.teacher)
    check_method_options(cfg, method)
    if cfg.grid is None:  # the family's default data
        cfg = replace(cfg, grid=method.default_data())
    max_size, max_depth = _limits(cfg, method)
    cfg = replace(cfg, max_size=max_size, max_depth=max_depth)
    method.check_data(cfg.grid)
    X, y = method.data(teacher, cfg.grid, seed=cfg.seed)
    run_path = Path(out) if out else RunDir.default_path("symbolic", teacher.name)
    refuse_other_run(run_path)
    run = RunDir(run_path, append=False)
    run.write_config({**asdict(cfg), "grid_points": len(y)})
    t0 = time.time()
    if cfg.backend == "gplearn":
        exprs = fit_gplearn(X, y, cfg, method.inputs, log=log, metrics=run.log,
                            operators=method.operators)
    else:
        exprs = fit_pysr(X, y, cfg, method.inputs, run_path, log=log,
                         operators=method.operators)
    rows = score_candidates(exprs, X, y, cfg, method)
    # every candidate, rejected ones included, before the choice (which may find none)
    write_json_atomic(run_path / "candidates.json",
                      sorted(rows, key=lambda r: (r["complexity"], r["loss"] is None,
                                                  r["loss"] or 0.0)))
    constrained = _constrained(method)
    lowest, best = choose(rows, cfg.at_one, method.constraint_text + method.constraint_note
                          if constrained else None)
    front = pareto_front([r for r in rows if r["valid"]])  # what the choice was made on
    for r in front:
        r["chosen"] = ",".join(label for label, c in (("lowest-loss", lowest),
                                                      ("best-score", best))
                               if c["tree"] == r["tree"])
    _write_front(run_path, front, (method.violation_name, *method.report_names)
                 if constrained else tuple(method.report_names))
    wall = time.time() - t0
    prov = {"method": f"symbolic-{cfg.backend}", "teacher": teacher.name,
            "teacher_provenance": teacher.provenance, "env_steps": 0,
            "meta_train_envs": teacher.provenance.get("meta_train_envs", []),
            "wall_time": round(wall, 1), "seed": cfg.seed, "at_one": cfg.at_one,
            "settings": {k: v for k, v in asdict(cfg).items() if k != "teacher"}}
    paths = {}
    for label, row in (("lowest-loss", lowest), ("best-score", best)):
        a = method.artifact(
            row["tree"], {**prov, "selection": label, "loss": row["loss"], "r2": row["r2"],
                          "complexity": row["complexity"]},
            name=f"{teacher.name}-symbolic-{label}")
        paths[label] = str(art_mod.save(a, run_path / f"{label}.pt"))
    results = {"teacher": teacher.name, "backend": cfg.backend, "grid_points": len(y),
               "candidates": len(rows), "valid_candidates": sum(r["valid"] for r in rows),
               "front_size": len(front), "wall_time_s": wall,
               "env_steps": 0,
               **{f"{k}_{f}": r[f] for k, r in (("lowest_loss", lowest), ("best_score", best))
                  for f in ("formula", "complexity", "loss", "r2")},
               "artifacts": paths, "run_dir": str(run_path)}
    run.write_results(results)
    run.write_summary(_summary(results, front, method.constraint_plural if constrained
                               else None))
    run.close()
    log(f"lowest loss: {lowest['formula']}  (R^2 {lowest['r2']:.4f})")
    log(f"best score:  {best['formula']}  (R^2 {best['r2']:.4f})")
    log(f"run directory: {run_path}")
    return results


def _write_front(run_path: Path, front: list[dict], checks: tuple[str, ...]) -> None:
    """``front.json`` and ``front.csv``; ``checks``: the family's constraint columns."""
    write_json_atomic(run_path / "front.json", front)
    with open(run_path / "front.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["complexity", "depth", "loss", "r2", "score", *checks, "chosen", "formula"])
        for r in front:
            w.writerow([r["complexity"], r["depth"], f"{r['loss']:.6g}", f"{r['r2']:.6f}",
                        f"{r['score']:.4f}", *(f"{r[c]:.3g}" for c in checks),
                        r["chosen"], r["formula"]])


def _summary(results: dict, front: list[dict], valid_text: str | None) -> str:
    """``valid_text``: what valid candidates do (the family's constraint), or None."""
    which = f"that {valid_text}" if valid_text else "that are finite on the data"
    lines = [f"# Symbolic distillation of {results['teacher']} ({results['backend']})", "",
             f"{results['grid_points']} data points, {results['candidates']} candidates "
             f"({results['valid_candidates']} valid), "
             f"{results['wall_time_s']:.1f} s, 0 environment steps.", "",
             f"The Pareto front of the candidates {which} (all candidates, "
             "rejected ones included, are in candidates.json):", "",
             "| complexity | loss | R^2 | score | chosen | formula |",
             "|---:|---:|---:|---:|---|---|"]
    for r in front:
        lines.append(f"| {r['complexity']} | {r['loss']:.4g} | {r['r2']:.4f} | "
                     f"{r['score']:.3f} | {r['chosen']} | `{r['formula']}` |")
    lines += ["", f"- lowest loss: `{results['lowest_loss_formula']}`",
              f"- best score: `{results['best_score_formula']}`"]
    return "\n".join(lines) + "\n"


__all__ = ["SymbolicConfig", "symbolic_distill", "BackendUnavailable", "to_sympy"]
