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

Two layouts: ``*_fm`` functions work feature-major (``momenta [P, 6, D]``, features written
into a buffer ``[P, F, D]``), which is how the population stepper keeps them; the others
take and return the feature-last ``[P, D, 6]`` / ``[P, D, F]`` for reading and for the
synthetic data of distillation, and are the same code, transposed.
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
    update_momenta_fm(momenta.transpose(1, 2), grads)


def _decays(dtype) -> list[tuple[float, float]]:
    """``(b, 1 - b)`` per decay, each rounded to ``dtype`` (``1 - b`` computed in it)."""
    b = torch.tensor(DECAYS, dtype=dtype)
    return list(zip(b.tolist(), (1.0 - b).tolist()))


_DECAYS_F32 = _decays(torch.float32)


def update_momenta_fm(momenta: torch.Tensor, grads: torch.Tensor) -> None:
    """Feature-major :func:`update_momenta`: ``momenta [P, 6, D]``, in place, one
    contiguous pass per decay (``b`` and ``1 - b`` rounded to the momenta's dtype)."""
    decays = _DECAYS_F32 if momenta.dtype == torch.float32 else _decays(momenta.dtype)
    for i, (bi, ci) in enumerate(decays):
        momenta[:, i].mul_(bi).add_(grads * ci)


def write(out: torch.Tensor, fn, *args) -> torch.Tensor:
    """``fn(*args)`` written into ``out``: by ``out=`` eagerly (no temporary), by a copy
    when compiled (which cannot trace ``out=`` into a strided view; the copy fuses)."""
    if torch.compiler.is_compiling():
        return out.copy_(fn(*args))
    return fn(*args, out=out)


def rms_normalise(x: torch.Tensor, layout: AgentLayout) -> torch.Tensor:
    """``x [P, D, F]`` divided by its RMS over each tensor, per feature and member
    (in place when ``x`` is writable; returns it)."""
    rms_normalise_fm(x.transpose(1, 2), layout)
    return x


def rms_normalise_fm(x: torch.Tensor, layout: AgentLayout,
                     work: torch.Tensor | None = None) -> torch.Tensor:
    """Feature-major :func:`rms_normalise`: ``x [P, F, D]``, each feature of each tensor
    divided by ``sqrt(1e-5 + mean(x^2))`` over the tensor's entries, in place. The squares
    are taken in one pass (into ``work``, a kept buffer of ``x``'s shape, when given), each
    tensor's mean is a reduction over a contiguous range of them, and each tensor is scaled
    in one more pass."""
    sq = torch.mul(x, x) if work is None else torch.mul(x, x, out=work)
    for a, b in layout.bounds:
        ms = sq[:, :, a:b].sum(-1, keepdim=True).div_(b - a)
        x[:, :, a:b].mul_(ms.add_(RMS_EPS).rsqrt_())
    return x


def open_features(params: torch.Tensor, grads: torch.Tensor, momenta: torch.Tensor,
                  layout: AgentLayout, ctx: StepContext) -> torch.Tensor:
    """OPEN's 19 inputs ``[P, D, 19]`` (see the module docstring for their order) from
    ``momenta [P, D, 6]``: :func:`open_features_fm`, transposed."""
    P, D = params.shape
    x = params.new_empty(P, NUM_OPEN_FEATURES, D)
    open_features_fm(x, params, grads, momenta.transpose(1, 2), layout,
                     ctx.training_proportion, ctx.batch_proportion, ctx.activations)
    return x.transpose(1, 2)


def open_features_fm(x: torch.Tensor, params: torch.Tensor, grads: torch.Tensor,
                     momenta: torch.Tensor, layout: AgentLayout, training, batch,
                     activations: dict | None, constants: bool = True,
                     work: torch.Tensor | None = None) -> torch.Tensor:
    """OPEN's 19 inputs written feature-major into ``x [P, 19, D]`` (every feature a
    contiguous row per member) from ``momenta [P, 6, D]``, the training and batch
    proportions and the activations of the step (its
    :class:`StepContext`'s); returns ``x``. With ``constants=False`` the layer proportion
    (row 16), which depends only on the layout, is taken as already written (a kept
    buffer); ``work [P, 15, D]`` is :func:`rms_normalise_fm`'s."""
    x[:, 0] = params
    torch.sign(momenta, out=x[:, 1:7])
    torch.abs(momenta, out=x[:, 7:13])
    x[:, 7:13].add_(LOG_EPS).log_()
    torch.sign(grads, out=x[:, 13])
    torch.abs(grads, out=x[:, 14])
    x[:, 14].add_(LOG_EPS).log_()
    rms_normalise_fm(x[:, :15], layout, work)
    x[:, 15].fill_(training)
    if constants:
        x[:, 16] = layout.layer_proportion
    x[:, 17].fill_(batch)
    x[:, 18] = layout.dormancy(activations, params.shape[0])
    return x


def no_features(params: torch.Tensor, grads: torch.Tensor, momenta: torch.Tensor,
                layout: AgentLayout) -> torch.Tensor:
    """The No-Features optimiser's 8 inputs ``[P, D, 8]``: p, six momenta, g; normalised
    (:func:`no_features_fm`, transposed)."""
    P, D = params.shape
    x = params.new_empty(P, NUM_NO_FEATURES, D)
    no_features_fm(x, params, grads, momenta.transpose(1, 2), layout)
    return x.transpose(1, 2)


def no_features_fm(x: torch.Tensor, params: torch.Tensor, grads: torch.Tensor,
                   momenta: torch.Tensor, layout: AgentLayout,
                   work: torch.Tensor | None = None) -> torch.Tensor:
    """No-Features' 8 inputs written feature-major into ``x [P, 8, D]`` from
    ``momenta [P, 6, D]``; returns ``x`` (``work [P, 8, D]``: :func:`rms_normalise_fm`'s)."""
    x[:, 0] = params
    x[:, 1:7] = momenta
    x[:, 7] = grads
    return rms_normalise_fm(x, layout, work)
