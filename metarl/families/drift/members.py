"""The drift family: what PPO's clipped objective becomes when it is learned (LPO).

Signature (every member): ``drift(ratio, advantage, clip_eps) -> drift``

- ``ratio``: ``pi_new(a|s) / pi_old(a|s)``, positive, any shape (``[B]`` for one agent).
- ``advantage``: the GAE advantage, normalised per minibatch, same shape as ``ratio``.
- ``clip_eps``: PPO's clip range epsilon (0.2 by default), a float.
- returns a drift of the same shape, ``>= 0`` everywhere.

The actor loss is ``-mean(ratio * advantage - drift)``. Mirror learning asks a valid drift
to be 0 at ``ratio = 1`` with zero gradient in ``ratio`` there.

Members: :class:`PPOClip` (PPO's clip written as a drift), :class:`DPO` (Lu et al. 2022's
discovered closed form) and :class:`LPO`, the learned network. Learned members expose their
parameters as one flat vector (:meth:`Drift.flat_params`); the inner loop runs a population
of them with :meth:`Drift.population`, ``meta_params [P, n_params]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from metarl.families.base import Member


class Drift(Member):
    """Base class of the drift family."""

    name: str = "drift"
    family = "drift"

    def forward(self, ratio: torch.Tensor, advantage: torch.Tensor,
                clip_eps: float = 0.2) -> torch.Tensor:
        raise NotImplementedError

    def population(self, meta_params: torch.Tensor, ratio: torch.Tensor,
                   advantage: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
        """One drift per member: ``meta_params [P, n]``, ``ratio``/``advantage`` ``[P, B]``."""
        if self.num_meta_params == 0:
            return self(ratio, advantage, clip_eps)
        params = self.unflatten(meta_params)
        return vmap(lambda p, r, a: functional_call(self, p, (r, a, clip_eps)))(
            params, ratio, advantage
        )


def ppo_clip_objective_drift(ratio, advantage, clip_eps):
    """``(r - clip(r, 1-eps, 1+eps)) * A``: PPO's clip, as a (possibly negative) drift."""
    return (ratio - ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)) * advantage


class PPOClip(Drift):
    """PPO's clipped surrogate as a drift: ``relu((r - clip(r, 1-eps, 1+eps)) * A)``.

    With it, ``r*A - drift = min(r*A, clip(r)*A)``, exactly PPO's objective.
    """

    name = "ppo-clip"

    def compile_key(self):
        return (type(self),)

    def forward(self, ratio, advantage, clip_eps=0.2):
        return torch.relu(ppo_clip_objective_drift(ratio, advantage, clip_eps))


class DPO(Drift):
    """Discovered Policy Optimisation (Lu et al. 2022), closed form.

    For ``A >= 0``: ``relu((r-1)A - alpha * tanh((r-1)A / alpha))``, alpha = 2;
    for ``A < 0``: ``relu(log(r)A - beta * tanh(log(r)A / beta))``, beta = 0.6.
    ``clip_eps`` is accepted for the common signature and not used.
    """

    name = "dpo"

    def __init__(self, alpha: float = 2.0, beta: float = 0.6):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def compile_key(self):
        return (type(self), self.alpha, self.beta)

    def forward(self, ratio, advantage, clip_eps=0.2):
        pos = (ratio - 1.0) * advantage
        neg = torch.log(ratio) * advantage
        drift_pos = torch.relu(pos - self.alpha * torch.tanh(pos / self.alpha))
        drift_neg = torch.relu(neg - self.beta * torch.tanh(neg / self.beta))
        return torch.where(advantage >= 0, drift_pos, drift_neg)


