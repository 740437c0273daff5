"""Actor-critic networks and population parameter stacking.

A population of P agents is one ``nn.Module`` (the architecture) and one flat parameter
tensor ``[P, D]``. :class:`FlatParams` maps the flat tensor to the module's named
parameters (views ``[P, *shape]``), and :func:`population_forward` runs the module for every
member at once: through the module's hand-batched ``batched`` method where it has one (the
actor-critic does), otherwise through ``torch.func.functional_call`` under
``torch.func.vmap``. Keeping the
parameters flat makes the optimiser, gradient clipping and checkpoints single tensor
operations over the population.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vmap

from metarl import rng

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate actor and critic towers (``layers`` hidden layers of ``hidden`` units).

    ``forward(obs [B, obs_dim]) -> (policy_out [B, action_dim], value [B])``, where
    ``policy_out`` is the logits of a categorical policy or the mean of a diagonal Gaussian
    whose state-independent log standard deviation is the parameter ``log_std``.
    """

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool, hidden: int = 64,
                 layers: int = 2, activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        self.discrete = discrete
        self.actor = mlp([obs_dim] + [hidden] * layers + [action_dim], activation)
        self.critic = mlp([obs_dim] + [hidden] * layers + [1], activation)
        if not discrete:
            self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs: torch.Tensor):
        return self.actor(obs), self.critic(obs).squeeze(-1)

    def tower(self, name: str, params: dict[str, torch.Tensor], obs: torch.Tensor,
              taps: dict | None = None):
        """One tower (``actor`` or ``critic``) for a population, as batched matmuls.

        ``params`` are ``[P, *shape]``, ``obs`` is ``[P, B, obs_dim]``; the result is the
        same as ``vmap(functional_call(...))`` (a test checks it) at a fraction of its
        per-call overhead. With ``taps`` (a dict), every layer's mean absolute output over
        the batch is stored in it, ``taps["actor.2"] = [P, width]`` (after the activation
        for hidden layers, the raw output for the last): the per-layer activations the
        learned optimisers' dormancy feature reads.
        """
        act = torch.tanh if isinstance(self.actor[1], nn.Tanh) else torch.relu
        seq = getattr(self, name)
        linears = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
        h = obs
        for j, i in enumerate(linears):
            w, b = params[f"{name}.{i}.weight"], params[f"{name}.{i}.bias"]
            h = batched_linear(h, w, b)
            if j < len(linears) - 1:
                h = act(h)
            if taps is not None:
                taps[f"{name}.{i}"] = h.detach().abs().mean(dim=1)
        return h

    def batched(self, params: dict[str, torch.Tensor], obs: torch.Tensor,
                taps: dict | None = None):
        """``forward`` for a population: ``(policy_out [P, B, A], value [P, B])``."""
        return (self.tower("actor", params, obs, taps),
                self.tower("critic", params, obs, taps).squeeze(-1))

    def init_gains(self) -> dict[str, float]:
        """Orthogonal-init gains (the CleanRL / purejaxrl choice): sqrt(2) for hidden
        layers, 0.01 for the policy head, 1 for the value head. Biases start at zero."""
        gains = {}
        for tower, head_gain in (("actor", 0.01), ("critic", 1.0)):
            linears = [n for n, m in getattr(self, tower).named_modules()
                       if isinstance(m, nn.Linear)]
            for i, n in enumerate(linears):
                gains[f"{tower}.{n}.weight"] = head_gain if i == len(linears) - 1 else math.sqrt(2)
        return gains


def batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """``x [P, B, in] @ w[P, out, in]^T + b[P, out]`` for every member.

    A layer with one output (a value head, LPO's last layer) is a multiply and a sum:
    ``bmm`` with an output width of one rounds differently when the batch holds a single
    member, which would make a member trained alone drift away from the same member
    trained in a population; the multiply-and-sum rounds the same for every P.
    """
    if w.shape[1] == 1:
        y = (x * w).sum(-1, keepdim=True)
        return y if b is None else y + b.unsqueeze(1)
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class FlatParams:
    """Layout of a module's parameters inside one flat vector of length ``numel``."""

    def __init__(self, module: nn.Module):
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.numel = sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., numel]`` -> ``{name: [..., *shape]}`` (views, no copy)."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """Inverse of :meth:`unflatten`; ``lead`` leading dims are kept."""
        return torch.cat(
            [tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names], dim=-1
        )


def orthogonal(keys: torch.Tensor, rows: int, cols: int, gain: float) -> torch.Tensor:
    """One orthogonal ``[rows, cols]`` matrix per key: ``[P, rows, cols]``."""
    n, m = max(rows, cols), min(rows, cols)
    a = rng.normal(keys, (n, m))
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    if rows < cols:
        q = q.transpose(-1, -2)
    return gain * q


def init_population(module: ActorCritic, keys: torch.Tensor) -> torch.Tensor:
    """Initial parameters ``[P, D]`` for one member per key; member i depends on key i only."""
    layout = FlatParams(module)
    gains = module.init_gains()
    out = {}
    for i, (name, shape) in enumerate(zip(layout.names, layout.shapes)):
        k = rng.fold(keys, 0x1A17, i)
        if name in gains:
            out[name] = orthogonal(k, shape[0], shape[1], gains[name])
        else:  # biases and log_std start at zero
            out[name] = torch.zeros(keys.shape[0], *shape, device=keys.device)
    return layout.flatten(out, lead=1)


def population_forward(module: nn.Module, layout: FlatParams, flat: torch.Tensor,
                       *inputs: torch.Tensor, fused: bool = True, taps: dict | None = None):
    """Run ``module`` for every member: ``flat [P, D]``, inputs ``[P, B, ...]``.

    With ``fused`` and a module that has a ``batched`` method, that hand-batched forward is
    used; otherwise ``torch.func.functional_call`` under ``torch.func.vmap``. ``taps``
    (per-layer activations, see :meth:`ActorCritic.tower`) needs the fused forward.
    """
    params = layout.unflatten(flat)
    if fused and hasattr(module, "batched"):
        return module.batched(params, *inputs, **({"taps": taps} if taps is not None else {}))
    if taps is not None:
        raise ValueError("per-layer activations (learned optimisers' dormancy) need the "
                         "fused forward; drop --no-fused")
    return vmap_forward(module, params, *inputs)


def population_tower(module: ActorCritic, layout: FlatParams, flat: torch.Tensor,
                     name: str, obs: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """One tower of the actor-critic for every member (``[P, B, out]``)."""
    params = layout.unflatten(flat)
    if fused:
        return module.tower(name, params, obs)
    sub = getattr(module, name)
    prefix = name + "."
    sub_params = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    return vmap_forward(sub, sub_params, obs)


def vmap_forward(module: nn.Module, params: dict[str, torch.Tensor], *inputs: torch.Tensor):
    """``torch.func.functional_call`` of ``module`` under ``vmap`` over the leading dim."""

    def one(p, *x):
        return functional_call(module, p, x)

    return vmap(one)(params, *inputs)
