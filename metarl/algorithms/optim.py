"""The optimiser slot of the inner loop (the family the learned optimisers OPEN will join).

An agent optimiser updates a whole population's parameters at once. Parameters, gradients
and every state tensor are flat, ``[P, D]``: member ``p``'s row is its own agent, so the
optimiser never mixes members. The loop calls ``init`` once and ``step`` after every
minibatch gradient (already clipped to the global norm per member).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepContext:
    """Where in training a step happens (what schedules and learned optimisers read)."""

    update: int  # index of the PPO update (rollout) in [0, num_updates)
    num_updates: int
    epoch: int
    num_epochs: int
    minibatch: int
    num_minibatches: int

    @property
    def frac_remaining(self) -> float:
        """``1 - update / num_updates``: purejaxrl's linear anneal factor."""
        return 1.0 - self.update / self.num_updates


class AgentOptimizer:
    """Base class: ``init(params) -> state``; ``step(params, grads, state, ctx)`` in place."""

    name = "optimizer"

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def step(self, params: torch.Tensor, grads: torch.Tensor, state: dict,
             ctx: StepContext) -> None:
        raise NotImplementedError


class Adam(AgentOptimizer):
    """Adam (optax semantics, eps outside the square root) with an optional linear
    learning-rate anneal to zero over the updates, as in purejaxrl's PPO."""

    name = "adam"

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5,
                 anneal: bool = True):
        self.lr, self.b1, self.b2, self.eps, self.anneal = lr, b1, b2, eps, anneal

    def init(self, params):
        z = torch.zeros_like(params)
        return {"m": z, "v": z.clone(), "count": torch.zeros((), dtype=torch.int64)}

    @torch.no_grad()
    def step(self, params, grads, state, ctx):
        state["count"] += 1
        t = int(state["count"])
        m, v = state["m"], state["v"]
        m.lerp_(grads, 1.0 - self.b1)
        v.mul_(self.b2).addcmul_(grads, grads, value=1.0 - self.b2)
        lr = self.lr * (ctx.frac_remaining if self.anneal else 1.0)
        bc1 = 1.0 - self.b1**t
        bc2 = 1.0 - self.b2**t
        denom = (v / bc2).sqrt_().add_(self.eps)
        params.addcdiv_(m, denom, value=-lr / bc1)


class SGD(AgentOptimizer):
    """Plain SGD with the learning rate annealed linearly to zero."""

    name = "sgd"

    def __init__(self, lr: float, anneal: bool = True):
        self.lr, self.anneal = lr, anneal

    @torch.no_grad()
    def step(self, params, grads, state, ctx):
        lr = self.lr * (ctx.frac_remaining if self.anneal else 1.0)
        params.add_(grads, alpha=-lr)
