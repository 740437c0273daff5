"""Symbolic distillation: fit readable formulas to a drift function.

``metarl symbolic ART --backend gplearn|pysr`` evaluates the teacher (any drift artifact or
handcrafted name) on a synthetic grid and runs symbolic regression on inputs
``(log r, r - 1, A)`` with the drift as the target, using the paper's operators
(``+ - * / max min square neg tanh abs``) and limits (size 40, depth 8). No environment
samples are spent.

Both backends return candidates that are turned into metarl expression trees
(:mod:`metarl.algorithms.expression`) and scored here, the same way for both, on the whole
grid: loss is the mean squared error of ``relu(f)`` (the drift the module computes) against
the teacher's drift; complexity is the number of nodes of the tree. The Pareto front (for
each complexity, the lowest loss, kept only if it beats every simpler one) is saved as
``front.csv`` / ``front.json`` with PySR's score (``-d log(loss) / d complexity``). Two
expressions become artifacts, as in the paper: the lowest-loss one (``lowest-loss.pt``) and
the best-scored one (``best-score.pt``: PySR's "best" rule, the highest score among the
candidates whose loss is within 1.5x of the lowest).

**The constraint at r = 1.** A drift must be 0 at ``r = 1``. With ``at_one="reject"`` (the
default, and the paper's choice) a candidate whose drift exceeds ``1e-6`` anywhere on the
grid's ``r = 1`` line stays in the front file, flagged, but is never chosen. With
``at_one="repair"`` every candidate ``f`` is replaced by ``f(log r, r-1, A) - f(0, 0, A)``
before it is scored, which makes it exactly 0 at ``r = 1`` (and changes it elsewhere; its
loss is measured after the repair).
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from metarl import artifact as art_mod
from metarl.algorithms.drift import SYMBOLIC_INPUTS
from metarl.algorithms.expression import (
    DIV_GUARD,
    ExpressionError,
    compile_tree,
    depth,
    from_sympy,
    size,
    substitute,
    to_sympy,
)
from metarl.logging import RunDir, refuse_other_run, write_json_atomic
from metarl.meta.families import SYMBOLIC_GRID, DriftGrid, teacher_module

BACKENDS = ("gplearn", "pysr")
AT_ONE = ("reject", "repair")
AT_ONE_TOL = 1e-6


class BackendUnavailable(ImportError):
    """A symbolic-regression backend that cannot run on this machine."""


@dataclass
class SymbolicConfig:
    teacher: str
    backend: str = "gplearn"
    at_one: str = "reject"
    grid: DriftGrid = field(default_factory=lambda: replace(SYMBOLIC_GRID))
    max_size: int = 40
    max_depth: int = 8
    population: int = 1000
    generations: int = 20
    parsimony: float = 0.001
    seed: int = 0


def check_symbolic_config(cfg: SymbolicConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown symbolic backend {cfg.backend!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if cfg.at_one not in AT_ONE:
        raise ValueError(f"at_one must be one of {', '.join(AT_ONE)}, got {cfg.at_one!r}")
    for name in ("max_size", "max_depth", "population", "generations"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.parsimony) and cfg.parsimony >= 0):
        raise ValueError(f"parsimony must be a finite number >= 0, got {cfg.parsimony}")
    cfg.grid.check()


# --------------------------------------------------------------------------- data


def drift_data(teacher: str, grid: DriftGrid):
    """``(X [N, 3] float64: log r, r - 1, A; y [N] teacher drift; teacher artifact)``."""
    artifact = art_mod.load(teacher)
    if artifact.family != "drift":
        raise ValueError(f"symbolic distillation supports the drift family; {teacher} is "
                         f"{artifact.family!r}")
    drift, params = artifact.build()
    drift = teacher_module(drift, params)
    ratio, adv = grid.tensors(torch.float64)
    with torch.no_grad():
        y = drift.double()(ratio, adv).numpy()
    X = np.stack([np.log(ratio.numpy()), ratio.numpy() - 1.0, adv.numpy()], axis=1)
    return X, y, artifact


# --------------------------------------------------------------------------- backends


def _gplearn_functions():
    from gplearn.functions import make_function

    def _div(x, y):
        sign = np.where(y < 0, -1.0, 1.0)
        return x / np.where(np.abs(y) < DIV_GUARD, sign * DIV_GUARD, y)

    def _square(x):
        return np.clip(x, -1e150, 1e150) ** 2

    return ("add", "sub", "mul", make_function(function=_div, name="div", arity=2),
            "max", "min", "neg", "abs", make_function(function=_square, name="square", arity=1),
            make_function(function=np.tanh, name="tanh", arity=1))


def _gplearn_to_sympy(program, symbols):
    import sympy as sp

    names = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
             "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
             "max": sp.Max, "min": sp.Min, "neg": lambda a: -a, "abs": sp.Abs,
             "square": lambda a: a ** 2, "tanh": sp.tanh}
    nodes = list(program)
    pos = 0

    def parse():
        nonlocal pos
        node = nodes[pos]
        pos += 1
        if isinstance(node, (int, np.integer)):
            return symbols[SYMBOLIC_INPUTS[int(node)]]
        if isinstance(node, (float, np.floating)):
            return sp.Float(float(node))
        args = [parse() for _ in range(node.arity)]
        return names[node.name](*args)

    return parse()


def fit_gplearn(X, y, cfg: SymbolicConfig, log=print, metrics=lambda **kw: None):
    """Candidate sympy expressions from gplearn's genetic programming (every generation)."""
    try:
        from gplearn.genetic import SymbolicRegressor
    except ImportError:
        raise BackendUnavailable(
            "the gplearn backend needs gplearn and sympy: pip install 'metarl[symbolic]'"
        ) from None
    import sympy as sp

    model = SymbolicRegressor(
        population_size=cfg.population, generations=cfg.generations,
        function_set=_gplearn_functions(), metric="mse", parsimony_coefficient=cfg.parsimony,
        init_depth=(2, min(6, cfg.max_depth)), const_range=(-1.0, 1.0), p_crossover=0.7,
        p_subtree_mutation=0.1, p_hoist_mutation=0.05, p_point_mutation=0.1,
        feature_names=list(SYMBOLIC_INPUTS), random_state=cfg.seed, low_memory=False,
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
    symbols = {n: sp.Symbol(n) for n in SYMBOLIC_INPUTS}
    out = []
    for length in sorted(best):
        for prog in sorted(best[length], key=lambda p: p.raw_fitness_)[:2]:
            out.append(_gplearn_to_sympy(prog.program, symbols))
    return out


def _pysr_available() -> str | None:
    """Why PySR cannot run here, or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("pysr") is None:
        return "PySR is not installed (pip install pysr)"
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


def fit_pysr(X, y, cfg: SymbolicConfig, run_path: Path, log=print):
    """Candidate sympy expressions from PySR's hall of fame (needs Julia)."""
    why = _pysr_available()
    if why:
        raise BackendUnavailable(f"the pysr backend cannot run here: {why}. Use "
                                 f"--backend gplearn (pure Python, installed with "
                                 f"pip install 'metarl[symbolic]') instead.")
    import pysr  # noqa: PLC0415 - imported only when chosen; it starts Julia

    model = pysr.PySRRegressor(
        niterations=cfg.generations, population_size=max(cfg.population // 15, 20),
        binary_operators=["+", "-", "*", "/", "max", "min"],
        unary_operators=["square", "neg", "tanh", "abs"], maxsize=cfg.max_size,
        maxdepth=cfg.max_depth, parsimony=cfg.parsimony, random_state=cfg.seed,
        deterministic=True, parallelism="serial", progress=False,
        output_directory=str(run_path / "pysr"))
    model.fit(X, y, variable_names=list(SYMBOLIC_INPUTS))
    return [_piecewise_to_minmax(e) for e in model.equations_["sympy_format"]]


# --------------------------------------------------------------------------- scoring


def _at_one_repair(tree):
    """``f - f(0, 0, A)``, built on the tree so that the subtracted value is the module's own
    (guarded division included), then simplified through sympy."""
    import sympy as sp

    at_one = substitute(tree, {"log_r": 0, "r_minus_1": 0})
    repaired = ["add", tree, ["mul", ["num", -1], at_one]]
    syms = {n: sp.Symbol(n) for n in SYMBOLIC_INPUTS}
    simpler = from_sympy(to_sympy(repaired, syms), SYMBOLIC_INPUTS)
    # sympy's simplification ignores the division guard (A / A -> 1); keep it only when the
    # module it gives is still 0 at r = 1, else keep the tree as built (exact by design).
    line = torch.linspace(-8, 8, 65, dtype=torch.float64)
    zeros = torch.zeros_like(line)
    f = compile_tree(simpler, SYMBOLIC_INPUTS)
    return simpler if float(f(zeros, zeros, line).abs().max()) == 0.0 else repaired


def score_candidates(exprs, X, y, cfg: SymbolicConfig) -> list[dict]:
    """Trees, complexities, losses and flags for the candidates, duplicates removed."""
    import sympy as sp

    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    var = float(((yt - yt.mean()) ** 2).mean())
    a_line = torch.unique(Xt[:, 2])
    zeros = torch.zeros_like(a_line)
    rows, seen = [], set()
    for expr in exprs:
        try:
            tree = from_sympy(expr, SYMBOLIC_INPUTS)
            if cfg.at_one == "repair":
                tree = _at_one_repair(tree)
                expr = to_sympy(tree, {n: sp.Symbol(n) for n in SYMBOLIC_INPUTS})
        except (ExpressionError, ValueError, TypeError):
            continue  # an operator we do not run, or a formula sympy cannot build
        key = str(tree)
        if key in seen:
            continue
        seen.add(key)
        cplx, dep = size(tree), depth(tree)
        if cplx > cfg.max_size or dep > cfg.max_depth:
            continue
        raw = compile_tree(tree, SYMBOLIC_INPUTS, finite=False)  # no nan_to_num: see it
        with torch.no_grad():
            pred = torch.relu(raw(Xt[:, 0], Xt[:, 1], Xt[:, 2]))
            at_one = float(torch.relu(raw(zeros, zeros, a_line)).abs().max())
            h = 1e-3  # the one-sided slopes of the drift at r = 1, reported (not a filter)
            up = torch.relu(raw(torch.full_like(a_line, math.log1p(h)),
                                torch.full_like(a_line, h), a_line))
            down = torch.relu(raw(torch.full_like(a_line, math.log1p(-h)),
                                  torch.full_like(a_line, -h), a_line))
            slope = float(torch.maximum(up.abs(), down.abs()).max() / h)
        if not (torch.isfinite(pred).all() and math.isfinite(at_one)):
            continue  # not finite on the grid: rejected before it can become an artifact
        mse = float(((pred - yt) ** 2).mean())
        rows.append({"tree": tree, "formula": str(sp.N(expr, 6)), "complexity": cplx, "depth": dep,
                     "loss": mse, "r2": 1.0 - mse / var if var > 0 else float("nan"),
                     "at_one": at_one, "slope_at_one": slope,
                     "valid": at_one <= AT_ONE_TOL})
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """Lowest loss per complexity, kept only when it beats every simpler one; with scores."""
    by_c: dict[int, dict] = {}
    for r in rows:
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


def choose(rows: list[dict], at_one: str = "reject") -> tuple[dict, dict]:
    """(lowest-loss, best-score) on the Pareto front of the candidates that satisfy the
    r = 1 constraint (rejected candidates are removed before the front is built, so they
    neither hide a valid candidate nor set a score)."""
    valid = [r for r in rows if r["valid"]]
    if not valid:
        hint = "" if at_one == "repair" else " or use --at-one repair"
        raise ValueError(
            f"no candidate expression is 0 at r = 1 (the drift constraint), so none can "
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
            raise BackendUnavailable(f"the pysr backend cannot run here: {why}. Use "
                                     f"--backend gplearn (pure Python) instead.")
    X, y, teacher = drift_data(cfg.teacher, cfg.grid)
    run_path = Path(out) if out else RunDir.default_path("symbolic", teacher.name)
    refuse_other_run(run_path)
    run = RunDir(run_path, append=False)
    run.write_config({**asdict(cfg), "grid_points": len(y)})
    t0 = time.time()
    if cfg.backend == "gplearn":
        exprs = fit_gplearn(X, y, cfg, log=log, metrics=run.log)
    else:
        exprs = fit_pysr(X, y, cfg, run_path, log=log)
    rows = score_candidates(exprs, X, y, cfg)
    lowest, best = choose(rows, cfg.at_one)
    front = pareto_front([r for r in rows if r["valid"]])  # what the choice was made on
    for r in front:
        r["chosen"] = ",".join(label for label, c in (("lowest-loss", lowest),
                                                      ("best-score", best))
                               if c["tree"] == r["tree"])
    _write_front(run_path, front)
    write_json_atomic(run_path / "candidates.json",
                      sorted(rows, key=lambda r: (r["complexity"], r["loss"])))
    wall = time.time() - t0
    prov = {"method": f"symbolic-{cfg.backend}", "teacher": teacher.name,
            "teacher_provenance": teacher.provenance, "env_steps": 0,
            "meta_train_envs": teacher.provenance.get("meta_train_envs", []),
            "wall_time": round(wall, 1), "seed": cfg.seed, "at_one": cfg.at_one,
            "settings": {k: v for k, v in asdict(cfg).items() if k != "teacher"}}
    paths = {}
    for label, row in (("lowest-loss", lowest), ("best-score", best)):
        a = art_mod.symbolic_artifact(
            row["tree"], {**prov, "selection": label, "loss": row["loss"], "r2": row["r2"],
                          "complexity": row["complexity"]},
            name=f"{teacher.name}-symbolic-{label}")
        paths[label] = str(art_mod.save(a, run_path / f"{label}.pt"))
    results = {"teacher": teacher.name, "backend": cfg.backend, "grid_points": len(y),
               "candidates": len(rows), "front_size": len(front), "wall_time_s": wall,
               "env_steps": 0,
               **{f"{k}_{f}": r[f] for k, r in (("lowest_loss", lowest), ("best_score", best))
                  for f in ("formula", "complexity", "loss", "r2")},
               "artifacts": paths, "run_dir": str(run_path)}
    run.write_results(results)
    run.write_summary(_summary(results, front))
    run.close()
    log(f"lowest loss: {lowest['formula']}  (R^2 {lowest['r2']:.4f})")
    log(f"best score:  {best['formula']}  (R^2 {best['r2']:.4f})")
    log(f"run directory: {run_path}")
    return results


def _write_front(run_path: Path, front: list[dict]) -> None:
    write_json_atomic(run_path / "front.json", front)
    with open(run_path / "front.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["complexity", "depth", "loss", "r2", "score", "at_one", "slope_at_one",
                    "chosen", "formula"])
        for r in front:
            w.writerow([r["complexity"], r["depth"], f"{r['loss']:.6g}", f"{r['r2']:.6f}",
                        f"{r['score']:.4f}", f"{r['at_one']:.3g}", f"{r['slope_at_one']:.3g}",
                        r["chosen"], r["formula"]])


def _summary(results: dict, front: list[dict]) -> str:
    lines = [f"# Symbolic distillation of {results['teacher']} ({results['backend']})", "",
             f"{results['grid_points']} grid points, {results['candidates']} candidates, "
             f"{results['wall_time_s']:.1f} s, 0 environment steps.", "",
             "The Pareto front of the candidates that are 0 at r = 1 (all candidates, "
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
