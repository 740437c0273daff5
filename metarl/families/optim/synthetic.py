"""Synthetic optimiser inputs: what a learned optimiser is imitated on, with no environment.

Distillation (black-box and symbolic) of the optimiser family spends no environment
samples: the teacher is run on inputs drawn from fixed distributions (those of Goldie et
al. 2025, "How Should We Meta-Learn Reinforcement Learning Algorithms?"), one value per
synthetic parameter:

==========================  ============================================
 parameter ``p``             ``N(0, 1)``
 gradient ``g``              ``N(0, 0.5^2)``
 six momenta ``m_b``         ``N(0, 0.5^2)`` each, independently
 training proportion         ``U(0, 1)``
 layer proportion            one of ``{0, 0.5, 1}``, uniformly
 batch proportion            ``U(0, 1)``
 dormancy                    ``clip(N(1, 1), 0, 10)``
 noise ``eps``               ``N(0, 1)``
==========================  ============================================

The features are then computed exactly as in the inner loop
(:func:`~metarl.families.optim.features.open_features` /
:func:`~metarl.families.optim.features.no_features`) with the batch as one tensor, so the
RMS normalisation of the first features runs over the batch (as in the reference code).
The noise term acts on every synthetic parameter (they all count as actor parameters).

The recurrent OPEN is imitated over an *unroll* (:func:`unroll`): a batch of parameters
starts at ``p ~ N(0, 1)`` and takes ``steps`` (100) optimiser steps; at each step a fresh
gradient ``g ~ N(0, 0.5^2)`` is drawn, the momenta are updated from it as in training
(``m_b <- b m_b + (1 - b) g``, from zero), the training proportion is ``t / (steps - 1)``,
the batch proportion and dormancy are drawn afresh, the layer proportion is fixed per
parameter, and ``p <- p - u`` (no mean-centring). The student runs the same unroll (same
gradients, noise and draws) from the same start, its own parameters feeding its own
features; it is scored on the final parameter values.

Every draw is a pure function of a generator seeded by the caller, so a batch is
reproducible from its seed alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from metarl.families.optim.base import AgentLayout, StepContext, TensorInfo
from metarl.families.optim.features import (
    DECAYS,
    NO_FEATURE_NAMES,
    OPEN_FEATURE_NAMES,
    no_features,
    open_features,
    update_momenta,
)

#: updates are compared in units of the optimisers' step scale (1e-3): an update MSE of 1
#: means an error of one typical step
UNIT = 1e-3


@dataclass
class SyntheticOptions:
    """How much synthetic data a run draws (the distributions are fixed, see the module).

    - ``batches_per_epoch``: fresh batches per training epoch (each of the run's batch
      size, 2048 by default);
    - ``val_batches``: held-out batches, drawn once from a separate stream, never trained
      on (``val_<loss>``);
    - ``unroll``: steps of the recurrent unroll (recurrent OPEN only; the paper's 100).
    """

    batches_per_epoch: int = 50
    val_batches: int = 4
    unroll: int = 100

    def check(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"synthetic data option {k} must be an integer >= 1, got "
                                 f"{v!r} (options: {', '.join(asdict(self))})")


def check_options(options, what: str) -> None:
    """Refuse (``ValueError``) data options that are not valid :class:`SyntheticOptions`."""
    if not isinstance(options, SyntheticOptions):
        raise ValueError(f"the optim family's {what} data is a SyntheticOptions, got "
                         f"{type(options).__name__}")
    options.check()


def _layout(n: int, device=None) -> AgentLayout:
    """One tensor of ``n`` entries: normalisation over the whole batch."""
    return AgentLayout([TensorInfo("synthetic", (n,), "actor", 0, 1)], device)


def sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Raw synthetic inputs for ``n`` parameters: ``p, g [n]``, ``momenta [n, 6]``,
    ``training, layer, batch, dormancy, eps [n]`` (float32, drawn in this order)."""
    g = generator
    p = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g) * 0.5
    momenta = torch.randn(n, len(DECAYS), generator=g) * 0.5
    training = torch.rand(n, generator=g)
    layer = torch.randint(0, 3, (n,), generator=g).float() / 2
    batch = torch.rand(n, generator=g)
    dormancy = (torch.randn(n, generator=g) + 1.0).clamp_(0.0, 10.0)
    eps = torch.randn(n, generator=g)
    return {"p": p, "g": grad, "momenta": momenta, "training": training, "layer": layer,
            "batch": batch, "dormancy": dormancy, "eps": eps}


