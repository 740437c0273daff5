"""The optimiser family's side of LLM proposal: the update rule written as code by a model.

The model writes the per-parameter update of the agent optimiser, ``p <- p - update``, as
one elementwise torch function. Its signature depends on the learned member named on the
command line (``metarl propose open|open-ff|no-features``), following the inputs of that
member (Goldie et al. 2025, "How Should We Meta-Learn Reinforcement Learning Algorithms?"):

- ``open``: ``open_update(p, g, m_0_1, ..., m_0_9999, training_proportion,
  layer_proportion, batch_proportion, dormancy, eps, var, lr, step) -> (update,
  new_var)``; warm start Adam (eps 1e-5 outside the square root, betas 0.9 and 0.999:
  CartPole's, where it steps like the ``adam`` member), ``lr`` from ``config.lr``;
- ``open-ff``: ``open_ff_update(p, g, m_0_1, ..., m_0_9999, training_proportion,
  layer_proportion, batch_proportion, dormancy, eps, lr) -> update``; warm start SGD,
  ``lr`` from ``config.sgd_lr``;
- ``no-features``: ``no_features_update(p, g, m_0_1, ..., m_0_9999, lr) -> update``; warm
  start SGD, ``lr`` from ``config.sgd_lr``.

The inputs, for every parameter of every agent of the population:

- ``p``: the parameter; ``g``: its gradient, clipped (actor and critic each to a global
  norm of ``max_grad_norm``, 0.5);
- ``m_0_1, m_0_5, m_0_9, m_0_99, m_0_999, m_0_9999``: the gradient's momenta with decays
  0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, ``m <- b m + (1 - b) g`` from zero, updated with this
  step's ``g`` before the call (as OPEN's features; computed as ``torch.lerp(m, g, 1 -
  b)``, as the ``adam`` member computes its first moment, so ``m_0_9`` is that moment to
  the bit);
- ``training_proportion`` (``update / (num_updates - 1)``), ``layer_proportion``
  (``layer / (layers in the tower - 1)``), ``batch_proportion`` (``epoch / (epochs -
  1)``) and ``dormancy`` (the neuron's mean |activation| over its layer's mean): OPEN's
  features of those names, raw (see :mod:`metarl.families.optim.features`);
- ``eps``: ``N(0, 1)`` noise, one draw per parameter and step from :mod:`metarl.rng`
  keyed by the agent (the stream of OPEN's stochastic term), **zero on critic
  parameters**: an actor mask is not passed, the noise is masked instead, so a term in
  ``eps`` acts on the policy only, as OPEN's does (one input fewer to send);
- ``var`` (``open`` only): a per-parameter recurrent slot, zeros at the start of
  training, that the function returns updated as its second output (OPEN's GRU state has
  that role; the Adam warm start keeps its second moment there);
- ``lr``: the warm start's learning rate for the environment (``config.lr``, Adam's,
  for ``open``; ``config.sgd_lr``, SGD's, for the other two), annealed linearly to 0
  exactly as the handcrafted members anneal it (``lr * (1 - update / num_updates)`` when
  ``anneal_lr``);
- ``step`` (``open`` only): optimiser steps taken, this one included (1 at the first
  call; one per minibatch), for Adam's bias correction.

Scalars the same for every parameter (``training_proportion``, ``batch_proportion``,
``lr``, ``step``) are sandbox constants; the others are float32 tensors. The update is
applied as it is, ``p <- p - update``: it is **not mean-centred** (unlike the ES-trained
networks of :mod:`metarl.families.optim.learned`).

Public objects:

- :data:`SIGNATURES`: member name -> :class:`OptimSignature`;
- :class:`OptimProposal`: what :mod:`metarl.meta.propose` needs for one signature (prompt
  content, warm start, :meth:`~OptimProposal.build`); :data:`PROPOSALS`, an
  :class:`OptimProposals`, is registered as the family's ``methods["proposal"]`` and gives
  the member's with :meth:`~OptimProposals.for_algorithm`;
- :class:`SandboxedOptimizer`: an optimiser-family member (``name = "code"``) backed by a
  started sandbox; :func:`sandboxed_optimizer` starts one from source;
  :func:`code_member` builds one from a ``code`` artifact;
- :func:`call_update`: one call of the proposal; :func:`validate_update`: the checks a
  proposal passes before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from metarl import rng
from metarl.families.optim.base import OptimMember, PopulationOptimizer, StepContext
from metarl.families.optim.features import DECAYS
from metarl.families.optim.learned import _S_NOISE
from metarl.sandbox import ProposalError, Sandbox, SandboxLimits

__all__ = ["MOMENTA", "SIGNATURES", "PROPOSALS", "OptimSignature", "OptimProposal",
           "OptimProposals", "SandboxedOptimizer", "SandboxedUpdate", "call_update",
           "validate_update", "sandboxed_optimizer", "code_member"]

#: the momenta's parameter names, in the order of :data:`~metarl.families.optim.features.DECAYS`
MOMENTA = tuple("m_" + f"{b:g}".replace(".", "_") for b in DECAYS)
#: OPEN's features that OPEN and OPEN-FF's signatures pass raw, and the masked noise
_FEATURES = ("training_proportion", "layer_proportion", "batch_proportion", "dormancy", "eps")
#: parameters that are the same for every parameter: sent as sandbox constants
CONSTANTS = frozenset({"training_proportion", "batch_proportion", "lr", "step"})


@dataclass(frozen=True)
class OptimSignature:
    """One signature of the optimiser update: the member it stands for, the function's
    name and parameters, whether it is recurrent (``var`` in, ``(update, new_var)`` out)
    and the configuration field of its learning rate."""

    member: str
    function: str
    params: tuple[str, ...]
    lr_field: str

    @property
    def recurrent(self) -> bool:
        return "var" in self.params

    @property
    def outputs(self) -> int:
        return 2 if self.recurrent else 1

    @property
    def reads_dormancy(self) -> bool:
        return "dormancy" in self.params

    @property
    def inputs(self) -> tuple[str, ...]:
        """The parameters sent as float32 tensors (one value per agent parameter)."""
        return tuple(x for x in self.params if x not in CONSTANTS)


SIGNATURES = {
    "open": OptimSignature("open", "open_update",
                           ("p", "g", *MOMENTA, *_FEATURES, "var", "lr", "step"), "lr"),
    "open-ff": OptimSignature("open-ff", "open_ff_update",
                              ("p", "g", *MOMENTA, *_FEATURES, "lr"), "sgd_lr"),
    "no-features": OptimSignature("no-features", "no_features_update",
                                  ("p", "g", *MOMENTA, "lr"), "sgd_lr"),
}
_BY_FUNCTION = {s.function: s for s in SIGNATURES.values()}


# -- one call -------------------------------------------------------------------------------


def call_update(sandbox: Sandbox, spec: OptimSignature, values: Mapping[str, object]
                ) -> tuple[np.ndarray, ...]:
    """The proposal's outputs on ``values`` (every parameter of ``spec`` by name: tensors
    or arrays of one shape for the inputs, numbers for the constants): ``(update,)``, or
    ``(update, new_var)`` for a recurrent signature, float32 arrays of the inputs' shape.
    Raises :class:`ProposalError`."""
    inputs = {x: values[x] for x in spec.inputs}
    constants = {x: values[x] for x in spec.params if x in CONSTANTS}
    return sandbox.call(inputs, constants, outputs=spec.outputs).outputs


# -- the optimiser member -------------------------------------------------------------------


class SandboxedUpdate(PopulationOptimizer):
    """A population's optimiser whose update comes from a sandboxed proposal.

    The state stays in this process: the six momenta ``[6, P, D]`` (each momentum one
    contiguous tensor, sent as it is; updated as ``torch.lerp(m, g, 1 - b)``, the
    ``adam`` member's form), and for a recurrent signature ``var [P, D]`` and the step
    count. Each step updates the momenta, builds the signature's inputs for the whole
    population ``[P, D]`` and calls the child once; a NaN or infinite output raises
    :class:`ProposalError` (``nan``); then ``params -= update``.
    """

    def __init__(self, sandbox: Sandbox, spec: OptimSignature, layout, lr: float,
                 anneal: bool, keys: torch.Tensor):
        self.sandbox, self.spec, self.layout = sandbox, spec, layout
        self.lr, self.anneal, self.keys = float(lr), bool(anneal), keys
        self.needs_activations = spec.reads_dormancy
        self._weights = torch.tensor([1.0 - b for b in DECAYS]).view(-1, 1, 1)
        # The noise is OPEN's draw (same stream, same numbers) on actor entries, 0 on the
        # critic. metarl.rng numbers depend only on their index, so when the actor is the
        # first A entries of the row (ActorCritic's discrete layout) only those are drawn.
        mask = layout.actor_mask
        a = int(mask.sum())
        self._actor_prefix = a if bool(mask[:a].all()) else None

    def init(self, params):
        P, D = params.shape
        state = {"momenta": params.new_zeros(len(DECAYS), P, D)}
        if self.spec.recurrent:
            state["var"] = params.new_zeros(P, D)
            state["step"] = 0
        return state

    def inputs(self, params, grads, state, ctx: StepContext) -> dict:
        """Every parameter of the signature for this step, by name."""
        P, D = params.shape
        m = state["momenta"]
        m.lerp_(grads.unsqueeze(0), self._weights.to(m))  # m <- b m + (1 - b) g
        values = {"p": params, "g": grads, **dict(zip(MOMENTA, m.unbind(0))),
                  "lr": self.lr * (ctx.frac_remaining if self.anneal else 1.0)}
        names = self.spec.params
        if "training_proportion" in names:
            values["training_proportion"] = float(ctx.training_proportion)
            values["batch_proportion"] = float(ctx.batch_proportion)
            values["layer_proportion"] = self.layout.layer_proportion.expand(P, D)
            values["dormancy"] = self.layout.dormancy(ctx.activations, P)
            k = rng.fold(self.keys, _S_NOISE, ctx.update, ctx.epoch, ctx.minibatch)
            a = self._actor_prefix
            if a is None:
                values["eps"] = rng.normal(k, (D,)) * self.layout.actor_mask
            else:
                values["eps"] = eps = params.new_zeros(P, D)
                eps[:, :a] = rng.normal(k, (a,))
        if self.spec.recurrent:
            state["step"] += 1
            values["var"] = state["var"]
            values["step"] = state["step"]
        return values

    @torch.no_grad()
    def step(self, params, grads, state, ctx: StepContext):
        outs = call_update(self.sandbox, self.spec, self.inputs(params, grads, state, ctx))
        u, *rest = (torch.from_numpy(o).to(params.device) for o in outs)
        where = (f"update {ctx.update}, epoch {ctx.epoch}, minibatch {ctx.minibatch} of "
                 f"training")
        for name, x in (("the update", u), ("the new var", rest[0] if rest else None)):
            if x is not None and not bool(torch.isfinite(x).all()):
                bad = ~torch.isfinite(x)
                raise ProposalError("nan", f"{name} is NaN or infinite for "
                                           f"{int(bad.sum())} of {x.numel()} parameters at "
                                           f"{where} (guard divisions, logs and square roots)")
        if rest:
            state["var"] = rest[0]
        params.sub_(u)


class SandboxedOptimizer(OptimMember):
    """An optimiser-family member whose update is a proposal running in a started sandbox
    with one of the :data:`SIGNATURES`. It has no meta-parameters; its learning rate is
    the configuration's ``lr_field`` of the signature (``lr`` or ``sgd_lr``), so
    ``metarl evaluate --tune-lr`` tunes it. Close it with :meth:`close`."""

    name = "code"

    def __init__(self, sandbox: Sandbox, spec: OptimSignature):
        super().__init__()
        if not isinstance(spec, OptimSignature):
            raise TypeError(f"SandboxedOptimizer needs an OptimSignature (one of "
                            f"{', '.join(SIGNATURES)}), got {spec!r}")
        if not isinstance(sandbox, Sandbox) or sandbox.params != spec.params:
            raise TypeError(f"SandboxedOptimizer needs a Sandbox with the parameters of "
                            f"{spec.function} {spec.params}, got {sandbox!r}")
        if not sandbox.running:
            raise ValueError("SandboxedOptimizer needs a started sandbox: call "
                             "sandbox.start() or use it as a context manager first")
        self.sandbox, self.spec = sandbox, spec
        self.lr_field = spec.lr_field

    def close(self) -> None:
        """Stop the sandboxed child (also done when the sandbox is garbage-collected)."""
        self.sandbox.close()

    def check_config(self, config) -> None:
        if not getattr(config, self.lr_field):
            raise ValueError(f"code written for {self.spec.member} reads {self.lr_field}, "
                             f"which {config.env_id} does not set; pass "
                             f"--{self.lr_field.replace('_', '-')}")
        if self.spec.reads_dormancy and not config.fused:
            raise ValueError(f"code written for {self.spec.member} reads dormancy (per-layer "
                             f"activations), which only the fused forward records; drop "
                             f"--no-fused")

    def population(self, meta_params, layout, config, keys):
        return SandboxedUpdate(self.sandbox, self.spec, layout, getattr(config, self.lr_field),
                               config.anneal_lr, keys)


def sandboxed_optimizer(source: str, spec: OptimSignature,
                        limits: SandboxLimits | None = None) -> SandboxedOptimizer:
    """A :class:`SandboxedOptimizer` running ``source`` with signature ``spec`` in a freshly
    started sandbox (not validated). Raises :class:`ProposalError` if the source does not
    load. Close it with ``member.close()`` when done."""
    return SandboxedOptimizer(Sandbox(source, spec.function, spec.params, limits).start(),
                              spec)


def code_member(rep: dict) -> SandboxedOptimizer:
    """The member of a ``code`` artifact of the optimiser family. The artifact's
    ``function`` names the signature the code was written for (``open_update``,
    ``open_ff_update`` or ``no_features_update``). The source runs only in a sandboxed
    child; an evaluation may train for long (a week of wall time, a day of child CPU)."""
    spec = _BY_FUNCTION.get(rep.get("function"))
    if spec is None:
        known = ", ".join(f"{s.function} ({s.member})" for s in SIGNATURES.values())
        raise ValueError(f"an optimiser code artifact's function names its signature, one "
                         f"of {known}; the artifact has {rep.get('function')!r}")
    return sandboxed_optimizer(rep["source"], spec,
                               SandboxLimits(wall_s=7 * 86400.0, cpu_s=86400))


# -- validation -----------------------------------------------------------------------------


def validate_update(fn: Callable[[dict], tuple], spec: OptimSignature, seed: int = 0,
                    n: int = 10, steps: int = 3) -> None:
    """Check a proposed update before any training; raises :class:`ProposalError`.

    ``fn(values) -> outputs`` calls the proposal on every parameter of ``spec`` by name
    (for example ``lambda v: call_update(sandbox, spec, v)``). The checks, in order:

    1. a short run of ``steps`` (3) steps on ``n`` (10) parameters, as in training: ``p ~
       N(0, 1)``, a fresh ``g ~ N(0, 1)`` per step, the momenta updated from zero, ``var``
       from zeros and then the function's own, layer proportion in {0, 0.5, 1}, dormancy
       ``clip(N(1, 1), 0, 10)``, ``eps ~ N(0, 1)`` on the first half (actor) and 0 on the
       rest, training and batch proportions 0, 0.5, 1, lr 1e-3, step 1, 2, 3; ``p <- p -
       update``. Every output has shape ``(n,)`` (the sandbox checks it: "shape") and is
       finite ("nan");
    2. the last step's inputs given again give the same numbers ("constraint":
       deterministic; noise comes from ``eps`` and memory from ``var``);
    3. each value depends only on its own parameter's inputs: the last step's inputs
       evaluated in two halves give the same numbers ("constraint": elementwise).
    """
    gen = np.random.default_rng(seed)
    f32 = np.float32
    p = gen.normal(0.0, 1.0, n).astype(f32)
    momenta = np.zeros((len(DECAYS), n), f32)
    var = np.zeros(n, f32)
    layer = (gen.integers(0, 3, n) / 2).astype(f32)
    actor = (np.arange(n) < n // 2).astype(f32)
    b = np.asarray(DECAYS, f32)[:, None]
    for t in range(1, steps + 1):
        g = gen.normal(0.0, 1.0, n).astype(f32)
        momenta = (b * momenta + (1 - b) * g).astype(f32)
        frac = (t - 1) / (steps - 1) if steps > 1 else 0.0
        values = {"p": p, "g": g, **dict(zip(MOMENTA, momenta)), "lr": 1e-3,
                  "training_proportion": frac, "batch_proportion": frac,
                  "layer_proportion": layer,
                  "dormancy": np.clip(gen.normal(1.0, 1.0, n), 0.0, 10.0).astype(f32),
                  "eps": (gen.normal(0.0, 1.0, n) * actor).astype(f32), "var": var, "step": t}
        values = {k: v for k, v in values.items() if k in spec.params}
        outs = _checked(fn, values, spec, f"step {t} of a short run on {n} random "
                                          f"parameters")
        p = (p - outs[0]).astype(f32)
        if spec.recurrent:
            var = outs[1]

    again = _checked(fn, values, spec, "the same inputs again")
    _compare(outs, again, "deterministic: the same inputs must give the same outputs, but "
                          "{what} changed from {a} to {b} at parameter {i} when the call was "
                          "repeated (take noise from eps and memory from var, not from "
                          "torch's random functions or global state)", spec)
    half = n // 2
    lo = _checked(fn, {k: _part(v, slice(0, half)) for k, v in values.items()}, spec,
                  "the first half of the inputs")
    hi = _checked(fn, {k: _part(v, slice(half, n)) for k, v in values.items()}, spec,
                  "the second half of the inputs")
    parts = tuple(np.concatenate([x, y]) for x, y in zip(lo, hi))
    _compare(outs, parts, "elementwise: each output must depend only on its own "
                          "parameter's inputs, but {what} at parameter {i} changed from {a} "
                          "to {b} when the batch changed (no mean, sum, norm, sort or other "
                          "reduction over the tensor: all agents' parameters are one call)",
             spec)


def _part(v, sl):
    return v[sl] if isinstance(v, np.ndarray) else v


def _names(spec):
    return ("the update", "the new var")[:spec.outputs]


def _checked(fn, values, spec, what) -> tuple[np.ndarray, ...]:
    outs = fn(values)
    if not isinstance(outs, tuple) or len(outs) != spec.outputs:
        raise ProposalError("shape", f"on {what}, the call did not give "
                                     f"{' and '.join(_names(spec))}")
    n = values["p"].shape
    outs = tuple(np.asarray(x, dtype=np.float32) for x in outs)
    for name, x in zip(_names(spec), outs):
        if x.shape != n:
            raise ProposalError("shape", f"on {what} of shape {n}, {name} has shape "
                                         f"{x.shape}; it must have the shape of p")
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.argmax(bad))
            raise ProposalError(
                "nan", f"{name} is NaN or infinite at {int(bad.sum())} of {x.size} "
                       f"parameters on {what}, e.g. p={values['p'][i]:.4g}, "
                       f"g={values['g'][i]:.4g} (guard divisions, logs and square roots)")
    return outs


def _compare(ref, new, message, spec):
    for name, a, b in zip(_names(spec), ref, new):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        tol = 1e-5 * np.abs(a64) + 1e-6 * np.abs(a64).max() + 1e-30
        excess = np.abs(a64 - b64) - tol
        if (excess > 0).any():
            i = int(np.argmax(excess))
            raise ProposalError("constraint", message.format(what=name, a=f"{a[i]:.6g}",
                                                             b=f"{b[i]:.6g}", i=i))


# -- what the model is asked for ------------------------------------------------------------

_INPUT_DOCS = {
    "p": "the parameter's current value.",
    "g": "its gradient of the PPO loss on this minibatch, after the actor's and the "
         "critic's gradients were each clipped to a global norm of 0.5.",
    "momenta": "momenta of the gradient with decays 0.1, 0.5, 0.9, 0.99, 0.999 and "
               "0.9999: m <- b * m + (1 - b) * g, starting from 0 and already updated "
               "with this step's g (m_0_9 is Adam's first moment before bias correction).",
    "training_proportion": "a float, how far training has got: update / (num_updates - "
                           "1), 0 at the first PPO update and 1 at the last.",
    "layer_proportion": "where the parameter's layer sits in its network (actor or "
                        "critic): layer / (layers - 1), 0 for the first layer, 1 for the "
                        "output layer.",
    "batch_proportion": "a float, epoch / (epochs - 1) within this PPO update: 0 in the "
                        "first pass over the rollout, 1 in the last.",
    "dormancy": "of the neuron the parameter feeds (its weight row or bias): the neuron's "
                "mean |activation| on this minibatch divided by the mean over its layer; "
                "about 1 is typical, near 0 is a dead neuron.",
    "eps": "standard normal noise, a fresh draw per parameter and step, for a stochastic "
           "term; it is 0 for critic parameters, so a term in eps moves the policy only.",
    "var": "a per-parameter memory: what this function returned as new_var at the "
           "previous step (zeros at the first step). Keep any running statistic in it.",
    "lr": "a float, the learning rate of the {warm} starting point, tuned per environment "
          "({example}) and already annealed linearly to 0 over training: "
          "lr = base_lr * (1 - update / num_updates).",
    "step": "an int, the optimiser steps taken so far, this one included (1 at the first "
            "call), e.g. for Adam's bias correction.",
}


def _def_line(spec: OptimSignature, annotate: bool = True) -> str:
    """The ``def`` line(s) of ``spec``, wrapped at 88 characters; with type annotations
    (the prompt's signature) or without (the warm start's and the example's code)."""
    def ann(x):
        if not annotate:
            return x
        return x + (": int" if x == "step" else ": float" if x in CONSTANTS
                    else ": torch.Tensor")

    ret = ("tuple[torch.Tensor, torch.Tensor]" if spec.recurrent else "torch.Tensor")
    end = f") -> {ret}:" if annotate else "):"
    lines, line = [], f"def {spec.function}("
    for i, x in enumerate(spec.params):
        a = ann(x) + (end if i == len(spec.params) - 1 else ",")
        if len(line) + len(a) > 88:
            lines.append(line.rstrip())
            line = " " * (len(spec.function) + 5)
        line += a + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def _docstring(spec: OptimSignature, warm: str, example_lr: str) -> str:
    head = (
        "The per-parameter update of the optimiser of a reinforcement-learning agent\n"
        "    (PPO's actor and critic networks).\n\n"
        "    It is called once per optimiser step (every minibatch of every PPO epoch) on\n"
        "    every parameter: the parameters of all agents being trained are concatenated\n"
        "    into one flat float32 tensor, and every tensor argument holds one value per\n"
        "    parameter, in that order. The parameter then moves by p <- p - update: the\n"
        "    update is applied exactly as returned (no mean-centring, no learning rate\n"
        "    applied outside this function).\n")
    lines = []
    for x in spec.params:
        if x in MOMENTA:
            if x == MOMENTA[0]:
                lines.append(f"{', '.join(MOMENTA)}: {_INPUT_DOCS['momenta']}")
            continue
        text = _INPUT_DOCS[x].format(warm=warm, example=example_lr)
        lines.append(f"{x}: {text}")
    if spec.recurrent:
        lines.append("returns: (update, new_var), two tensors shaped like p: the update "
                     "(p <- p - update) and the memory passed as var at the next step.")
    else:
        lines.append("returns: the update, a tensor shaped like p (p <- p - update).")
    body = "\n".join(_wrap(ln) for ln in lines)
    return f"{head}\n{body}\n    "


def _wrap(text: str, width: int = 88) -> str:
    """``text`` as docstring lines indented by 4 (continuations by 8)."""
    words, lines, line = text.split(), [], "    "
    for w in words:
        if len(line) + len(w) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = "        "
        line += w + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


_CONSTRAINTS = """\
- Every output has the shape of `p` and is computed elementwise: each element depends
  only on the same element of the tensor arguments (and the float arguments). No mean,
  sum, norm, sort or other reduction over the tensor: the parameters of all agents being
  trained are concatenated into one call, so a reduction would mix agents and layers.
- Finite for every input (no NaN or infinity): guard divisions, logs and square roots.
- Deterministic: the same inputs give the same outputs (no torch random functions, no
  global variables).{memory}
- Return new tensors; do not modify the arguments in place. Use torch operations only
  (no .item(), numpy or Python loops over elements).
- The update is applied as returned: p <- p - update, with no mean-centring and no
  learning rate or clipping afterwards. The learning rate `lr` is tuned per environment
  for the {warm} starting point and annealed linearly to 0; each environment's fitness
  is the final return on a scale where a random policy scores 0 and PPO scores 1."""


@dataclass(frozen=True)
class OptimProposal:
    """What :mod:`metarl.meta.propose` needs for one optimiser signature: the prompt's
    content (``slot``, ``function``, ``signature``, ``docstring``, ``constraints``,
    ``example``, the warm start) and :meth:`build`, which turns proposed source into a
    validated member."""

    spec: OptimSignature
    slot: str
    function: str
    signature: str
    docstring: str
    constraints: str
    example: dict
    warm_start_name: str
    warm_start_code: str

    def build(self, code: str, limits: SandboxLimits | None = None) -> SandboxedOptimizer:
        """Load ``code`` in a sandbox, check it with :func:`validate_update` and return the
        member, for the inner loop; the caller closes it (``member.close()``). Raises
        :class:`ProposalError` (the sandbox is then closed)."""
        member = sandboxed_optimizer(code, self.spec, limits)
        try:
            validate_update(lambda v: call_update(member.sandbox, self.spec, v), self.spec)
        except BaseException:
            member.close()
            raise
        return member


def _proposal(member: str, warm: str, example_lr: str, warm_body: str, example: dict
              ) -> OptimProposal:
    spec = SIGNATURES[member]
    head = _def_line(spec, annotate=False) + "\n"
    memory = {(True, True): "\n- Take randomness from `eps` and keep memory in `var`.",
              (True, False): "\n- Take randomness from `eps`.",
              (False, False): ""}[("eps" in spec.params, spec.recurrent)]
    return OptimProposal(
        spec=spec, slot="optimiser update", function=spec.function,
        signature=_def_line(spec), docstring=_docstring(spec, warm, example_lr),
        constraints=_CONSTRAINTS.format(memory=memory, warm=warm),
        example={**example, "code": head + example["code"]},
        warm_start_name=f"{warm} (metarl's handcrafted {warm.lower()} member, with the "
                        f"environment's tuned learning rate, annealed)",
        warm_start_code=head + warm_body)


PROPOSALS_BY_MEMBER = {
    "open": _proposal(
        "open", "Adam", "CartPole-v1: 1e-3",
        "    # Adam (eps outside the square root): m_0_9 is its first moment; var keeps\n"
        "    # the second moment, 0.999 * var + 0.001 * g * g; both are bias-corrected.\n"
        "    new_var = torch.addcmul(0.999 * var, g, g, value=0.001)\n"
        "    step_size = lr / (1 - 0.9 ** step)\n"
        "    v_hat = new_var / (1 - 0.999 ** step)\n"
        "    return step_size * m_0_9 / (torch.sqrt(v_hat) + 1e-5), new_var\n",
        {"thought": "RMSprop with a faster second moment kept in var adapts the step size "
                    "sooner than Adam; a little noise on the policy early in training "
                    "helps exploration.",
         "name": "rmsprop_with_policy_noise",
         "code": "    new_var = 0.99 * var + 0.01 * g * g\n"
                 "    v_hat = new_var / (1 - 0.99 ** step)\n"
                 "    noise = 0.1 * lr * (1 - training_proportion) * eps\n"
                 "    return lr * g / (torch.sqrt(v_hat) + 1e-5) + noise, new_var\n"}),
    "open-ff": _proposal(
        "open-ff", "SGD", "CartPole-v1: 2.5e-4",
        "    # SGD: the learning rate times the gradient.\n"
        "    return lr * g\n",
        {"thought": "Momentum smooths the noisy minibatch gradients; a little noise on the "
                    "policy early in training helps exploration.",
         "name": "momentum_with_policy_noise",
         "code": "    return lr * m_0_9 + 0.1 * lr * (1 - training_proportion) * eps\n"}),
    "no-features": _proposal(
        "no-features", "SGD", "CartPole-v1: 2.5e-4",
        "    # SGD: the learning rate times the gradient.\n"
        "    return lr * g\n",
        {"thought": "Momentum smooths the noisy minibatch gradients.",
         "name": "momentum",
         "code": "    return lr * m_0_9\n"}),
}


class OptimProposals:
    """The optimiser family's ``methods["proposal"]``: the signature differs by learned
    member, so :meth:`for_algorithm` gives the member's :class:`OptimProposal`
    (:func:`metarl.meta.propose.resolve_proposal` calls it)."""

    def __init__(self, by_member: dict[str, OptimProposal]):
        self.by_member = dict(by_member)

    def for_algorithm(self, name: str) -> OptimProposal:
        if name not in self.by_member:
            raise ValueError(f"no optimiser signature for {name!r}: proposals are written "
                             f"for one of {', '.join(self.by_member)}")
        return self.by_member[name]


PROPOSALS = OptimProposals(PROPOSALS_BY_MEMBER)
