"""The drift family: PPO's policy objective as a learned slot (LPO).

Signature: ``drift(ratio, advantage, clip_eps) -> drift >= 0``; the actor loss is
``-mean(ratio * advantage - drift)``. Members: ``ppo-clip`` and ``dpo`` (handcrafted),
``lpo`` (learned; zero weights are PPO up to a 1e-4 offset). See
:mod:`metarl.families.drift.members` for the members and
:mod:`metarl.families.drift.data` for the synthetic grid distillation and symbolic
regression use; :mod:`metarl.families.drift.distillation` and
:mod:`metarl.families.drift.symbolic` hold what those two methods need from the family
(``FAMILY.methods["distillation"]``, ``FAMILY.methods["symbolic"]``).
"""

from __future__ import annotations

from metarl.families.base import Family
from metarl.families.drift.data import (
    SYMBOLIC_GRID,
    DriftGrid,
    drift_and_grad,
    teacher_module,
)
from metarl.families.drift.distillation import DriftDistillation
from metarl.families.drift.members import (
    DPO,
    DRIFTS,
    LPO,
    SYMBOLIC_INPUTS,
    Drift,
    PPOClip,
    SymbolicDrift,
    lpo_features,
    make_drift,
    ppo_clip_objective_drift,
)
from metarl.families.drift.proposal import PROPOSAL
from metarl.families.drift.symbolic import DriftSymbolic


def _symbolic(rep: dict) -> Drift:
    """A formula over (log r, r - 1, A); its inputs and tree are checked first."""
    from metarl.expression import check_tree

    if list(rep.get("inputs") or SYMBOLIC_INPUTS) != list(SYMBOLIC_INPUTS):
        raise ValueError(f"a symbolic drift's inputs must be {list(SYMBOLIC_INPUTS)}, the "
                         f"artifact has {rep.get('inputs')}")
    check_tree(rep.get("tree"), SYMBOLIC_INPUTS)
    return SymbolicDrift(rep["tree"])


def _code(rep: dict) -> Drift:
    # Untrusted source: it runs only in a sandboxed child; the caller closes it
    # (member.close()) when done, or it is closed when garbage-collected. An evaluation
    # can train for long: a week of wall time, a day of child CPU.
    from metarl.families.drift.proposal import sandboxed_drift
    from metarl.sandbox import SandboxLimits

    return sandboxed_drift(rep["source"], SandboxLimits(wall_s=7 * 86400.0, cpu_s=86400))


FAMILY = Family(
    name="drift",
    slot="PPO's policy objective (the drift function that replaces the clip)",
    members={"ppo-clip": PPOClip, "dpo": DPO, "lpo": LPO},
    learned=("lpo",),
    default="ppo-clip",
    init_doc="zero weights: an untrained LPO is PPO's clip (up to a 1e-4 offset)",
    builders={"symbolic": _symbolic, "code": _code},
)
# Black-box distillation (metarl distill) and symbolic distillation (metarl symbolic).
FAMILY.methods["distillation"] = DriftDistillation()
FAMILY.methods["symbolic"] = DriftSymbolic()
# LLM proposal (metarl propose): the prompt's content, the warm start and the validation.
FAMILY.methods["proposal"] = PROPOSAL

__all__ = ["FAMILY", "Drift", "PPOClip", "DPO", "LPO", "SymbolicDrift", "DRIFTS",
           "SYMBOLIC_INPUTS", "make_drift", "lpo_features", "ppo_clip_objective_drift",
           "DriftGrid", "SYMBOLIC_GRID", "drift_and_grad", "teacher_module",
           "DriftDistillation", "DriftSymbolic"]
