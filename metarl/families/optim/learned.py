"""The learned members of the optimiser family: OPEN, OPEN-FF and No-Features.

Each is a small network applied to every parameter of the agent independently (Goldie et
al. 2024, "Can Learned Optimization Make Reinforcement Learning Less Difficult?"):

- ``open-ff``: the 19 features of :mod:`metarl.families.optim.features` ->
  Linear(16) -> LayerNorm -> ReLU -> Linear(16) -> LayerNorm -> ReLU -> Linear(3)
  (707 meta-parameters);
- ``open``: the same with a GRU cell (19 -> 8) first, whose hidden state is kept per
  parameter across steps (1,227 meta-parameters);
- ``no-features``: the 8 raw inputs (p, six momenta, g; RMS-normalised) -> the same MLP
  with 2 outputs (514 meta-parameters).

Update rule, with outputs ``o1, o2[, o3]`` and ``eps ~ N(0, 1)`` drawn per parameter::

    u = o1 * 1e-3 * exp(o2 * 1e-3) + o3 * 1e-3 * eps * actor_mask
    u = u - mean(u)            # over all of the agent's parameters, actor and critic
    p = p - u

The stochastic term acts on actor parameters only (a Gaussian policy's ``log_std``
counts as actor); No-Features has no stochastic term. There is no learning rate: the
network's output is the step.

What does not depend on the network (the momenta, the features, the noise draw, the
mean-centring and the population stepper :class:`LearnedUpdate`) is in
:class:`FeatureOptimizer`, the base of :class:`LearnedMember` and of the formula member
:class:`~metarl.families.optim.symbolic.SymbolicOptimizer` (symbolic distillation), which
computes its update from the same features with a formula instead of a network.
"""

from __future__ import annotations

import torch
from torch import nn

from metarl import rng
from metarl.families.optim.base import OptimMember, PopulationOptimizer, StepContext
from metarl.families.optim.features import (
    DECAYS,
    NUM_NO_FEATURES,
    NUM_OPEN_FEATURES,
    no_features,
    no_features_fm,
    open_features,
    open_features_fm,
    update_momenta_fm,
    write,
)

STEP_MULT = 1e-3
EXP_MULT = 1e-3
LN_EPS = 1e-5
_S_NOISE = 0x0E9  # random stream of the stochastic term
#: floats of one activation per block of parameters in a network member's update (1 MB)
BLOCK_FLOATS = 1 << 18


def centred(p: dict) -> dict:
    """The meta-parameters as the stepper uses them: ``l1`` and ``l2`` centred over their
    outputs (``W - mean_rows(W)``, ``b - mean(b)``, biases shaped ``[P, H, 1]``). Each is
    followed by a LayerNorm, whose first step subtracts the mean over the outputs; the
    centred layer's outputs have that mean removed already, so :func:`ln_relu` skips the
    pass (the same function; the floats differ from subtracting afterwards in the last
    bits, and are more accurate where the outputs share a large offset)."""
    q = dict(p)
    for name in ("l1", "l2"):
        w, b = p[name + ".weight"], p[name + ".bias"]
        q[name + ".weight"] = (w - w.mean(1, keepdim=True)).contiguous()
        q[name + ".bias"] = (b - b.mean(1, keepdim=True)).unsqueeze(-1)
    return q


