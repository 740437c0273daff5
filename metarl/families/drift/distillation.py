"""What black-box distillation (:mod:`metarl.meta.distill`) needs from the drift family.

The student is an LPO network of any width; it imitates the teacher's gradient of the actor
loss ``-(r A - drift)`` with respect to the ratio ``r`` on a synthetic grid over ``(r, A)``
(:class:`~metarl.families.drift.data.DriftGrid`, the grid of Lu et al. 2022's LPO
distillation, which Goldie et al. 2025, "How Should We Meta-Learn Reinforcement Learning
Algorithms?", reuse). Not imitating at all is an LPO with zero weights, i.e. PPO.

:class:`DriftDistillation` is the object the drift family registers under
``FAMILY.methods["distillation"]``. Another family supports distillation by registering an
object with the same attributes and methods; the method itself never names a family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarl.families.drift.data import DriftGrid, check_grid, drift_and_grad, teacher_module
from metarl.families.drift.members import LPO, Drift


def grad_mse(student: Drift, batch, clip_eps: float = 0.2,
             create_graph: bool = False) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's ``d actor_loss / d r``.

    ``batch = (ratio [B], advantage [B], target [B])`` with ``target`` the teacher's
    ``d drift / d r``. ``actor_loss = -(r A - drift)``, so its gradient is ``drift'(r) - A``;
    ``A`` cancels, and the loss is the mean of the squared difference of the two slopes.
    ``create_graph=True`` keeps the graph for a backward pass to the student's weights.
    Returns a scalar tensor.
    """
    ratio, adv, target = batch
    ratio = ratio.detach().requires_grad_(True)
    with torch.enable_grad():
        actor = -(ratio * adv - student(ratio, adv, clip_eps))
        (g,) = torch.autograd.grad(actor.sum(), ratio, create_graph=create_graph)
    return torch.mean((g - (target - adv)) ** 2)


@dataclass(frozen=True)
class DriftDistillation:
    """Black-box distillation of a drift network (LPO) into an LPO student.

    Attributes (read by :mod:`metarl.meta.distill`):

    - ``family``: ``"drift"``;
    - ``data_kind``: ``"points"``, a finite point set (the grid) from :meth:`inputs` and
      :meth:`targets`, of which a share is held out; ``default_batch_size``: 4096;
    - ``loss_name`` / ``loss_label``: ``"grad_mse"`` / ``"grad MSE"``; the metrics are
      ``train_<loss_name>`` and ``val_<loss_name>``;
    - ``reference_name`` / ``reference_short`` / ``reference_label``: ``"ppo"`` / ``"PPO"``
      / ``"PPO (zero network)"``, the not-imitating baseline (:meth:`reference`); its
      held-out error is ``val_<loss_name>_of_<reference_name>``;
    - ``clip_eps``: PPO's clip range at which both drifts are evaluated (0.2, PPO's
      default; LPO contains PPO's clip term).
    """

    family: str = "drift"
    data_kind: str = "points"
    default_batch_size: int = 4096
    loss_name: str = "grad_mse"
    loss_label: str = "grad MSE"
    reference_name: str = "ppo"
    reference_short: str = "PPO"
    reference_label: str = "PPO (zero network)"
    clip_eps: float = 0.2

    # -- the synthetic data --------------------------------------------------------------

    def default_data(self) -> DriftGrid:
        """The data options a run uses when none are given: the paper's grid, 1024 x 1024
        points over ``log r`` in ``[-2, 2)`` and ``A`` in ``[-8, 8)``."""
        return DriftGrid()

    def check_data(self, grid: DriftGrid) -> None:
        """Refuse bad data options (``ValueError``): not a :class:`DriftGrid`, an empty
        grid, a step that is not positive, a value that is not finite, over 50M points."""
        check_grid(grid, "distillation")

    def inputs(self, grid: DriftGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic inputs, one row per point: ``(ratio [N], advantage [N])`` float32,
        ratio-major over the grid."""
        return grid.tensors()

    # -- the teacher -----------------------------------------------------------------------

    def check_teacher(self, artifact, name: str) -> None:
        """Refuse (``ValueError``) a teacher without weights to imitate: handcrafted members,
        formulas and code. The message points to ``metarl symbolic``."""
        if artifact.kind == "network":
            return
        what = {"handcrafted": "a handcrafted member", "symbolic": "a formula"}.get(
            artifact.kind, f"a {artifact.kind} artifact")
        raise ValueError(
            f"{name} is {what}, not a network: there are no weights to imitate. Black-box "
            f"distillation takes a learned network (e.g. best.pt from `metarl meta-train`); "
            f"to write a handcrafted member or a network as a formula use "
            f"`metarl symbolic {name}`")

    def teacher(self, member: Drift, params: torch.Tensor) -> Drift:
        """The teacher module: ``member`` with ``params [n]`` loaded, in eval mode, frozen."""
        return teacher_module(member, params)

    def teacher_width(self, teacher: Drift) -> int:
        """The teacher's hidden width, the student's default (128 for the paper's LPO)."""
        return int(teacher.hidden)

    def targets(self, teacher: Drift, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """What the student matches, one row per point: the teacher's ``d drift / d r``
        ``[N]`` at ``inputs = (ratio [N], advantage [N])`` (computed in chunks)."""
        ratio, adv = inputs
        _, grad = drift_and_grad(teacher, ratio, adv, self.clip_eps)
        return grad

    # -- the student -----------------------------------------------------------------------

    def students(self, teacher: Drift) -> tuple[str, ...]:
        """The members a student may be: ``("lpo",)``."""
        return ("lpo",)

    def loss_name_for(self, teacher: Drift) -> tuple[str, str]:
        """``(loss_name, loss_label)``: the same for every drift teacher."""
        return self.loss_name, self.loss_label

    def student(self, name: str, hidden: int, init_scale: float,
                generator: torch.Generator) -> LPO:
        """A trainable student (``name`` is ``"lpo"``): ``LPO(hidden)`` with both layers
        drawn uniformly from ``+-init_scale / sqrt(fan_in)`` by ``generator``, layer 1
        first (LPO's own zero start is a saddle: both layers' gradients vanish there)."""
        student = LPO(hidden=hidden)
        with torch.no_grad():
            for lin in (student.l1, student.l2):
                bound = init_scale / lin.in_features ** 0.5
                lin.weight.uniform_(-bound, bound, generator=generator)
        return student

    def loss(self, student: Drift, batch, create_graph: bool = False) -> torch.Tensor:
        """The distillation loss (scalar) of ``student`` on ``batch = (ratio [B], advantage
        [B], target [B])``: :func:`grad_mse`."""
        return grad_mse(student, batch, self.clip_eps, create_graph=create_graph)

    def reference(self, name: str, hidden: int) -> LPO:
        """The not-imitating baseline, scored with :meth:`loss` like the student: an LPO of
        the student's width with zero weights, which is PPO up to LPO's 1e-4 offset."""
        return LPO(hidden=hidden)


__all__ = ["DriftDistillation", "grad_mse"]