def lpo_features(ratio: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """The 8 LPO inputs ``[..., 8]``: r-1, (r-1)^2, log r, (log r)^2, and each times A."""
    x = ratio - 1.0
    lr = torch.log(ratio)
    base = torch.stack([x, x * x, lr, lr * lr], dim=-1)
    return torch.cat([base, base * advantage.unsqueeze(-1)], dim=-1)


class LPO(Drift):
    """Learned Policy Optimisation: a small network added to PPO's drift.

    ``drift = relu(f(features) - 1e-4 + relu(ppo_clip_drift))`` with
    ``f = Linear(8, hidden, bias=False) -> tanh -> Linear(hidden, 1, bias=False)``
    (1,152 parameters at the paper's width 128). The weights start at zero, so an untrained
    LPO is PPO up to the 1e-4 offset.
    """

    name = "lpo"
    offset = 1e-4

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.l1 = nn.Linear(8, hidden, bias=False)
        self.l2 = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(self.l1.weight)
        nn.init.zeros_(self.l2.weight)

    def compile_key(self):
        # the meta-parameters are an input of the population call: only the width matters
        return (type(self), self.hidden)

    def network(self, ratio, advantage):
        return self.l2(torch.tanh(self.l1(lpo_features(ratio, advantage)))).squeeze(-1)

    def population(self, meta_params, ratio, advantage, clip_eps=0.2):
        # The vmap path of the base class, written as two batched matmuls (same numbers).
        from metarl.nets import batched_linear

        p = self.unflatten(meta_params)
        x = lpo_features(ratio, advantage)  # [P, B, 8]
        h = torch.tanh(batched_linear(x, p["l1.weight"]))
        f = batched_linear(h, p["l2.weight"]).squeeze(-1)
        ppo = ppo_clip_objective_drift(ratio, advantage, clip_eps)
        return torch.relu(f - self.offset + torch.relu(ppo))

    def forward(self, ratio, advantage, clip_eps=0.2):
        ppo = ppo_clip_objective_drift(ratio, advantage, clip_eps)
        return torch.relu(self.network(ratio, advantage) - self.offset + torch.relu(ppo))


#: the inputs of a symbolic drift, in order: log r, r - 1 and the advantage
SYMBOLIC_INPUTS = ("log_r", "r_minus_1", "A")


class SymbolicDrift(Drift):
    """A drift written as a formula over ``(log r, r - 1, A)`` (symbolic distillation).

    ``drift = relu(f(log r, r - 1, A))``; ``f`` is an expression tree
    (:mod:`metarl.expression`) with guarded division. The ``relu`` keeps the
    family's ``drift >= 0`` whatever the formula; being 0 at ``r = 1`` is checked (or
    repaired) when the formula is chosen. ``clip_eps`` is not an input of the formula.
    """

    name = "symbolic"
    inputs = SYMBOLIC_INPUTS

    def __init__(self, tree):
        super().__init__()
        from metarl.expression import compile_tree

        self.tree = tree
        self.fn = compile_tree(tree, SYMBOLIC_INPUTS)

    def forward(self, ratio, advantage, clip_eps=0.2):
        return torch.relu(self.fn(torch.log(ratio), ratio - 1.0, advantage))

    def formula(self) -> str:
        import sympy as sp

        from metarl.expression import to_sympy

        syms = {n: sp.Symbol(n) for n in SYMBOLIC_INPUTS}
        return f"drift = relu({sp.N(to_sympy(self.tree, syms), 6)})"

    def source(self) -> str:
        from metarl.expression import guard_source, to_source

        body = to_source(self.tree, SYMBOLIC_INPUTS)
        lines = ["import torch", "", *guard_source(body)]
        lines += ["", "def drift(ratio, advantage, clip_eps=0.2):",
                  "    log_r, r_minus_1, A = torch.log(ratio), ratio - 1.0, advantage",
                  f"    return torch.relu({body})", ""]
        return "\n".join(lines)


DRIFTS: dict[str, type[Drift]] = {"ppo-clip": PPOClip, "dpo": DPO, "lpo": LPO}


def make_drift(name: str) -> Drift:
    """A drift member by name: ``ppo-clip``, ``dpo`` or ``lpo`` (zero weights)."""
    if name not in DRIFTS:
        import difflib

        close = difflib.get_close_matches(name, DRIFTS, n=3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown drift {name!r}; choose one of {', '.join(DRIFTS)}.{hint}")
    return DRIFTS[name]()
