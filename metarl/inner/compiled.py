"""Compiled pieces of the inner loop (``PPOConfig.compile``), and the loop's step functions.

With ``compile=True`` the loop runs these compiled by inductor:

* the **environment's step** (torch-native CartPole and Pendulum): the dynamics, the
  next-step auto-reset with its counter-based reset draw, the episode accounting and the
  loop's episode statistics, one graph per rollout step (:func:`rollout_step`);
* the **loss head**: the drift, the clipped value loss and the entropy from the towers'
  outputs, and their gradients with respect to those outputs, one graph per minibatch step
  (:func:`loss_head`). The towers themselves run eagerly with a hand-written backward
  (:mod:`metarl.inner.towers`); gradient clipping stays eager;
* **Adam's step**: its seven passes over the ``[P, D]`` parameters, one fused pass, on
  the CPU (:class:`metarl.families.optim.handcrafted.AdamUpdate`);
* for a **learned optimiser** in the optimiser slot, its noise draw and its network on a
  block of parameters (:class:`metarl.families.optim.learned.LearnedUpdate`, through
  :func:`cached_function`); its features stay eager.

The first three are called hundreds of times per update, and are :class:`Traced`: traced
once by ``make_fx`` and compiled by inductor, then called without TorchDynamo, whose
per-call cost (its frame hook, guards, config context and AOTAutograd's wrapper: 30-60 us
on a 2-core CPU) had been as large as the environment step's own work. The learned
optimisers' pieces, called a few times per minibatch step and costing milliseconds each,
go through ``torch.compile``.

The policy's step and the towers were measured compiled too, and were slower: their time
is batched matmuls, which inductor leaves as library calls, and their tanh, which
inductor computes with SLEEF at about a quarter of the speed of the eager kernel's MKL
(``docs/benchmarks.md`` has the figures).

Meta-training calls ``train`` thousands of times with the same shapes, so each compiled
function is built once per *key* (the configuration values it reads, the drift member,
the device, and the inputs' shapes) and kept in a small process-wide cache: the first call
with a key compiles (seconds), later calls reuse it. The same member object must fill the
slot for a hit (meta-training passes the same one every generation; its meta-parameters
are an input, not part of the key). Members whose code cannot be traced (a proposal
running in the sandbox) declare ``compilable = False`` and always run eagerly.

For the functions that do go through ``torch.compile``: functions built from one closure
share a code object, on which dynamo counts every new closure or shape against one
recompile limit (8 by default; past it, the function quietly runs eagerly); the first
build raises ``torch._dynamo.config.recompile_limit`` to twice this cache's size.

Compiled code computes the same function with fused kernels, so its floats can differ from
the eager loop's in the last bits; over a training run such differences grow as in any
chaotic system. The tests compare both paths step by step with a stated tolerance.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from metarl.inner.losses import ppo_loss, ppo_objective
from metarl.inner.towers import Towers, head_grads
from metarl.nets import population_forward, population_tower

#: compiled functions kept at once (least recently used dropped first)
MAX_ENTRIES = 32
_CACHE: OrderedDict[Hashable, Callable] = OrderedDict()
#: how many functions were built (compiled) since the process started, by kind
BUILT: dict[str, int] = {"env": 0, "loss": 0, "optim": 0, "adam": 0}


def clear() -> None:
    """Forget every compiled function (the next call with any key compiles again)."""
    _CACHE.clear()
    torch._dynamo.reset()


def _keep(key: tuple, build: Callable[[], Callable]) -> Callable:
    """``build()``, made once per ``key`` and kept in this module's cache (least recently
    used dropped first)."""
    fn = _CACHE.get(key)
    if fn is None:
        fn = _CACHE[key] = build()
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return fn


def _cached(kind: str, key: tuple, build: Callable[[], Callable]) -> Callable:
    def compile_it():
        # dynamo's per-code-object recompile limit (module docstring): allow this cache
        dynamo_config = torch._dynamo.config
        if getattr(dynamo_config, "recompile_limit", MAX_ENTRIES) < 2 * MAX_ENTRIES:
            dynamo_config.recompile_limit = 2 * MAX_ENTRIES
        BUILT[kind] += 1
        return torch.compile(build(), dynamic=False)

    return _keep((kind, *key), compile_it)


class Traced:
    """``fn`` (a function of tensors returning a tuple of tensors) compiled without
    TorchDynamo: traced once per input signature (shapes, strides, dtypes, devices) by
    ``make_fx`` on fake tensors, then compiled by inductor (``torch._inductor.compile``).

    A call through ``torch.compile`` spends 30-60 us on a 2-core CPU before its kernels
    run (dynamo's frame hook and guards, its config context, the AOTAutograd wrapper); a
    traced graph is called in about 6 us, and the signature check here adds a few more.
    That matters for functions called hundreds of times per update: the environment's
    step (each rollout step), the loss head and Adam's step (each minibatch). The graph
    for a signature assumes nothing else about its inputs: ``fn`` must be traceable whole,
    with no read of a tensor's value and no Python state that changes between calls.
    Where tracing or compiling fails, ``fn`` runs through ``torch.compile`` instead (with
    its graph breaks and guards), with a warning.

    In-place writes to inputs are kept (AOTAutograd writes them back)."""

    def __init__(self, kind: str, fn: Callable, options: dict | None = None):
        self.kind, self.fn, self.options = kind, fn, dict(options or {})
        self.graphs: dict[tuple, Callable] = {}
        self._dynamo: Callable | None = None

    @staticmethod
    def signature(args) -> tuple:
        return tuple((a.shape, a.stride(), a.dtype, a.device) for a in args)

    def _build(self, args) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        try:
            # fake inputs with a shape environment (static shapes): inductor then keys its
            # on-disk graph cache, so a later process compiles the same graph in seconds
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            mode = FakeTensorMode(shape_env=ShapeEnv())
            fake = [mode.from_tensor(a, static_shapes=True) for a in args]
            graph = make_fx(self.fn, tracing_mode="fake")(*fake)
            with torch._inductor.config.patch(self.options):
                return torch._inductor.compile(graph, fake)
        except Exception as e:  # noqa: BLE001 - any failure to trace: the dynamo path
            import warnings

            warnings.warn(f"metarl: the {self.kind} function could not be traced whole "
                          f"({type(e).__name__}: {e}); it runs through torch.compile",
                          RuntimeWarning, stacklevel=3)
            if self._dynamo is None:
                self._dynamo = torch.compile(self.fn, dynamic=False)
            return self._dynamo

    def __call__(self, *args):
        sig = self.signature(args)
        graph = self.graphs.get(sig)
        if graph is None:
            graph = self.graphs[sig] = self._build(args)
            BUILT[self.kind] += 1
        return graph(*args)


def traced(kind: str, key: tuple, build: Callable[[], Callable],
           options: dict | None = None) -> Traced:
    """:class:`Traced` of ``build()`` (compiled with inductor ``options``), made once per
    ``(kind, *key)`` and kept in this module's cache (its graphs with it)."""
    return _keep(("traced", kind, *key), lambda: Traced(kind, build(), options))


def cached_function(kind: str, key: tuple, build: Callable[[], Callable]) -> Callable:
    """``torch.compile(build())``, built once per ``(kind, *key)`` and kept in this
    module's cache (for pieces compiled elsewhere: the learned optimisers' step)."""
    return _cached(kind, key, build)


def _structure(model, config, device) -> tuple:
    """What the forward's code depends on: the towers' shapes and activation."""
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return (shapes, config.activation, config.fused, model.discrete, str(device))


def policy_step(model, layout, config) -> Callable:
    """``fn(weights, obs, noise, log_std, low, high) -> (action, env_action, out)`` for
    one rollout step of the population (``obs [P, N, obs_dim]``, ``noise [P, N, A]``;
    ``out [P, N, A]`` is the actor's output, from which the loop takes the actions'
    log-probabilities for the whole rollout at once);
    ``weights`` is :meth:`metarl.inner.towers.Towers.actor_weights` of the parameters (the
    parameters themselves with ``fused=False``); ``log_std``, ``low`` and ``high`` are None
    for a discrete policy. It runs eagerly: compiled, it measured slower (its batched
    matmuls are library calls either way, and the graph adds guards and copies)."""
    discrete, clip, fused = model.discrete, bool(config.clip_action), config.fused
    towers = Towers(model, layout)

    def fn(weights, obs, noise, log_std, low, high):
        out = (towers.act(weights, obs) if fused else
               population_tower(model, layout, weights, "actor", obs, fused=False))
        P, N = out.shape[0], out.shape[1]
        if discrete:
            action = torch.argmax(out + noise, dim=-1)
            env_action = action.reshape(P * N)
        else:
            action = out + torch.exp(log_std).unsqueeze(1) * noise
            env_action = torch.nan_to_num(action.reshape(P * N, -1))
            if clip:
                env_action = torch.maximum(torch.minimum(env_action, high), low)
        return action, env_action, out

    return fn


def rollout_step(model, layout, config, env, device, compile: bool = True) -> Callable:
    """``fn(env, weights, obs, noise, log_std, low, high, ep_sum, ep_count, last_return) ->
    (action, out, next_obs, reward, terminated, done, valid, ep_sum, ep_count,
    last_return)``: one step of the rollout for the population, the policy acting
    (:func:`policy_step`) and ``env`` stepping, every result shaped ``[P, N, ...]``. The
    episode statistics come in and go out updated: the sum and count of the returns of
    episodes that ended, and each environment's last ended episode's return.

    With ``compile`` and an environment that can be traced (the torch-native CartPole and
    Pendulum, :attr:`metarl.envs.base.VecEnv.traceable`), the environment's step and the
    episode statistics are one compiled graph: a few fused kernels instead of about two
    hundred small operations. Other environments step eagerly and check the actions. The
    observation returned is the environment's own where it is a fresh tensor
    (:attr:`metarl.envs.base.VecEnv.fresh_obs`), otherwise a copy (envpool may reuse its
    buffer)."""
    traced = compile and env.traceable
    policy = policy_step(model, layout, config)

    def env_step(stepper, copy_obs):
        def fn(env, env_action, P, N, ep_sum, ep_count, last_return):
            step = stepper(env, env_action)
            next_obs = step.obs.reshape(P, N, -1)
            done = step.done.reshape(P, N)
            ep_ret = step.episode_return.reshape(P, N)
            return (next_obs.clone() if copy_obs else next_obs, step.reward.reshape(P, N),
                    step.terminated.reshape(P, N), done, step.valid.reshape(P, N),
                    ep_sum + ep_ret, ep_count + done, torch.where(done, ep_ret, last_return))

        return fn

    if traced:
        env.prepare_trace()
        names = tuple(n for n, v in vars(env).items() if isinstance(v, torch.Tensor))
        rest = tuple(sorted((n, repr(v)) for n, v in vars(env).items()
                            if not isinstance(v, torch.Tensor)))
        stepper = _keep(("env-step", type(env), names, rest, str(device)),
                        lambda: _EnvStep(names, env_step(type(env).step_unchecked, False)))
    else:
        stepper = env_step(type(env).step, not env.fresh_obs)

    def fn(env, weights, obs, noise, log_std, low, high, ep_sum, ep_count, last_return):
        action, env_action, out = policy(weights, obs, noise, log_std, low, high)
        P, N = out.shape[0], out.shape[1]
        return (action, out, *stepper(env, env_action, P, N, ep_sum, ep_count, last_return))

    return fn


class _EnvStep:
    """The environment's step as a :class:`Traced` function of tensors: the environment's
    tensor attributes (``names``: its state, counters and keys) go in and come out with
    the step's results, and are set back on the environment after the call. While
    tracing, the environment's attributes are the traced ones."""

    def __init__(self, names: tuple[str, ...], step: Callable):
        self.names, self.env = names, None
        k = len(names)

        def pure(*args):
            env = self.env
            saved = {n: getattr(env, n) for n in names}
            try:
                for n, t in zip(names, args[:k]):
                    setattr(env, n, t)
                action, ep_sum, ep_count, last_return = args[k:]
                P, N = ep_sum.shape
                outs = step(env, action, P, N, ep_sum, ep_count, last_return)
                return (*(getattr(env, n) for n in names), *outs)
            finally:
                for n, t in saved.items():
                    setattr(env, n, t)

        # inductor otherwise inlines the reset draw's hash chain into every use, and its
        # code generation for this graph took 15-20 s (5-10 s with this threshold) for no
        # faster step
        self.traced = Traced("env", pure, {"realize_opcount_threshold": 16})

    def __call__(self, env, env_action, P, N, ep_sum, ep_count, last_return):
        names = self.names
        self.env = env
        try:
            res = self.traced(*[getattr(env, n) for n in names], env_action, ep_sum, ep_count,
                              last_return)
        finally:
            self.env = None
        for n, t in zip(names, res):
            setattr(env, n, t)
        return tuple(res[len(names):])


def minibatch_loss(model, layout, config, drift, log_std_slice, needs_taps: bool
                   ) -> Callable:
    """``fn(params, meta, obs, act, logp_old, val_old, adv, ret, valid) -> (loss [P],
    taps)``: :func:`~metarl.inner.losses.ppo_loss` for a minibatch through the whole
    network, for autograd to differentiate with respect to ``params`` (the loop's path
    with ``fused=False``, and the reference the hand-written backward is tested against);
    ``taps`` holds the per-layer activations when the optimiser reads them (else None)."""
    coefs = _coefs(config)
    fused = config.fused

    def forward(flat, obs, taps=None):
        return population_forward(model, layout, flat, obs, fused=fused, taps=taps)

    def fn(params, meta, obs, act, logp_old, val_old, adv, ret, valid):
        taps = {} if needs_taps else None
        loss = ppo_loss(coefs, drift, meta, forward, params, log_std_slice, obs, act,
                        logp_old, val_old, adv, ret, valid, taps)
        return loss, taps

    return fn


def _coefs(config):
    return types.SimpleNamespace(clip_eps=config.clip_eps, vf_coef=config.vf_coef,
                                 ent_coef=config.ent_coef)


class LossHead:
    """The loss head of a minibatch step: ``head(out, value, log_std, meta, act, logp_old,
    val_old, adv, ret, valid) -> loss [P]`` (:func:`~metarl.inner.losses.ppo_objective`
    from the towers' outputs; ``log_std`` is None for a discrete policy), and
    :meth:`loss_and_grads`, the loss with its gradients with respect to ``out``,
    ``value`` and ``log_std``, which the towers' hand-written backward takes from there
    (:meth:`metarl.inner.towers.Towers.loss_and_grads`)."""

    def __init__(self, fn: Callable, joint: Traced | None = None):
        self.fn, self.joint = fn, joint

    def __call__(self, *args):
        return self.fn(*args)

    def loss_and_grads(self, out, value, log_std, *batch):
        """``(loss [P], d out, d value, d log_std or None)`` of the summed loss."""
        if self.joint is not None:
            args = (out, value) if log_std is None else (out, value, log_std)
            res = self.joint(*args, *batch)
            return (*res, None) if log_std is None else tuple(res)
        return head_grads(self.fn, out, value, log_std, batch)


def loss_head(config, drift, discrete: bool, device, compile: bool = True) -> LossHead:
    """The :class:`LossHead` of a drift: with ``compile`` (unless the drift is not
    ``compilable``), its loss and gradients are one traced graph (:class:`Traced`), built
    once per configuration, drift and shapes; else autograd runs eagerly."""
    coefs = _coefs(config)

    def fn(out, value, log_std, meta, act, logp_old, val_old, adv, ret, valid):
        return ppo_objective(coefs, drift, meta, out, value, log_std, act, logp_old,
                             val_old, adv, ret, valid)

    if not (compile and getattr(drift, "compilable", True)):
        return LossHead(fn)

    def build():
        def joint(out, value, *rest):
            log_std, batch = (None, rest) if discrete else (rest[0], rest[1:])
            return head_grads(fn, out, value, log_std, batch)[:3 if discrete else 4]

        return joint

    key = (drift.compile_key(), config.clip_eps, config.vf_coef, config.ent_coef, discrete,
           str(device))
    return LossHead(fn, traced("loss", key, build))


__all__ = ["policy_step", "rollout_step", "minibatch_loss", "loss_head", "LossHead",
           "Traced", "traced", "clear", "MAX_ENTRIES", "BUILT", "cached_function"]
