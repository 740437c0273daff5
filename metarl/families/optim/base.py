"""The optimiser family's interface: a member updates a whole population's parameters.

Signature (every member, through :meth:`OptimMember.population`)::

    stepper = member.population(meta_params [P, n], layout, config, keys)
    state = stepper.init(params [P, D])
    stepper.step(params [P, D], grads [P, D], state, ctx)   # in place

- ``params``/``grads``: one flat row per agent (member ``p``'s row is its own agent, so a
  step never mixes members); gradients are already clipped (to a global norm of 0.5, for
  actor and critic separately in this family's slot). ``grads`` is valid during the call
  only: the loop writes the next minibatch's gradient into the same tensor, so a member
  that keeps gradients across steps keeps a copy.
- ``layout``: :class:`AgentLayout`, the structure behind the flat row: which tensor, layer
  and tower each entry belongs to and which neuron it feeds (for per-tensor normalisation,
  layer proportion, dormancy and the actor-only noise of the learned optimisers).
- ``ctx``: :class:`StepContext`, where in training the step happens, and the per-neuron
  activations of the minibatch (for dormancy).

Handcrafted members (``adam``, ``sgd``) and learned ones (``open``, ``open-ff``,
``no-features``) share it; a learned member's network runs once per parameter, for every
parameter of every agent of the population in one batched call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from metarl.families.base import Member


@dataclass(frozen=True)
class StepContext:
    """Where in training a step happens (what schedules and learned optimisers read)."""

    update: int  # index of the PPO update (rollout) in [0, num_updates)
    num_updates: int
    epoch: int
    num_epochs: int
    minibatch: int
    num_minibatches: int
    #: neuron group -> mean |activation| per neuron over the minibatch, ``[P, width]``
    #: (filled only for members that read dormancy)
    activations: dict | None = field(default=None, compare=False)

    @property
    def frac_remaining(self) -> float:
        """``1 - update / num_updates``: purejaxrl's linear anneal factor."""
        return 1.0 - self.update / self.num_updates

    @property
    def training_proportion(self) -> float:
        """``update / (num_updates - 1)`` (0 with a single update)."""
        return self.update / (self.num_updates - 1) if self.num_updates > 1 else 0.0

    @property
    def batch_proportion(self) -> float:
        """``epoch / (num_epochs - 1)`` (0 with a single epoch)."""
        return self.epoch / (self.num_epochs - 1) if self.num_epochs > 1 else 0.0


