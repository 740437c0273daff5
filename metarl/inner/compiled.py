"""Compiled pieces of the inner loop (``PPOConfig.compile``), and the loop's step functions.

With ``compile=True`` the loop runs these through ``torch.compile`` (inductor):

* the **environment's step** (torch-native CartPole and Pendulum): the dynamics, the
  next-step auto-reset with its counter-based reset draw, the episode accounting and the
  loop's episode statistics, one compiled graph per rollout step (:func:`rollout_step`);
* the **loss head**: the drift, the clipped value loss and the entropy from the towers'
  outputs, with its backward compiled by AOTAutograd (:func:`loss_head`). The towers
  themselves run eagerly with a hand-written backward (:mod:`metarl.inner.towers`);
  gradient clipping and the optimiser step stay eager, since the optimisers read the step
  counters as Python numbers;
* for a **learned optimiser** in the optimiser slot, its noise draw and its network on a
  block of parameters (:class:`metarl.families.optim.learned.LearnedUpdate`, through
  :func:`cached_function`); its features stay eager.

The policy's step and the towers were measured compiled too, and were slower: their time
is batched matmuls, which inductor leaves as library calls, and the graph adds guards and
copies around them (``docs/benchmarks.md`` has the figures).

Meta-training calls ``train`` thousands of times with the same shapes, so each compiled
function is built once per *key* (the shapes, the configuration values it reads, the
drift member and the device) and kept in a small process-wide cache: the first call with a
key compiles (seconds), later calls reuse it. The same member object must fill the slot
for a hit (meta-training passes the same one every generation; its meta-parameters are an
input, not part of the key). Members whose code cannot be traced (a proposal running in
the sandbox) declare ``compilable = False`` and always run eagerly.

Functions built from one closure share a code object, on which dynamo counts every new
closure or shape against one recompile limit (8 by default; past it, the function quietly
runs eagerly); the first build raises ``torch._dynamo.config.recompile_limit`` to twice
this cache's size.

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
from metarl.inner.towers import Towers
from metarl.nets import population_forward, population_tower

#: compiled functions kept at once (least recently used dropped first)
MAX_ENTRIES = 32
_CACHE: OrderedDict[Hashable, Callable] = OrderedDict()
#: how many functions were built (compiled) since the process started, by kind
BUILT: dict[str, int] = {"env": 0, "loss": 0, "optim": 0}


def clear() -> None:
    """Forget every compiled function (the next call with any key compiles again)."""
    _CACHE.clear()
    torch._dynamo.reset()


def _cached(kind: str, key: tuple, build: Callable[[], Callable]) -> Callable:
    key = (kind, *key)
    fn = _CACHE.get(key)
    if fn is None:
        # dynamo's per-code-object recompile limit (module docstring): allow this cache
        dynamo_config = torch._dynamo.config
        if getattr(dynamo_config, "recompile_limit", MAX_ENTRIES) < 2 * MAX_ENTRIES:
            dynamo_config.recompile_limit = 2 * MAX_ENTRIES
        fn = _CACHE[key] = torch.compile(build(), dynamic=False)
        BUILT[kind] += 1
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return fn


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
        stepper = _cached("env", (type(env), str(device)),
                          lambda: env_step(type(env).step_unchecked, False))
    else:
        stepper = env_step(type(env).step, not env.fresh_obs)

    def fn(env, weights, obs, noise, log_std, low, high, ep_sum, ep_count, last_return):
        action, env_action, out = policy(weights, obs, noise, log_std, low, high)
        P, N = out.shape[0], out.shape[1]
        return (action, out, *stepper(env, env_action, P, N, ep_sum, ep_count, last_return))

    return fn


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


def loss_head(config, drift, discrete: bool, device, compile: bool = True) -> Callable:
    """``fn(out, value, log_std, meta, act, logp_old, val_old, adv, ret, valid) -> loss
    [P]``: :func:`~metarl.inner.losses.ppo_objective` from the towers' outputs (the part of
    the minibatch loss that autograd differentiates; the towers have a hand-written
    backward, :mod:`metarl.inner.towers`). Compiled with ``compile`` unless the drift is
    not ``compilable``."""
    coefs = _coefs(config)

    def build():
        def fn(out, value, log_std, meta, act, logp_old, val_old, adv, ret, valid):
            return ppo_objective(coefs, drift, meta, out, value, log_std, act, logp_old,
                                 val_old, adv, ret, valid)

        return fn

    if not (compile and getattr(drift, "compilable", True)):
        return build()
    key = (drift.compile_key(), config.clip_eps, config.vf_coef, config.ent_coef, discrete,
           str(device))
    return _cached("loss", key, build)


__all__ = ["policy_step", "rollout_step", "minibatch_loss", "loss_head",
           "clear", "MAX_ENTRIES", "BUILT", "cached_function"]