def scratch(ws: dict | None, name: str, shape, like: torch.Tensor) -> torch.Tensor | None:
    """A kept buffer of ``shape`` from the workspace ``ws`` (made on first use); None
    without a workspace (the caller's operation then allocates its result)."""
    if ws is None:
        return None
    key = (name, tuple(shape), like.dtype, like.device)
    t = ws.get(key)
    if t is None:
        t = ws[key] = like.new_empty(shape)
    return t


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [P, o, i] @ x [P, i, n] + bias``: feature-major ``[P, o, n]``; ``bias``
    ``[P, o]`` or ``[P, o, 1]`` (a product then a broadcast add: ``baddbmm``'s copy of an
    expanded bias measured as slow as the product itself)."""
    h = torch.bmm(weight, x, out=out)
    return h.add_(bias if bias.dim() == 3 else bias.unsqueeze(-1))


def ln_relu(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            sq: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(LayerNorm(h))`` over the features of feature-major ``h [P, H, n]`` (dim 1;
    biased variance, eps 1e-5, as ``torch.nn.LayerNorm``) with per-member affine ``[P, H]``,
    in place; ``h`` must already have zero mean over dim 1 (a :func:`centred` layer's
    output). Every pass runs along the contiguous ``n``; ``sq`` is a kept buffer of
    ``h``'s shape for the squares."""
    var = torch.mul(h, h, out=sq).mean(1, keepdim=True)
    h.mul_(weight.unsqueeze(-1))
    torch.addcmul(bias.unsqueeze(-1), h, var.add_(LN_EPS).rsqrt_(), out=h)
    return h.relu_()


def gru_cell(x: torch.Tensor, h: torch.Tensor, p: dict, prefix: str = "gru.",
             ws: dict | None = None) -> torch.Tensor:
    """``torch.nn.GRUCell`` for a population, feature-major: ``x [P, in, n]``,
    ``h [P, H, n]``; the new hidden state is written into ``h`` and returned."""
    P, H, n = h.shape
    gi = linear(x, p[prefix + "weight_ih"], p[prefix + "bias_ih"],
                scratch(ws, "gi", (P, 3 * H, n), x))
    gh = linear(h, p[prefix + "weight_hh"], p[prefix + "bias_hh"],
                scratch(ws, "gh", (P, 3 * H, n), x))
    r = torch.sigmoid_(gi[:, :H].add_(gh[:, :H]))
    z = torch.sigmoid_(gi[:, H:2 * H].add_(gh[:, H:2 * H]))
    c = torch.tanh_(gi[:, 2 * H:].addcmul_(r, gh[:, 2 * H:]))
    return write(h, torch.lerp, c, h, z)  # (1 - z) * c + z * h, into h


class FeatureOptimizer(OptimMember):
    """Base of the members that compute each parameter's update from its features.

    Per step and agent: the six momenta are updated from the gradient, the features are
    read (:meth:`features`: OPEN's 19, or No-Features' 8 raw inputs), a noise sample
    ``eps ~ N(0, 1)`` per parameter is drawn when the member is :attr:`stochastic`, the
    member's :meth:`step_update` gives ``u [P, D]``, ``u`` is mean-centred over all of the
    agent's parameters (actor and critic) and ``p <- p - u``. :class:`LearnedUpdate` runs
    it for a population. Subclasses: :class:`LearnedMember` (a network) and the formula
    member of symbolic distillation.
    """

    mean_centred = True
    #: ``"open"`` (OPEN's 19 features) or ``"raw"`` (No-Features' 8 inputs)
    feature_set = "open"
    num_inputs = NUM_OPEN_FEATURES
    #: reads per-layer activations (the dormancy feature)
    reads_activations = True
    #: keeps a hidden state per parameter across steps (OPEN's GRU)
    recurrent = False
    #: draws ``eps`` for OPEN's stochastic term
    stochastic = True

    def features(self, params, grads, momenta, layout, ctx) -> torch.Tensor:
        """The member's inputs ``[P, D, num_inputs]`` from ``momenta [P, D, 6]`` (already
        updated): for reading; the stepper writes them feature-major (:meth:`features_into`)."""
        if self.feature_set == "raw":
            return no_features(params, grads, momenta, layout)
        return open_features(params, grads, momenta, layout, ctx)

    def features_into(self, x, params, grads, momenta, layout, training, batch,
                      activations, work=None) -> torch.Tensor:
        """The member's inputs written feature-major into the kept buffer ``x [P, F, D]``
        from ``momenta [P, 6, D]`` and the step's training and batch proportions and
        activations (``work``: a kept buffer for the normalisation's squares); OPEN's
        layer-proportion row is written once, at :meth:`LearnedUpdate.init`."""
        if self.feature_set == "raw":
            return no_features_fm(x, params, grads, momenta, layout, work)
        return open_features_fm(x, params, grads, momenta, layout, training, batch,
                                activations, constants=False, work=work)

    def step_update(self, p: dict, x: torch.Tensor, state: dict, actor_mask: torch.Tensor,
                    noise: torch.Tensor | None) -> torch.Tensor:
        """The update ``u [P, n]`` before mean-centring, from the meta-parameters ``p``
        (named views, :meth:`unflatten`; a network member's are :func:`centred`, as the
        stepper passes them), the features ``x [P, num_inputs, n]``
        (feature-major), the stepper's ``state`` (its ``hidden [P, 8, n]``, when
        recurrent), ``actor_mask [n]`` and ``noise [P, n]`` (None unless
        :attr:`stochastic`)."""
        raise NotImplementedError

    def check_config(self, config) -> None:
        if self.reads_activations and not config.fused:
            raise ValueError(f"{self.name} reads per-layer activations (dormancy), which "
                             f"only the fused forward records; drop --no-fused")

    def population(self, meta_params, layout, config, keys):
        return LearnedUpdate(self, meta_params, layout, keys,
                             compile=bool(getattr(config, "compile", False)))


