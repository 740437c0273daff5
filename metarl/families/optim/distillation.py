"""What black-box distillation (:mod:`metarl.meta.distill`) needs from the optimiser family.

A student optimiser network imitates a teacher on synthetic inputs
(:mod:`metarl.families.optim.synthetic`), with no environment samples, as in Goldie et
al. 2025 ("How Should We Meta-Learn Reinforcement Learning Algorithms?"):

- **OPEN-FF and No-Features** (feed-forward): every batch (2048 by default) is drawn
  afresh from the synthetic distributions; the student matches the teacher's update ``u``
  (before mean-centring, noise term included, on the same noise) in mean squared error.
  Updates are compared in units of 1e-3, the optimisers' step scale, so an error of 1 is
  an error of one typical step.
- **recurrent OPEN**: each batch is an unroll of 100 synthetic optimiser steps of 2048
  parameters (:func:`~metarl.families.optim.synthetic.unroll`); the student takes the same
  steps from the same start and matches the teacher's *final parameter values* (MSE, in
  the same units). The student is recurrent by default; ``--student open-ff`` distils
  OPEN into a feed-forward network on the same unroll.

The student is the member's network at any width (the teacher's, 16, by default), drawn
with PyTorch's default initialisation from the run's seed. The baseline that imitates
nothing is the zero update (an optimiser that never moves a parameter): its error is
reported beside the student's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarl.families.optim.learned import LearnedMember
from metarl.families.optim.synthetic import (
    UNIT,
    SyntheticOptions,
    check_options,
    features,
    sample,
    unroll,
    unroll_draws,
    update,
)

#: the students each teacher member may be distilled into (the first is the default)
STUDENTS = {"open-ff": ("open-ff",), "no-features": ("no-features",),
            "open": ("open", "open-ff")}


@dataclass(frozen=True)
class OptimDistillation:
    """Black-box distillation of a learned optimiser (OPEN, OPEN-FF, No-Features).

    Attributes read by :mod:`metarl.meta.distill`: ``family``; ``data_kind`` (``"stream"``:
    every batch is drawn afresh by :meth:`batch`); ``default_batch_size`` (2048);
    ``loss_name`` / ``loss_label`` (``update_mse`` / ``update MSE (1e-3 units)``; for
    OPEN's unroll the loss is on the final parameters, see :meth:`loss_name_for`);
    ``reference_name`` / ``reference_short`` / ``reference_label`` (the zero update).
    """

    family: str = "optim"
    data_kind: str = "stream"
    default_batch_size: int = 2048
    loss_name: str = "update_mse"
    loss_label: str = "update MSE (1e-3 units)"
    reference_name: str = "zero_update"
    reference_short: str = "the zero update"
    reference_label: str = "zero update (no step)"

    # -- the synthetic data --------------------------------------------------------------

    def default_data(self) -> SyntheticOptions:
        """The data options when none are given: 50 fresh batches per epoch, 4 held-out
        batches, unrolls of 100 steps."""
        return SyntheticOptions()

    def check_data(self, options: SyntheticOptions) -> None:
        """Refuse bad data options (``ValueError``)."""
        check_options(options, "distillation")

    def points_per_batch(self, teacher, batch_size: int) -> int:
        """Synthetic points one batch holds (parameters; an unroll's count once)."""
        return batch_size

    def batch(self, teacher: LearnedMember, options: SyntheticOptions, batch_size: int,
              generator: torch.Generator) -> tuple:
        """One batch drawn with ``generator``, with the teacher's target last.

        Feed-forward teachers: ``(x [B, F], eps [B], target [B])`` with ``target`` the
        teacher's update in 1e-3 units. OPEN: ``(p0, layer, g, batch, dormancy, eps,
        target)`` — the unroll's draws (per-step ones ``[T, B]``) and the teacher's final
        parameters ``[B]``."""
        with torch.no_grad():
            if teacher.recurrent:
                d = unroll_draws(batch_size, options.unroll, generator)
                final = unroll(teacher, d)
                return (d["p0"], d["layer"], d["g"], d["batch"], d["dormancy"], d["eps"],
                        final)
            raw = sample(batch_size, generator)
            x = features(teacher, raw)
            return x, raw["eps"], update(teacher, x, raw["eps"]) / UNIT

    # -- the teacher -----------------------------------------------------------------------

    def check_teacher(self, artifact, name: str) -> None:
        """Refuse (``ValueError``) a teacher without a network to imitate: Adam, SGD,
        formulas and code."""
        if artifact.kind == "network":
            return
        what = {"handcrafted": "a handcrafted member", "symbolic": "a formula"}.get(
            artifact.kind, f"a {artifact.kind} artifact")
        raise ValueError(
            f"{name} is {what}, not a network: there are no weights to imitate. Black-box "
            f"distillation takes a learned optimiser network ({', '.join(STUDENTS)}), e.g. "
            f"best.pt of `metarl meta-train open-ff`")

    def teacher(self, member: LearnedMember, params: torch.Tensor) -> LearnedMember:
        """The teacher module: ``member`` with ``params [n]`` loaded, eval mode, frozen."""
        member.load_flat(params)
        return member.eval().requires_grad_(False)

    def teacher_width(self, teacher: LearnedMember) -> int:
        """The teacher's hidden width, the student's default (16 for the paper's)."""
        return int(teacher.hidden)

    # -- the student -----------------------------------------------------------------------

    def students(self, teacher: LearnedMember) -> tuple[str, ...]:
        """The members a student of ``teacher`` may be (the first is the default)."""
        return STUDENTS[teacher.name]

    def student(self, name: str, hidden: int, init_scale: float,
                generator: torch.Generator) -> LearnedMember:
        """A trainable student: member ``name`` of width ``hidden`` with PyTorch's default
        initialisation drawn from ``generator``'s seed, Linear weights then multiplied by
        ``init_scale``."""
        from metarl.families.optim import FAMILY

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        student = FAMILY.make(name, hidden=hidden).reset_parameters(seed)
        if init_scale != 1.0:
            with torch.no_grad():
                for n, p in student.named_parameters():
                    if n.startswith(("l1.", "l2.", "l3.")) and n.endswith("weight"):
                        p.mul_(init_scale)
        return student

    def reference(self, name: str, hidden: int) -> LearnedMember:
        """The not-imitating baseline, scored with :meth:`loss`: member ``name`` whose last
        layer is zero, so its update is 0 everywhere (the parameters never move)."""
        from metarl.families.optim import FAMILY

        ref = FAMILY.make(name, hidden=hidden)
        with torch.no_grad():
            ref.l3.weight.zero_()
            ref.l3.bias.zero_()
        return ref

    def loss_name_for(self, teacher: LearnedMember) -> tuple[str, str]:
        """``(loss_name, loss_label)`` for ``teacher``: the update MSE, or for OPEN's
        unroll the final-parameter MSE (``final_param_mse``)."""
        if teacher.recurrent:
            return "final_param_mse", "final-parameter MSE after the unroll (1e-3 units)"
        return self.loss_name, self.loss_label

    def loss(self, student: LearnedMember, batch, create_graph: bool = False) -> torch.Tensor:
        """The mean squared error (scalar) of ``student`` against the teacher's target in
        ``batch`` (:meth:`batch`), in 1e-3 units. ``create_graph`` is unused (the loss
        needs no second derivatives)."""
        if len(batch) == 7:  # OPEN's unroll
            p0, layer, g, bprop, dormancy, eps, final = batch
            draws = {"p0": p0, "layer": layer, "g": g, "batch": bprop,
                     "dormancy": dormancy, "eps": eps}
            mine = unroll(student, draws)
            return torch.mean(((mine - final) / UNIT) ** 2)
        x, eps, target = batch
        return torch.mean((update(student, x, eps) / UNIT - target) ** 2)


__all__ = ["OptimDistillation", "STUDENTS"]
