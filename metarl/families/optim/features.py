"""Per-parameter inputs of the learned optimisers (OPEN, Goldie et al. 2024).

For every parameter ``p`` with (clipped) gradient ``g`` the optimiser keeps six momenta
``m_b <- b * m_b + (1 - b) * g`` with decays ``b`` in (0.1, 0.5, 0.9, 0.99, 0.999,
0.9999), updated before the features are read. OPEN's 19 inputs, in order:

====  =========================================================  =====================
 0    ``p``                                                       RMS-normalised
 1-6  ``sign(m_b)`` for the six decays                            RMS-normalised
 7-12 ``log(|m_b| + 1e-13)`` for the six decays                   RMS-normalised
 13   ``sign(g)``                                                 RMS-normalised
 14   ``log(|g| + 1e-13)``                                        RMS-normalised
 15   training proportion ``update / (num_updates - 1)``
 16   layer proportion ``layer / (layers in the tower - 1)``
 17   batch proportion ``epoch / (epochs - 1)``
 18   dormancy of the neuron the parameter feeds
====  =========================================================  =====================

RMS normalisation divides each of the first 15 features by its root mean square over the
parameter's tensor: ``x / sqrt(1e-5 + mean_tensor(x^2))``, per feature and per tensor.

The No-Features optimiser's 8 inputs are ``p``, the six raw momenta and the raw ``g``, each
RMS-normalised the same way.
"""

from __future__ import annotations

import torch

from metarl.families.optim.base import AgentLayout, StepContext

#: the momentum decays of OPEN's features
DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
LOG_EPS = 1e-13
RMS_EPS = 1e-5
NUM_OPEN_FEATURES = 19
NUM_NO_FEATURES = 8
OPEN_FEATURE_NAMES = (
    ["p"] + [f"sign_m{b:g}" for b in DECAYS] + [f"log_m{b:g}" for b in DECAYS]
    + ["sign_g", "log_g", "training_proportion", "layer_proportion", "batch_proportion",
       "dormancy"])
NO_FEATURE_NAMES = ["p"] + [f"m{b:g}" for b in DECAYS] + ["g"]


def update_momenta(momenta: torch.Tensor, grads: torch.Tensor) -> None:
    """``momenta [P, D, 6]`` <- ``b * m + (1 - b) * g`` for each decay, in place."""
    b = torch.tensor(DECAYS, dtype=momenta.dtype, device=momenta.device)
    momenta.mul_(b).add_(grads.unsqueeze(-1) * (1.0 - b))


def rms_normalise(x: torch.Tensor, layout: AgentLayout) -> torch.Tensor:
    """``x [P, D, F]`` divided by its RMS over each tensor, per feature and member
    (in place when ``x`` is writable; returns it)."""
    P, D, F = x.shape
    sums = torch.zeros(P, len(layout.sizes), F, dtype=x.dtype, device=x.device)
    sums.index_add_(1, layout.segment, x * x)
    scale = torch.rsqrt(sums.div_(layout.counts.view(1, -1, 1)).add_(RMS_EPS))
    return x.mul_(scale[:, layout.segment])


def open_features(params: torch.Tensor, grads: torch.Tensor, momenta: torch.Tensor,
                  layout: AgentLayout, ctx: StepContext) -> torch.Tensor:
    """OPEN's 19 inputs ``[P, D, 19]`` (see the module docstring for their order)."""
    P, D = params.shape
    x = params.new_empty(P, D, NUM_OPEN_FEATURES)
    x[..., 0] = params
    torch.sign(momenta, out=x[..., 1:7])
    torch.log(momenta.abs().add_(LOG_EPS), out=x[..., 7:13])
    torch.sign(grads, out=x[..., 13])
    torch.log(grads.abs().add_(LOG_EPS), out=x[..., 14])
    rms_normalise(x[..., :15], layout)
    x[..., 15] = ctx.training_proportion
    x[..., 16] = layout.layer_proportion
    x[..., 17] = ctx.batch_proportion
    x[..., 18] = layout.dormancy(ctx.activations, P)
    return x


def no_features(params: torch.Tensor, grads: torch.Tensor, momenta: torch.Tensor,
                layout: AgentLayout) -> torch.Tensor:
    """The No-Features optimiser's 8 inputs ``[P, D, 8]``: p, six momenta, g; normalised."""
    x = torch.cat([params.unsqueeze(-1), momenta, grads.unsqueeze(-1)], dim=-1)
    return rms_normalise(x, layout)
