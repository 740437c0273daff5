"""The optimiser family: the agent optimiser as a learned slot (OPEN and its variants).

Members: ``adam`` and ``sgd`` (handcrafted, each with its per-environment learning rate,
linearly annealed) and the learned ``open`` (recurrent), ``open-ff`` and
``no-features``. The interface is in :mod:`metarl.families.optim.base`, the inputs of
the learned members in :mod:`metarl.families.optim.features`, the networks and the update
rule in :mod:`metarl.families.optim.learned`. In this family's slot PPO keeps its clip
(the drift family's default) and the actor and critic gradients are clipped to a global
norm of 0.5 separately before the optimiser.
"""

from __future__ import annotations

from metarl.families.base import Family
from metarl.families.optim.base import (
    AgentLayout,
    OptimMember,
    PopulationOptimizer,
    StepContext,
    TensorInfo,
)
from metarl.families.optim.distillation import OptimDistillation
from metarl.families.optim.handcrafted import SGD, Adam, AdamUpdate, SGDUpdate
from metarl.families.optim.learned import OPEN, OPENFF, LearnedMember, NoFeatures
from metarl.families.optim.proposal import PROPOSALS, code_member
from metarl.families.optim.symbolic import OptimSymbolic, symbolic_member

OPTIMIZERS = {"adam": Adam, "sgd": SGD, "open": OPEN, "open-ff": OPENFF,
              "no-features": NoFeatures}
LEARNED = ("open", "open-ff", "no-features")


FAMILY = Family(
    name="optim",
    slot="the agent optimiser (the per-parameter update of actor and critic)",
    members=dict(OPTIMIZERS),
    learned=LEARNED,
    default="adam",
    builders={"code": code_member, "symbolic": symbolic_member},
    init_doc=("PyTorch's default layer initialisation (LayerNorm scale 1), seeded by the "
              "meta-training seed: a random optimiser that moves each parameter by a few "
              "1e-4 per step, unrelated to the gradient. A zero network (the reference "
              "code's start, `--init zeros`) makes a zero update, so its first generations "
              "learn nothing"),
    refusals={},
)

# -- the methods (each block registers one; a method without a block is refused) ----------

# Black-box distillation (metarl distill).
FAMILY.methods["distillation"] = OptimDistillation()

# Symbolic distillation (metarl symbolic): formulas over OPEN-FF's or No-Features' inputs
# fitted to a feed-forward teacher's update on synthetic inputs (the recurrent OPEN, Adam and
# SGD are refused by check_teacher), and the formula member they become.
FAMILY.methods["symbolic"] = OptimSymbolic()

# LLM proposal (metarl propose): one signature per learned member (PROPOSALS.for_algorithm),
# the prompts' content, the warm starts (Adam for open, SGD for the others), the validation.
FAMILY.methods["proposal"] = PROPOSALS

__all__ = ["FAMILY", "OPTIMIZERS", "LEARNED", "Adam", "SGD", "OPEN", "OPENFF", "NoFeatures",
           "LearnedMember", "OptimMember", "PopulationOptimizer", "StepContext",
           "AgentLayout", "TensorInfo", "AdamUpdate", "SGDUpdate"]
