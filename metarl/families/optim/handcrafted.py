"""The handcrafted members of the optimiser family: Adam and SGD.

Both use the per-environment learning rate of the inner-loop configuration (``lr`` with
``adam_b1``/``adam_b2``/``adam_eps`` for Adam, ``sgd_lr`` for SGD) unless one is given,
annealed linearly to zero over the updates when ``anneal_lr`` is set (purejaxrl's
schedule: the factor is ``1 - update / num_updates``, constant within an update).
"""

from __future__ import annotations

import torch

from metarl.families.optim.base import OptimMember, PopulationOptimizer, StepContext


class AdamUpdate(PopulationOptimizer):
    """Adam (optax semantics: eps outside the square root) over flat ``[P, D]`` rows."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5,
                 anneal: bool = True, compile: bool = False):
        self.lr, self.b1, self.b2, self.eps, self.anneal = lr, b1, b2, eps, anneal
        self._denom = None
        # compiled: the step's seven passes over [P, D] are one fused pass (a traced graph,
        # the same operations; their rounding may differ in the last bit). On the CPU
        # only: elsewhere its two scalars would be copied to the device every step, which
        # makes the host wait for the device, and the seven passes are cheap there.
        self._fused = None
        if compile:
            from metarl.inner import compiled

            self._fused = compiled.traced("adam", (b1, b2, eps), lambda: _adam_step(b1, b2,
                                                                                     eps))

    def init(self, params):
        z = torch.zeros_like(params)
        return {"m": z, "v": z.clone(), "count": torch.zeros((), dtype=torch.int64)}

    @torch.no_grad()
    def step(self, params, grads, state, ctx: StepContext):
        state["count"] += 1
        t = int(state["count"])
        m, v = state["m"], state["v"]
        lr = self.lr * (ctx.frac_remaining if self.anneal else 1.0)
        bc1 = 1.0 - self.b1**t
        bc2 = 1.0 - self.b2**t
        if self._fused is not None and params.device.type == "cpu":
            scalars = torch.tensor([-lr / bc1, bc2], dtype=params.dtype, device=params.device)
            self._fused(params, grads, m, v, scalars)
            return
        m.lerp_(grads, 1.0 - self.b1)
        v.mul_(self.b2).addcmul_(grads, grads, value=1.0 - self.b2)
        # The denominator goes into a buffer kept from step to step: a fresh [P, D]
        # tensor per step costs page faults once D is large (MinAtar's first layer).
        denom = self._denom
        if denom is None or denom.shape != v.shape or denom.device != v.device:
            denom = self._denom = torch.empty_like(v)
        torch.div(v, bc2, out=denom).sqrt_().add_(self.eps)
        params.addcdiv_(m, denom, value=-lr / bc1)


def _adam_step(b1: float, b2: float, eps: float):
    """:meth:`AdamUpdate.step`'s arithmetic as a function for :func:`metarl.inner.compiled.
    traced`: ``params``, ``m`` and ``v`` updated in place, ``scalars = [-lr / bc1, bc2]``
    (so that the learning rate and the step count are inputs, not constants)."""

    def step(params, grads, m, v, scalars):
        m1 = torch.lerp(m, grads, 1.0 - b1)
        v1 = v * b2 + (1.0 - b2) * grads * grads
        p1 = params + scalars[0] * m1 / (torch.sqrt(v1 / scalars[1]) + eps)
        m.copy_(m1)
        v.copy_(v1)
        params.copy_(p1)
        return ()

    return step


class SGDUpdate(PopulationOptimizer):
    """Plain SGD with the learning rate annealed linearly to zero."""

    def __init__(self, lr: float, anneal: bool = True):
        self.lr, self.anneal = lr, anneal

    @torch.no_grad()
    def step(self, params, grads, state, ctx: StepContext):
        lr = self.lr * (ctx.frac_remaining if self.anneal else 1.0)
        params.add_(grads, alpha=-lr)


class Adam(OptimMember):
    """Adam with the environment's tuned learning rate and betas, linearly annealed."""

    name = "adam"
    lr_field = "lr"

    def __init__(self, lr: float | None = None):
        super().__init__()
        self.lr = lr

    def population(self, meta_params, layout, config, keys):
        return AdamUpdate(self.lr or config.lr, config.adam_b1, config.adam_b2,
                          config.adam_eps, config.anneal_lr,
                          compile=bool(getattr(config, "compile", False)))


class SGD(OptimMember):
    """SGD with the environment's tuned SGD learning rate (``sgd_lr``), linearly annealed."""

    name = "sgd"
    lr_field = "sgd_lr"

    def __init__(self, lr: float | None = None):
        super().__init__()
        self.lr = lr

    def check_config(self, config) -> None:
        if not (self.lr or config.sgd_lr):
            raise ValueError(
                f"sgd: {config.env_id} has no tuned SGD learning rate; pass --sgd-lr "
                f"(the paper's: CartPole-v1 2.5e-4, Ant 0.17, MinAtar 0.52-1.17)")

    def population(self, meta_params, layout, config, keys):
        return SGDUpdate(self.lr or config.sgd_lr, config.anneal_lr)
