"""Any member of the optimiser family as a ``torch.optim.Optimizer``: :class:`LearnedOptimizer`.

The optimiser family (:mod:`metarl.families.optim`) updates flat ``[P, D]`` rows of agent
parameters inside the RL inner loop. :class:`LearnedOptimizer` runs the same code (OPEN's
features, the networks (or a distilled formula) and the update rule through
:class:`~metarl.families.optim.learned.LearnedUpdate`; Adam and SGD through
:class:`~metarl.families.optim.AdamUpdate` / :class:`~metarl.families.optim.SGDUpdate`)
with ``P = 1`` on the parameters of any PyTorch model::

    from metarl import LearnedOptimizer

    opt = LearnedOptimizer(model.parameters(), "runs/open-ff/best.pt", model=model,
                           total_steps=1000)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each parameter group is one "agent": its tensors are concatenated into one flat row, in
order, with an :class:`~metarl.families.optim.AgentLayout` of one
:class:`~metarl.families.optim.TensorInfo` per tensor. Outside RL, the inputs the learned
optimisers read are defined as follows (see :class:`LearnedOptimizer` for the details):

- training proportion: ``step / (total_steps - 1)`` when ``total_steps`` is given (held at
  1 after it), else 0 throughout;
- layer proportion: the index of the parameter's ``nn.Linear`` among the model's Linear
  layers (module order) / (their number - 1) when ``model`` is given, else the tensor's
  index among the optimiser's parameters / (their number - 1);
- batch proportion: 0 (there are no PPO epochs);
- dormancy: from the pre-activation output of ``model``'s Linear layers (forward hooks),
  1 for every other parameter and for every parameter when no model is given;
- the stochastic term of OPEN and OPEN-FF acts on every parameter (there is no actor and
  critic outside RL), with noise that is a function of ``seed``, the group and the step.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from metarl import rng
from metarl.artifact import Artifact, load
from metarl.families import all_members
from metarl.families.optim import (
    AdamUpdate,
    AgentLayout,
    OptimMember,
    SGDUpdate,
    StepContext,
    TensorInfo,
)
from metarl.families.optim.features import DECAYS
from metarl.families.optim.learned import FeatureOptimizer, LearnedUpdate

__all__ = ["LearnedOptimizer"]

#: torch.optim.Adam's defaults (metarl's RL configurations use eps 1e-5 instead)
ADAM_LR, ADAM_BETAS, ADAM_EPS = 1e-3, (0.9, 0.999), 1e-8
_STATE_KEY = "metarl"


def _optim_names() -> list[str]:
    return [n for n, fam in all_members().items() if fam.name == "optim"]


def resolve_algorithm(algorithm) -> Artifact:
    """An optimiser-family :class:`~metarl.artifact.Artifact` from a member name, an
    artifact path or an ``Artifact``; a clear ``ValueError`` for anything else."""
    accepted = (f"a member of the optimiser family ({', '.join(_optim_names())}), an "
                f"optimiser artifact file (e.g. best.pt of `metarl meta-train open-ff`) or "
                f"an Artifact of the optim family")
    if isinstance(algorithm, Artifact):
        art = algorithm
    elif isinstance(algorithm, (str, os.PathLike)):
        key = str(algorithm)
        if key not in all_members() and not Path(key).exists():
            from metarl.families.base import unknown_member_message

            raise ValueError(f"LearnedOptimizer: {unknown_member_message(key)} "
                             f"LearnedOptimizer accepts {accepted}.")
        art = load(key)
    else:
        raise ValueError(f"LearnedOptimizer: algorithm must be a name, a path or an "
                         f"Artifact, got {type(algorithm).__name__}; it accepts {accepted}")
    if art.family != "optim":
        from metarl.families import get_family

        raise ValueError(
            f"LearnedOptimizer: {art.name!r} is a {art.family}-family algorithm: it fills "
            f"{get_family(art.family).slot}, not the optimiser. LearnedOptimizer accepts "
            f"{accepted}.")
    return art


class LearnedOptimizer(torch.optim.Optimizer):
    """A member of metarl's optimiser family (Adam, SGD, OPEN, OPEN-FF, No-Features, a
    meta-learned artifact of one of them, or a formula distilled from OPEN-FF or
    No-Features by ``metarl symbolic``) as a ``torch.optim.Optimizer``.

    Args:
        params: the parameters (an iterable of tensors, of ``(name, tensor)`` pairs, or of
            param-group dicts), as for any ``torch.optim.Optimizer``.
        algorithm: ``"adam"``, ``"sgd"``, ``"open"``, ``"open-ff"``, ``"no-features"`` (a
            learned member by name has its family's initial meta-parameters: PyTorch's
            default initialisation with seed 0, a random optimiser), an artifact path
            (``best.pt`` of ``metarl meta-train open-ff``) or an
            :class:`~metarl.artifact.Artifact`. Drift-family algorithms (``ppo-clip``,
            ``dpo``, ``lpo`` and their artifacts) fill PPO's objective, not the optimiser,
            and are refused with a ``ValueError``, as are unknown names.
        lr: the learning rate of ``adam`` (default 1e-3, torch's) and ``sgd`` (required).
            It is kept in each param group's ``"lr"``, so ``torch.optim.lr_scheduler``
            schedules work; nothing is annealed otherwise (the RL inner loop's linear
            anneal is not applied, even with ``total_steps``). A learned member or a
            formula has no learning rate (its output is the step): ``lr`` must be None,
            and a ``ValueError`` says so otherwise.
        betas, eps: Adam's, default ``(0.9, 0.999)`` and ``1e-8`` (torch.optim.Adam's; the
            RL configurations of metarl use 1e-5). As in torch and optax, ``eps`` is added
            outside the square root, so ``adam`` follows ``torch.optim.Adam(lr, betas, eps)``
            step by step. Only for ``adam``.
        model: the module the parameters belong to. When given, forward hooks on its
            ``nn.Linear`` layers record, for every forward pass run with gradients enabled
            since the last step, the mean ``|output|`` of each output neuron over all leading
            dimensions (batch, time, ...), averaged over those passes; a Linear's weight
            (by rows) and bias (by elements) take their dormancy from their layer's
            neurons. This is the *pre-activation* output: the RL inner loop records the
            post-activation output of hidden layers, which ``nn.Linear`` cannot see.
            Parameters of other layers get dormancy 1, and so does every parameter when no
            model is given. ``model`` also sets the layer proportion (below). Hooks are
            registered only for members that read dormancy (OPEN, OPEN-FF);
            :meth:`remove_hooks` removes them.
        total_steps: the number of ``step()`` calls training will take. The training
            proportion OPEN and OPEN-FF read is ``step / (total_steps - 1)`` (held at 1,
            with a warning, past the end); without ``total_steps`` it is 0 at every step,
            as at the start of RL training, and a warning says so once, at construction.
        seed: the seed of the stochastic term of OPEN and OPEN-FF. The noise of a step is
            a pure function of ``(seed, param group index, step)``, so the step count in
            the state dict is the noise's RNG position.

    Inputs of the learned members (and of formulas over OPEN-FF's or No-Features'
    inputs, which read the same features) outside RL:

    - layer proportion: with ``model``, the index of the parameter's ``nn.Linear`` among
      the model's Linear layers in module order / (their number - 1); a parameter of
      another layer takes the proportion of the last Linear before it in module order (0
      before the first); a parameter that is not in ``model`` gets 0; a model without
      Linear layers falls back to the rule without a model: the tensor's index among all
      the optimiser's parameters, in order, / (their number - 1);
    - batch proportion: 0;
    - the stochastic term (``o3 * 1e-3 * eps``; a formula's ``eps`` input) acts on every
      parameter: there is no actor and critic outside RL (in RL it acts on the actor
      only);
    - the update is mean-centred over each param group (a group is one "agent"), as the
      learned members are in RL, where the agent is all of actor and critic.

    The learned optimisers were meta-trained on gradients clipped to a global norm of 0.5
    (actor and critic separately); clip with ``torch.nn.utils.clip_grad_norm_`` to stay
    close to that. A parameter whose ``.grad`` is None counts as having a zero gradient
    when others in its group have one (a learned optimiser may still move it); a group in
    which no parameter has a gradient is skipped.

    Non-finite gradients: if any gradient holds NaN or inf, the whole step is skipped with
    a warning (as ``torch.amp.GradScaler`` does): no parameter, state or step count
    changes.

    State: per parameter, ``step`` and ``momenta [*shape, 6]`` (plus ``hidden
    [*shape, 8]`` for OPEN) for learned members and formulas, ``step``, ``m``, ``v`` for
    Adam, ``step``
    for SGD; ``state_dict()`` also records the algorithm, ``seed`` and ``total_steps``, which
    ``load_state_dict()`` restores, so that training continued after a save and load is
    identical to uninterrupted training.
    """

    def __init__(self, params, algorithm, lr: float | None = None, *,
                 model: nn.Module | None = None, total_steps: int | None = None,
                 seed: int = 0, betas: tuple[float, float] | None = None,
                 eps: float | None = None):
        art = resolve_algorithm(algorithm)
        member, meta = art.build()
        if not isinstance(member, OptimMember):  # pragma: no cover - the family has none
            raise ValueError(f"LearnedOptimizer: {art.name!r} is not an optimiser member")
        self.member = member
        self.algorithm = art.representation.get("member", art.name)
        self.artifact_name = art.name
        #: a feature optimiser: a learned network or a distilled formula (no lr; momenta)
        self.learned = isinstance(member, FeatureOptimizer)
        if self.algorithm not in ("adam", "sgd") and not self.learned:  # pragma: no cover
            raise ValueError(f"LearnedOptimizer: unsupported optimiser {self.algorithm!r}")
        self._meta = meta.detach().float().reshape(-1)
        if total_steps is not None and (not isinstance(total_steps, int)
                                        or isinstance(total_steps, bool) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got "
                             f"{total_steps!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (the model the parameters "
                             f"belong to), got {type(model).__name__}")
        if betas is not None or eps is not None:
            if self.algorithm != "adam":
                raise ValueError(f"betas and eps are Adam's; {self.algorithm!r} has none")
        if self.learned:
            if lr is not None:
                raise ValueError(
                    f"LearnedOptimizer: {self.algorithm!r} is a learned optimiser whose "
                    f"output is the step; it has no learning rate, so lr must be "
                    f"None (got {lr!r}). lr applies to 'adam' and 'sgd'.")
            defaults: dict = {}
        elif self.algorithm == "adam":
            defaults = {"lr": ADAM_LR if lr is None else lr,
                        "betas": tuple(ADAM_BETAS if betas is None else betas),
                        "eps": ADAM_EPS if eps is None else eps}
        else:
            defaults = {"lr": lr}
        self.total_steps, self.seed, self.model = total_steps, seed, model
        self._steppers: dict = {}
        self._layout_cache: dict = {}
        self._activations: dict[str, list] = {}
        self._hooks: list = []
        self._warned_past_end = False

        if isinstance(params, nn.Module):
            raise ValueError("LearnedOptimizer takes the parameters, not the module: pass "
                             "model.parameters() (and model=model for dormancy)")
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError("LearnedOptimizer got no parameters: pass model.parameters() "
                             "(or param groups) of a model with trainable parameters")
        super().__init__(params, defaults)
        tensors = [p for g in self.param_groups for p in g["params"]]
        if not tensors or not any(p.requires_grad for p in tensors):
            raise ValueError(
                f"LearnedOptimizer got {len(tensors)} parameter tensor(s), none of them "
                f"trainable (requires_grad=False): pass the parameters of a model with "
                f"trainable parameters")
        self._model_map = _model_map(model) if model is not None else None
        self._names = ({id(p): n for n, p in model.named_parameters()}
                       if model is not None else {})
        if self.learned and self.member.reads_activations:
            if model is not None:
                self._register_hooks(model)
            missing = []
            if total_steps is None:
                missing.append("no total_steps, so the training proportion is 0 at every "
                               "step")
            if model is None:
                missing.append("no model, so every parameter's dormancy is 1")
            if missing:
                warnings.warn(f"LearnedOptimizer({self.algorithm!r}): {'; '.join(missing)} "
                              f"(OPEN and OPEN-FF were meta-trained with both)", stacklevel=2)

    # -- param groups ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        learned = getattr(self, "learned", False)
        if learned:
            given = [k for k in ("lr", "betas", "eps") if param_group.get(k) is not None]
            if given:
                raise ValueError(
                    f"LearnedOptimizer: {self.algorithm!r} is a learned optimiser whose "
                    f"output is the step; a param group cannot set "
                    f"{', '.join(given)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not learned:
            lr = group.get("lr")
            if lr is None:
                raise ValueError(f"LearnedOptimizer: {self.algorithm!r} needs a learning "
                                 f"rate: pass lr=... (e.g. lr=1e-2), or 'lr' in every param "
                                 f"group")
            if not isinstance(lr, (int, float, torch.Tensor)) or float(lr) < 0:
                raise ValueError(f"LearnedOptimizer: lr must be a non-negative number, got "
                                 f"{lr!r}")
            if self.algorithm == "adam":
                b1, b2 = group["betas"]
                if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or group["eps"] < 0:
                    raise ValueError(f"LearnedOptimizer: adam needs betas in [0, 1) and eps "
                                     f">= 0, got betas={group['betas']}, eps={group['eps']}")
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("LearnedOptimizer does not support sparse parameters")
        self._layout_cache.clear()  # tensor indices (layer proportion without a model)
        self._steppers.clear()

    # -- activations (dormancy) -----------------------------------------------------------

    def _register_hooks(self, model: nn.Module) -> None:
        ref = weakref.ref(self)

        def hook_for(name):
            def hook(module, inputs, output):
                opt = ref()
                if opt is None or not torch.is_grad_enabled():
                    return
                a = output.detach().abs().reshape(-1, output.shape[-1]).mean(0)
                acc = opt._activations.get(name)
                opt._activations[name] = [a, 1] if acc is None else [acc[0] + a, acc[1] + 1]
            return hook

        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self._hooks.append(module.register_forward_hook(hook_for(name)))

    def remove_hooks(self) -> None:
        """Remove the forward hooks on ``model`` (dormancy is then 1 everywhere)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._activations.clear()

    def _take_activations(self) -> dict:
        acts = {name: (s / n).unsqueeze(0) for name, (s, n) in self._activations.items()}
        self._activations.clear()
        return acts

    # -- layout -----------------------------------------------------------------------------

    def _layout(self, params: list[torch.Tensor]) -> AgentLayout:
        key = tuple(id(p) for p in params)
        layout = self._layout_cache.get(key)
        if layout is not None and layout.device == params[0].device:
            return layout
        everything = [p for g in self.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(everything)}
        n = len(everything)
        infos = []
        for p in params:
            i = index[id(p)]
            name = self._names.get(id(p), f"param{i}")
            shape = tuple(p.shape)
            mm = self._model_map
            if mm is not None and mm[1] > 0:
                layer, group, mapping = mm[0].get(id(p), (0, None, "elements"))
                if group is not None and mapping == "rows" and p.dim() != 2:
                    group, mapping = None, "elements"
                infos.append(TensorInfo(name, shape, "actor", layer, mm[1], group, mapping))
            else:
                infos.append(TensorInfo(name, shape, "actor", i, n))
        layout = AgentLayout(infos, device=params[0].device)
        self._layout_cache[key] = layout
        return layout

    def _stepper(self, index: int, params: list[torch.Tensor], flat: torch.Tensor):
        key = (index, tuple(id(p) for p in params), flat.device, flat.dtype)
        stepper = self._steppers.get(key)
        if stepper is None:
            keys = rng.fold(rng.seed_keys([self.seed], device=flat.device), index)
            meta = self._meta.to(device=flat.device, dtype=flat.dtype).unsqueeze(0)
            stepper = LearnedUpdate(self.member, meta, self._layout(params), keys)
            self._steppers[key] = stepper
        return stepper

    def _context(self, t: int, activations: dict) -> StepContext:
        T = self.total_steps
        if T is None:
            update, num_updates = 0, 1
        else:
            if t >= T and not self._warned_past_end:
                self._warned_past_end = True
                warnings.warn(f"LearnedOptimizer: step {t + 1} is past total_steps={T}; "
                              f"the training proportion stays at 1", stacklevel=3)
            update, num_updates = min(t, T - 1), T
        # ``minibatch`` carries the step, so that the noise differs at every step even
        # where the training proportion is held (past total_steps, or without it)
        return StepContext(update=update, num_updates=num_updates, epoch=0, num_epochs=1,
                           minibatch=t, num_minibatches=t + 1, activations=activations)

    # -- state ----------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor) -> dict:
        state = {"step": 0}
        if self.learned:
            state["momenta"] = p.new_zeros(*p.shape, len(DECAYS))
            if self.member.recurrent:
                state["hidden"] = p.new_zeros(*p.shape, self.member.gru_hidden)
        elif self.algorithm == "adam":
            state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def state_dict(self) -> dict:
        d = super().state_dict()
        d[_STATE_KEY] = {"algorithm": self.algorithm, "num_meta_params": self._meta.numel(),
                         "seed": self.seed, "total_steps": self.total_steps}
        return d

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get(_STATE_KEY)
        if extra is not None:
            if (extra["algorithm"], extra["num_meta_params"]) != (self.algorithm,
                                                                  self._meta.numel()):
                raise ValueError(
                    f"LearnedOptimizer.load_state_dict: the state is of {extra['algorithm']!r} "
                    f"({extra['num_meta_params']} meta-parameters), this optimiser is "
                    f"{self.algorithm!r} ({self._meta.numel()})")
        state_dict = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        super().load_state_dict(state_dict)
        if extra is not None:
            self.seed, self.total_steps = extra["seed"], extra["total_steps"]
            self._warned_past_end = False
        self._steppers.clear()
        self._layout_cache.clear()

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param group (skipped, with a warning, if any gradient is not
        finite). Returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params or all(p.grad is None for p in params):
                continue
            for p in params:
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError("LearnedOptimizer does not support sparse gradients")
            grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                               .detach().reshape(-1).to(p.dtype) for p in params]).unsqueeze(0)
            work.append((index, group, grads))
        activations = self._take_activations()
        bad = [i for i, _, g in work if not bool(torch.isfinite(g).all())]
        if bad:
            warnings.warn(f"LearnedOptimizer: non-finite gradient (NaN or inf) in param "
                          f"group(s) {bad}; the step is skipped (parameters and optimiser "
                          f"state unchanged)", stacklevel=2)
            return loss
        for index, group, grads in work:
            self._step_group(index, group, grads, activations)
        return loss

    def _step_group(self, index, group, grads, activations) -> None:
        params = group["params"]
        flat = torch.cat([p.detach().reshape(-1) for p in params]).unsqueeze(0)
        states = []
        for p in params:
            if not self.state[p]:
                self.state[p] = self._init_state(p)
            states.append(self.state[p])
        t = int(states[0]["step"])

        # per-parameter state [*shape, width] <-> the stepper's feature-major [1, width, D]
        def gather(key, width=None):
            parts = [s[key].reshape(-1, width) if width else s[key].reshape(-1)
                     for s in states]
            flat_state = torch.cat(parts)
            return (flat_state.T if width else flat_state).unsqueeze(0).to(flat.dtype)

        def scatter(key, value):
            value = value[0].T if value.dim() == 3 else value[0]
            for s, chunk in zip(states, value.split([p.numel() for p in params])):
                s[key].copy_(chunk.reshape(s[key].shape))

        if self.learned:
            stepper = self._stepper(index, params, flat)
            st = {"momenta": gather("momenta", len(DECAYS))}
            if self.member.recurrent:
                st["hidden"] = gather("hidden", self.member.gru_hidden)
            acts = {k: v.to(flat.dtype) for k, v in activations.items()}
            stepper.step(flat, grads, st, self._context(t, acts))
            scatter("momenta", st["momenta"])
            if self.member.recurrent:
                scatter("hidden", st["hidden"])
        elif self.algorithm == "adam":
            b1, b2 = group["betas"]
            stepper = AdamUpdate(float(group["lr"]), b1, b2, group["eps"], anneal=False)
            st = {"m": gather("m"), "v": gather("v"),
                  "count": torch.tensor(t, dtype=torch.int64)}
            stepper.step(flat, grads, st, self._context(t, None))
            scatter("m", st["m"])
            scatter("v", st["v"])
        else:
            SGDUpdate(float(group["lr"]), anneal=False).step(flat, grads, {},
                                                               self._context(t, None))
        for p, chunk in zip(params, flat[0].split([p.numel() for p in params])):
            p.copy_(chunk.reshape(p.shape))
        for s in states:
            s["step"] = t + 1


def _model_map(model: nn.Module) -> tuple[dict, int]:
    """``id(param) -> (layer index, neuron group, mapping)`` and the number of Linear
    layers: a Linear's weight feeds its output neurons by rows, its bias by elements;
    other modules' parameters take the index of the last Linear before them."""
    linears = {id(m): j for j, m in enumerate(
        m for m in model.modules() if isinstance(m, nn.Linear))}
    out: dict = {}
    last = 0
    for name, module in model.named_modules():
        j = linears.get(id(module))
        if j is not None:
            last = j
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in out:
                continue  # a shared parameter keeps its first layer
            if j is not None and pname in ("weight", "bias"):
                out[id(p)] = (j, name, "rows" if pname == "weight" else "elements")
            else:
                out[id(p)] = (last, None, "elements")
    return out, len(linears)