def features(member, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inputs ``[n, F]`` of ``member`` (OPEN's 19 or No-Features' 8) on raw synthetic
    inputs, computed by the inner loop's feature code with the batch as one tensor."""
    n = raw["p"].shape[0]
    layout = _layout(n, raw["p"].device)
    params, grads = raw["p"].unsqueeze(0), raw["g"].unsqueeze(0)
    momenta = raw["momenta"].unsqueeze(0)
    if member.num_inputs == len(NO_FEATURE_NAMES):
        return no_features(params, grads, momenta, layout)[0]
    ctx = StepContext(0, 1, 0, 1, 0, 1)
    x = open_features(params, grads, momenta.clone(), layout, ctx)[0]
    x[:, 15] = raw["training"]
    x[:, 16] = raw["layer"]
    x[:, 17] = raw["batch"]
    x[:, 18] = raw["dormancy"]
    return x


def feature_names(member) -> list[str]:
    """The names of :func:`features`' columns for ``member``."""
    if member.num_inputs == len(NO_FEATURE_NAMES):
        return list(NO_FEATURE_NAMES)
    return list(OPEN_FEATURE_NAMES)


def update(member, x: torch.Tensor, eps: torch.Tensor, hidden=None):
    """``member``'s update ``u [n]`` (before mean-centring; the noise term on every entry)
    on features ``x [n, F]`` with noise ``eps [n]``, through its own module (so gradients
    flow to its weights). Recurrent members take and return ``hidden [n, 8]``:
    ``(u, hidden)``."""
    if member.recurrent:
        out, hidden = member(x, hidden)
    else:
        out = member(x)
    u = member.update(out, torch.ones_like(eps), eps)
    return (u, hidden) if member.recurrent else u


def unroll_draws(n: int, steps: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The draws of one unroll of ``n`` parameters over ``steps`` steps: ``p0 [n]``,
    ``layer [n]``, and per step ``g, batch, dormancy, eps [steps, n]``."""
    g = generator
    p0 = torch.randn(n, generator=g)
    layer = torch.randint(0, 3, (n,), generator=g).float() / 2
    grads = torch.randn(steps, n, generator=g) * 0.5
    batch = torch.rand(steps, n, generator=g)
    dormancy = (torch.randn(steps, n, generator=g) + 1.0).clamp_(0.0, 10.0)
    eps = torch.randn(steps, n, generator=g)
    return {"p0": p0, "layer": layer, "g": grads, "batch": batch, "dormancy": dormancy,
            "eps": eps}


def unroll(member, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parameters ``[n]`` after ``member`` takes every step of ``draws``
    (:func:`unroll_draws`) from ``p0``; differentiable in ``member``'s weights through each
    step's update and the recurrent state (the features are read from the parameters'
    values as constants: the gradient does not flow back through ``p`` into later
    features)."""
    steps, n = draws["g"].shape
    p = draws["p0"]
    momenta = p.new_zeros(n, len(DECAYS))
    hidden = None
    for t in range(steps):
        g = draws["g"][t]
        momenta = momenta.clone()
        update_momenta(momenta.unsqueeze(0), g.unsqueeze(0))
        raw = {"p": p.detach(), "g": g, "momenta": momenta,
               "training": torch.full_like(g, t / (steps - 1) if steps > 1 else 0.0),
               "layer": draws["layer"], "batch": draws["batch"][t],
               "dormancy": draws["dormancy"][t]}
        with torch.no_grad():
            x = features(member, raw)
        if member.recurrent:
            u, hidden = update(member, x, draws["eps"][t], hidden)
        else:
            u = update(member, x, draws["eps"][t])
        p = p - u
    return p


__all__ = ["SyntheticOptions", "UNIT", "check_options", "sample", "features",
           "feature_names", "update", "unroll_draws", "unroll"]