@dataclass
class TensorInfo:
    """One parameter tensor of the agent, as the optimiser sees it."""

    name: str
    shape: tuple[int, ...]
    #: ``actor`` or ``critic``: the stochastic term of OPEN acts on actor tensors only
    tower: str
    #: index of the tensor's layer within its tower, and the tower's number of layers
    layer: int
    num_layers: int
    #: the neuron group whose activations give this tensor's dormancy (``None``: none, so
    #: dormancy is 1), and how entries map to neurons: ``rows`` (a weight ``[out, in]``:
    #: entry -> its output row) or ``elements`` (a bias or log_std: entry -> itself)
    group: str | None = None
    mapping: str = "elements"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class AgentLayout:
    """The structure behind a flat parameter row ``[D]``: index tensors the features need.

    - ``segment [D]``: tensor index of each entry;
    - ``bounds``: ``(start, end)`` of each tensor in the row (per-tensor RMS normalisation);
    - ``layer_proportion [D]``: layer index / (layers in the tower - 1), 0 for one layer;
    - ``actor_mask [D]``: True for actor entries (log_std included);
    - ``neuron [D]``: index into the concatenated neuron vector of ``groups`` (entries of
      tensors without a group point at a trailing slot whose dormancy is 1);
    - ``groups``: neuron group -> width, in order.
    """

    def __init__(self, tensors: list[TensorInfo], device=None):
        self.tensors = list(tensors)
        self.names = [t.name for t in tensors]
        self.sizes = [t.numel for t in tensors]
        self.numel = sum(self.sizes)
        groups: dict[str, int] = {}
        for t in tensors:
            if t.group is None:
                continue
            width = t.shape[0] if t.shape else 1
            if groups.setdefault(t.group, width) != width:
                raise ValueError(f"neuron group {t.group!r} has tensors of different widths")
        self.groups = groups
        offsets, o = {}, 0
        for g, w in groups.items():
            offsets[g] = o
            o += w
        self.num_neurons = o  # slot o (one past the last) has dormancy 1
        seg, neuron, lprop, actor = [], [], [], []
        for i, t in enumerate(tensors):
            n = t.numel
            seg.append(torch.full((n,), i, dtype=torch.long))
            lp = t.layer / (t.num_layers - 1) if t.num_layers > 1 else 0.0
            lprop.append(torch.full((n,), lp))
            actor.append(torch.full((n,), t.tower == "actor", dtype=torch.bool))
            if t.group is None:
                neuron.append(torch.full((n,), o, dtype=torch.long))
            elif t.mapping == "rows":
                rows = t.shape[0]
                neuron.append(offsets[t.group]
                              + torch.arange(rows).repeat_interleave(n // rows))
            else:
                neuron.append(offsets[t.group] + torch.arange(n))
        self.segment = torch.cat(seg).to(device)
        #: ``(start, end)`` of each tensor in the flat row (tensors are contiguous, in order)
        self.bounds = [(o - n, o) for o, n in zip(itertools.accumulate(self.sizes), self.sizes)]
        self.layer_proportion = torch.cat(lprop).to(device)
        self.actor_mask = torch.cat(actor).to(device)
        self.neuron = torch.cat(neuron).to(device)

    @property
    def device(self):
        return self.segment.device

    def dormancy(self, activations: dict | None, P: int) -> torch.Tensor:
        """Dormancy of the neuron each entry feeds, ``[P, D]``.

        A neuron's dormancy is its mean |activation| over the minibatch divided by the
        mean over its layer's neurons (``a_j / sum_k a_k * width``, with 1e-11 added to
        every ``a`` so that a dead layer gives 1 rather than 0/0). Entries without a
        neuron group, or without activations, get 1.
        """
        parts = []
        for g, w in self.groups.items():
            a = None if activations is None else activations.get(g)
            if a is None:
                parts.append(torch.ones(P, w, device=self.device))
                continue
            a = a.reshape(P, w) + 1e-11
            parts.append(a / a.sum(-1, keepdim=True) * w)
        parts.append(torch.ones(P, 1, device=self.device))
        return torch.cat(parts, dim=1)[:, self.neuron]

    @classmethod
    def for_actor_critic(cls, model, device=None) -> AgentLayout:
        """The layout of :class:`metarl.nets.ActorCritic`'s flat parameters.

        Layers run in order within each tower (hidden 1, hidden 2, output; the actor's
        ``log_std`` last), so layer proportion is ``i / (L - 1)``. A weight ``[out, in]``
        and its bias feed the ``out`` neurons of their layer, whose activations are the
        post-activation outputs of hidden layers and the raw logits / value of the output
        layer; ``log_std`` entries use ``exp(log_std)``.
        """
        from torch import nn

        tensors = []
        for tower in ("actor", "critic"):
            seq = getattr(model, tower)
            linears = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
            num_layers = len(linears) + (1 if tower == "actor" and not model.discrete else 0)
            for j, i in enumerate(linears):
                lin = seq[i]
                group = f"{tower}.{i}"
                tensors.append(TensorInfo(f"{group}.weight", tuple(lin.weight.shape), tower,
                                          j, num_layers, group, "rows"))
                tensors.append(TensorInfo(f"{group}.bias", tuple(lin.bias.shape), tower,
                                          j, num_layers, group, "elements"))
        if not model.discrete:
            tensors.append(TensorInfo("log_std", tuple(model.log_std.shape), "actor",
                                      len(linears), len(linears) + 1, "log_std", "elements"))
        names = [n for n, _ in model.named_parameters()]
        by_name = {t.name: t for t in tensors}
        if sorted(names) != sorted(by_name):
            raise ValueError(f"layout does not cover the model's parameters: {names}")
        return cls([by_name[n] for n in names], device)  # the flat order of FlatParams


class PopulationOptimizer:
    """A population's optimiser: ``init(params) -> state``; ``step`` updates in place."""

    #: whether ``step`` reads ``ctx.activations`` (the loop then records them)
    needs_activations: bool = False

    def init(self, params: torch.Tensor) -> dict:
        return {}

    def step(self, params: torch.Tensor, grads: torch.Tensor, state: dict,
             ctx: StepContext) -> None:
        raise NotImplementedError


class OptimMember(Member):
    """Base class of the optimiser family's members."""

    name = "optimizer"
    family = "optim"
    #: the update is mean-centred over all of an agent's parameters (the learned members)
    mean_centred: bool = False
    #: the inner-loop configuration field holding this member's learning rate (``lr``
    #: for Adam, ``sgd_lr`` for SGD; None: the member has none, its output is the step)
    lr_field: str | None = None

    def population(self, meta_params: torch.Tensor, layout: AgentLayout, config,
                   keys: torch.Tensor) -> PopulationOptimizer:
        """The stepper for ``P`` agents: ``meta_params [P, n]``, ``keys [P]`` (the agents'
        random keys, for stochastic members), ``config`` the inner-loop configuration."""
        raise NotImplementedError
