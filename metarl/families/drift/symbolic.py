"""What symbolic distillation (:mod:`metarl.meta.symbolic`) needs from the drift family.

A formula ``f`` over ``(log r, r - 1, A)`` (:data:`~metarl.families.drift.members.SYMBOLIC_INPUTS`)
becomes the drift ``relu(f)`` (:class:`~metarl.families.drift.members.SymbolicDrift`). It
is fitted to the teacher's drift *value* on a synthetic grid over ``(r, A)``
(:data:`~metarl.families.drift.data.SYMBOLIC_GRID`: the ranges of the distillation grid of
Lu et al. 2022, 64 x 64 points), as in Goldie et al. 2025, "How Should We Meta-Learn
Reinforcement Learning Algorithms?", with that paper's operators for LPO (``+ - * / max
min square neg tanh abs``) and limits (40 nodes, depth 8). The family's constraint: a
drift is 0 at ``r = 1``; a candidate that is not is rejected or repaired
(``f - f(0, 0, A)``).

:class:`DriftSymbolic` is the object the drift family registers under
``FAMILY.methods["symbolic"]``. Another family supports symbolic distillation by
registering an object with the same attributes and methods; the method never names a
family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from metarl.expression import BASE_OPERATORS
from metarl.families.drift.data import SYMBOLIC_GRID, DriftGrid, check_grid, teacher_module
from metarl.families.drift.members import SYMBOLIC_INPUTS, SymbolicDrift


@dataclass(frozen=True)
class DriftSymbolic:
    """Symbolic distillation of any drift (network, handcrafted, formula) into ``relu(f)``.

    Attributes (read by :mod:`metarl.meta.symbolic`):

    - ``family``: ``"drift"``;
    - ``inputs``: the names of the formula's inputs, in the order of the data's columns:
      ``("log_r", "r_minus_1", "A")``;
    - ``operators``, ``max_size``, ``max_depth``: the formulas' operators
      (:data:`~metarl.expression.BASE_OPERATORS`, ``+ - * / max min square neg tanh abs``)
      and limits, 40 nodes and depth 8 (the paper's for LPO);
    - ``violation_name``: the report column that measures the constraint, ``"at_one"`` (the
      largest drift at ``r = 1`` over the grid's advantages); a candidate is valid when it
      is at most ``tolerance`` (1e-6);
    - ``report_names``: further report columns, ``("slope_at_one",)``;
    - ``constraint_text`` / ``constraint_plural`` / ``constraint_note``: the constraint in
      words for the messages, ``"is 0 at r = 1"`` / ``"are 0 at r = 1"`` /
      ``" (the drift constraint)"``;
    - ``slope_step``: the step ``h`` beside ``r = 1`` at which the slopes are measured.
    """

    family: str = "drift"
    inputs: tuple[str, ...] = SYMBOLIC_INPUTS
    operators: tuple[str, ...] = BASE_OPERATORS
    max_size: int = 40
    max_depth: int = 8
    violation_name: str = "at_one"
    report_names: tuple[str, ...] = ("slope_at_one",)
    tolerance: float = 1e-6
    constraint_text: str = "is 0 at r = 1"
    constraint_plural: str = "are 0 at r = 1"
    constraint_note: str = " (the drift constraint)"
    slope_step: float = 1e-3

    # -- the data --------------------------------------------------------------------------

    def default_data(self) -> DriftGrid:
        """The data options when none are given: :data:`SYMBOLIC_GRID` (a copy), 64 x 64
        points over ``log r`` in ``[-2, 2)`` and ``A`` in ``[-8, 8)``."""
        return replace(SYMBOLIC_GRID)

    def check_data(self, grid: DriftGrid) -> None:
        """Refuse bad data options (``ValueError``), as :meth:`DriftGrid.check`."""
        check_grid(grid, "symbolic")

    def check_teacher(self, artifact, name: str) -> None:
        """Every drift artifact can be a teacher (network, handcrafted, formula, code)."""

    def for_teacher(self, artifact) -> DriftSymbolic:
        """This object: every drift teacher has the same inputs."""
        return self

    def data(self, artifact, grid: DriftGrid, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(X [N, 3], y [N])``, float64 numpy: ``X``'s columns are ``inputs`` (``log r``,
        ``r - 1``, ``A``) on the grid's points, ``y`` the teacher's drift there (PPO's
        default ``clip_eps`` 0.2). ``seed`` (the run's) is not used: the grid is fixed."""
        drift, params = artifact.build()
        drift = teacher_module(drift, params)
        ratio, adv = grid.tensors(torch.float64)
        with torch.no_grad():
            y = drift.double()(ratio, adv).numpy()
        X = np.stack([np.log(ratio.numpy()), ratio.numpy() - 1.0, adv.numpy()], axis=1)
        return X, y

    # -- candidates ------------------------------------------------------------------------

    def output(self, fn, X: torch.Tensor) -> torch.Tensor:
        """What the artifact computes from a compiled formula ``fn(log_r, r_minus_1, A)`` on
        the data ``X [N, 3]``: the drift ``relu(fn) [N]``."""
        return torch.relu(fn(X[:, 0], X[:, 1], X[:, 2]))

    def constraint(self, fn, X: torch.Tensor) -> tuple[float, dict[str, float]]:
        """``(violation, report)`` of a compiled formula ``fn`` (before the ``relu``) on the
        data ``X [N, 3]``. ``violation`` (``at_one``) is the largest ``|relu(fn(0, 0, A))|``
        over the advantages of ``X``; the report's ``slope_at_one`` is the largest one-sided
        slope ``|drift(1 +- h, A)| / h``, ``h = slope_step`` (reported, not a filter)."""
        a_line = torch.unique(X[:, 2])
        zeros = torch.zeros_like(a_line)
        at_one = float(torch.relu(fn(zeros, zeros, a_line)).abs().max())
        h = self.slope_step
        up = torch.relu(fn(torch.full_like(a_line, math.log1p(h)),
                           torch.full_like(a_line, h), a_line))
        down = torch.relu(fn(torch.full_like(a_line, math.log1p(-h)),
                             torch.full_like(a_line, -h), a_line))
        slope = float(torch.maximum(up.abs(), down.abs()).max() / h)
        return at_one, {"slope_at_one": slope}

    def repair(self, tree):
        """A tree that meets the constraint: ``f - f(0, 0, A)``, built on the tree so that the
        subtracted value is the module's own (guarded division included), then simplified
        through sympy when the simplified module is still exactly 0 at ``r = 1``."""
        import sympy as sp

        from metarl.expression import compile_tree, from_sympy, substitute, to_sympy

        at_one = substitute(tree, {"log_r": 0, "r_minus_1": 0})
        repaired = ["add", tree, ["mul", ["num", -1], at_one]]
        syms = {n: sp.Symbol(n) for n in self.inputs}
        simpler = from_sympy(to_sympy(repaired, syms), self.inputs)
        # sympy's simplification ignores the division guard (A / A -> 1); keep it only when
        # the module it gives is still 0 at r = 1, else keep the tree as built (exact).
        line = torch.linspace(-8, 8, 65, dtype=torch.float64)
        zeros = torch.zeros_like(line)
        f = compile_tree(simpler, self.inputs)
        return simpler if float(f(zeros, zeros, line).abs().max()) == 0.0 else repaired

    # -- the result ------------------------------------------------------------------------

    def member(self, tree) -> SymbolicDrift:
        """The family member a formula becomes: ``SymbolicDrift(tree)``, ``relu(f)``."""
        return SymbolicDrift(tree)

    def artifact(self, tree, provenance: dict, name: str):
        """The ``symbolic`` artifact of a formula (the tree is checked before it is kept)."""
        from metarl.artifact import symbolic_artifact

        return symbolic_artifact(tree, provenance, name=name)


__all__ = ["DriftSymbolic"]