class LearnedMember(FeatureOptimizer):
    """Base of the learned members: the per-parameter MLP head and the update rule."""

    num_outputs = 3
    gru_hidden = 8

    @property
    def stochastic(self) -> bool:  # the third output scales the noise
        return self.num_outputs > 2

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        width = self.gru_hidden if self.recurrent else self.num_inputs
        if self.recurrent:
            self.gru = nn.GRUCell(self.num_inputs, self.gru_hidden)
        self.l1 = nn.Linear(width, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.l2 = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.l3 = nn.Linear(hidden, self.num_outputs)
        self.reset_parameters(0)  # seeded, so that a member built by name is repeatable

    # -- the network, for a population of optimisers --------------------------------------

    def head(self, q: dict, x: torch.Tensor, ws: dict | None = None) -> torch.Tensor:
        """The MLP, feature-major: ``x [P, width, n] -> [P, num_outputs, n]``, with the
        meta-parameters of :func:`centred` and an optional workspace of kept buffers."""
        P, n, H = x.shape[0], x.shape[-1], self.hidden
        sq = scratch(ws, "sq", (P, H, n), x)
        h = ln_relu(linear(x, q["l1.weight"], q["l1.bias"], scratch(ws, "h1", (P, H, n), x)),
                    q["ln1.weight"], q["ln1.bias"], sq)
        h = ln_relu(linear(h, q["l2.weight"], q["l2.bias"], scratch(ws, "h2", (P, H, n), x)),
                    q["ln2.weight"], q["ln2.bias"], sq)
        return linear(h, q["l3.weight"], q["l3.bias"])

    def inputs(self, params, grads, momenta, layout, ctx) -> torch.Tensor:
        """The network's inputs ``[P, D, num_inputs]`` (:meth:`FeatureOptimizer.features`)."""
        return self.features(params, grads, momenta, layout, ctx)

    def outputs(self, q: dict, x: torch.Tensor, state: dict,
                ws: dict | None = None) -> torch.Tensor:
        """Network outputs ``[P, num_outputs, n]`` from ``x [P, width, n]`` (``q``: the
        :func:`centred` meta-parameters); a recurrent member updates its
        ``state["hidden"] [P, 8, n]`` in place."""
        if self.recurrent:
            x = gru_cell(x, state["hidden"], q, ws=ws)
        return self.head(q, x, ws)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None):
        """One optimiser (this module's own weights) on inputs ``[..., num_inputs]``:
        the outputs ``[..., num_outputs]`` (and, when recurrent, the new hidden state)."""
        if self.recurrent:
            if hidden is None:
                hidden = x.new_zeros(*x.shape[:-1], self.gru_hidden)
            flat = self.gru(x.reshape(-1, x.shape[-1]), hidden.reshape(-1, self.gru_hidden))
            hidden = flat.reshape(*x.shape[:-1], self.gru_hidden)
            x = hidden
        h = torch.relu(self.ln1(self.l1(x)))
        h = torch.relu(self.ln2(self.l2(h)))
        out = self.l3(h)
        return (out, hidden) if self.recurrent else out

    # -- the update rule -------------------------------------------------------------------

    def update(self, out: torch.Tensor, actor_mask: torch.Tensor,
               noise: torch.Tensor | None) -> torch.Tensor:
        """The update ``u [...]`` from outputs ``[..., k]`` (before mean-centring)."""
        return self._rule(out.unbind(-1), actor_mask, noise)

    def _rule(self, o, actor_mask, noise):
        u = o[0] * STEP_MULT * torch.exp(o[1] * EXP_MULT)
        if self.num_outputs > 2 and noise is not None:
            u = u + o[2] * STEP_MULT * noise * actor_mask
        return u

    def step_update(self, p, x, state, actor_mask, noise, ws=None):
        """The network's outputs (:meth:`outputs`; ``p`` here is :func:`centred`) through
        the update rule (:meth:`update`)."""
        return self._rule(self.outputs(p, x, state, ws).unbind(1), actor_mask, noise)

    def reset_parameters(self, seed: int = 0) -> LearnedMember:
        """PyTorch's default initialisation of every layer, drawn from a generator seeded
        with ``seed`` (not the global one): Linear weights and biases uniform in
        ``+-1/sqrt(fan_in)``, GRU weights and biases uniform in ``+-1/sqrt(8)`` (its hidden
        size), LayerNorm scale 1 and shift 0. Such a random optimiser moves each parameter
        by a few 1e-4 per step, in directions unrelated to the gradient; evolution starts
        from it (see the optimiser family's docs)."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith(("ln1", "ln2")):
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                    continue
                if name.startswith("gru"):
                    fan_in = self.gru_hidden
                else:
                    fan_in = self.get_parameter(name.replace("bias", "weight")).shape[-1]
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / fan_in**0.5)
        return self

    def initial_params(self, seed: int = 0) -> torch.Tensor:
        """The meta-parameters ``[n]`` of :meth:`reset_parameters` with ``seed``."""
        return type(self)(self.hidden).reset_parameters(seed).flat_params()


class OPEN(LearnedMember):
    """OPEN: a GRU (19 -> 8) over the features, kept per parameter, then the MLP head."""

    name = "open"
    recurrent = True


class OPENFF(LearnedMember):
    """OPEN-FF: OPEN without the GRU (a feed-forward MLP on the 19 features)."""

    name = "open-ff"


class NoFeatures(LearnedMember):
    """No-Features: the MLP on 8 raw inputs (p, six momenta, g), 2 outputs, no noise."""

    name = "no-features"
    feature_set = "raw"
    num_inputs = NUM_NO_FEATURES
    reads_activations = False
    num_outputs = 2


class LearnedUpdate(PopulationOptimizer):
    """A population of feature optimisers (:class:`FeatureOptimizer`: a learned network,
    one per row of ``meta_params [P, n]``, or a formula, ``n = 0``).

    Everything per parameter is kept feature-major, ``[P, F, D]``: the state's
    ``momenta [P, 6, D]`` (and OPEN's ``hidden [P, 8, D]``) and a features buffer
    ``[P, F, D]`` written in place at every step, so that each feature of each member is a
    contiguous row, each tensor's RMS is a reduction over a contiguous range, and the
    network's layers are batched matrix products ``[out, in] @ [in, n]`` whose LayerNorm
    reduces across rows."""

    def __init__(self, member: FeatureOptimizer, meta_params: torch.Tensor, layout, keys,
                 compile: bool = False):
        self.member, self.layout, self.keys = member, layout, keys
        self.p = member.unflatten(meta_params)
        self.network = isinstance(member, LearnedMember)
        if self.network:
            self.p = centred(self.p)
        self.needs_activations = member.reads_activations
        self.compile = bool(compile) and self.network
        self._ws: dict = {}  # the network's kept buffers, per block shape

    def init(self, params):
        P, D = params.shape
        state = {"momenta": params.new_zeros(P, len(DECAYS), D)}
        if self.member.recurrent:
            state["hidden"] = params.new_zeros(P, self.member.gru_hidden, D)
        self._x = params.new_zeros(P, self.member.num_inputs, D)
        if self.member.feature_set == "open":
            self._x[:, 16] = self.layout.layer_proportion
        self._work = params.new_empty(P, min(15, self.member.num_inputs), D)
        self._u = params.new_empty(P, D)
        if self.compile:
            from metarl.inner import compiled

            # compiled: the noise draw (its hashing fuses into one pass) and the network
            # on a block (its LayerNorms fuse); the features are faster eagerly (inductor's
            # per-tensor reductions over ranges of a strided buffer measured 50x slower)
            key = (P, D, str(params.device), params.dtype)
            self._noise = compiled.cached_function(
                "optim", ("noise", *key), lambda: _noise_fn(D))
            # one compiled network per kind of member, whatever the object (its weights
            # are inputs): a member built again by name reuses it
            kind = (type(self.member), self.member.hidden)
            self._block = compiled.cached_function(
                "optim", ("block", *kind, *key), lambda: _block_fn(self.member))
        return state

    @torch.no_grad()
    def step(self, params, grads, state, ctx: StepContext):
        x = getattr(self, "_x", None)
        if (x is None or (x.shape[0], x.shape[2]) != tuple(params.shape)
                or x.dtype != params.dtype or x.device != params.device):
            self.init(params)  # a state from elsewhere: the buffers only
        member = self.member
        update_momenta_fm(state["momenta"], grads)
        member.features_into(self._x, params, grads, state["momenta"], self.layout,
                             ctx.training_proportion, ctx.batch_proportion, ctx.activations,
                             self._work)
        noise = None
        if member.stochastic:
            k = rng.fold(self.keys, _S_NOISE, ctx.update, ctx.epoch, ctx.minibatch)
            noise = self._noise(k) if self.compile else rng.normal(k, (params.shape[1],))
        if self.network:
            u = self._network_update(self._x, state, noise)
        else:
            u = member.step_update(self.p, self._x, state, self.layout.actor_mask, noise)
        if member.mean_centred:
            u = u - u.mean(dim=1, keepdim=True)
        params.sub_(u)

    def _network_update(self, x, state, noise) -> torch.Tensor:
        """A network member's update ``[P, D]``, a block of parameters at a time: the
        network sees each parameter on its own, so the blocks give the same numbers as one
        pass, and a block's activations (``[P, width, block]``) stay in cache instead of
        being fresh tensors of tens of megabytes, which cost a page fault per 4 KB."""
        member, mask = self.member, self.layout.actor_mask
        P, D = x.shape[0], x.shape[2]
        width = max(member.hidden, 3 * member.gru_hidden, member.num_inputs)
        # blocks for the CPU's caches; a GPU takes the whole row in one pass of kernels
        block = max(256, BLOCK_FLOATS // (P * width)) if x.device.type == "cpu" else D
        u = self._u
        for a in range(0, D, block):
            s = slice(a, min(a + block, D))
            hidden = state["hidden"][:, :, s] if member.recurrent else None
            blk_noise = None if noise is None else noise[:, s]
            if self.compile:
                u[:, s] = self._block(self.p, x[:, :, s], hidden, mask[s], blk_noise)
            else:
                part = {"hidden": hidden} if member.recurrent else {}
                u[:, s] = member.step_update(self.p, x[:, :, s], part, mask[s], blk_noise,
                                             self._ws)
        return u


def _noise_fn(D: int):
    """``rng.normal(keys, (D,))``, to be compiled: its hashing fuses into one pass."""
    def fn(keys):
        return rng.normal(keys, (D,))
    return fn


def _block_fn(member):
    """A network member's update of one block, to be compiled: ``fn(q, x [P, F, n],
    hidden [P, 8, n] or None (updated in place), mask [n], noise [P, n] or None)``."""
    def fn(q, x, hidden, mask, noise):
        part = {"hidden": hidden} if member.recurrent else {}
        return member.step_update(q, x, part, mask, noise)
    return fn
