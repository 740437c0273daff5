"""Compiled pieces of the inner loop (``PPOConfig.compile``).

With ``compile=True`` the loop runs two functions through ``torch.compile`` (inductor):

* the **policy step** of the rollout: the actor's forward for the whole population, the
  action from the pre-drawn noise, and its log-probability, one call per environment step;
* the **minibatch loss**: both towers' forward, the drift, the clipped value loss and the
  entropy bonus (the backward pass is compiled with it by AOTAutograd); gradient clipping
  and the optimiser step stay eager, since the optimisers read the step counters as
  Python numbers.

Meta-training calls ``train`` thousands of times with the same shapes, so each compiled
function is built once per *key* (the shapes, the configuration values it reads, the
drift member and the device) and kept in a small process-wide cache: the first call with a
key compiles (seconds), later calls reuse it. The same member object must fill the slot
for a hit (meta-training passes the same one every generation; its meta-parameters are an
input, not part of the key). Members whose code cannot be traced (a proposal running in
the sandbox) declare ``compilable = False`` and always run eagerly.

Compiled code computes the same function with fused kernels, so its floats can differ from
the eager loop's in the last bits; over a training run such differences grow as in any
chaotic system. The tests compare both paths step by step with a stated tolerance.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from metarl.inner.losses import policy_logp, ppo_loss
from metarl.nets import population_forward, population_tower

#: compiled functions kept at once (least recently used dropped first)
MAX_ENTRIES = 32
_CACHE: OrderedDict[Hashable, Callable] = OrderedDict()
#: how many functions were built (compiled) since the process started, by kind
BUILT: dict[str, int] = {"policy": 0, "loss": 0}


def clear() -> None:
    """Forget every compiled function (the next call with any key compiles again)."""
    _CACHE.clear()
    torch._dynamo.reset()


def _cached(kind: str, key: tuple, build: Callable[[], Callable]) -> Callable:
    key = (kind, *key)
    fn = _CACHE.get(key)
    if fn is None:
        fn = _CACHE[key] = torch.compile(build(), dynamic=False)
        BUILT[kind] += 1
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return fn


def _structure(model, config, device) -> tuple:
    """What the forward's code depends on: the towers' shapes and activation."""
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return (shapes, config.activation, config.fused, model.discrete, str(device))


def policy_step(model, layout, config, device, compile: bool = True) -> Callable:
    """``fn(params, obs, noise, log_std, low, high) -> (action, env_action, logp)`` for
    one rollout step of the population (``obs [P, N, obs_dim]``, ``noise [P, N, A]``);
    ``log_std``, ``low`` and ``high`` are None for a discrete policy. The same code runs
    eagerly with ``compile=False``."""
    discrete, clip, fused = model.discrete, bool(config.clip_action), config.fused

    def build():
        def fn(params, obs, noise, log_std, low, high):
            out = population_tower(model, layout, params, "actor", obs, fused=fused)
            P, N = out.shape[0], out.shape[1]
            if discrete:
                action = torch.argmax(out + noise, dim=-1)
                env_action = action.reshape(P * N)
            else:
                action = out + torch.exp(log_std).unsqueeze(1) * noise
                env_action = torch.nan_to_num(action.reshape(P * N, -1))
                if clip:
                    env_action = torch.maximum(torch.minimum(env_action, high), low)
            logp, _ = policy_logp(out, log_std, action, entropy=False)
            return action, env_action, logp

        return fn

    if not compile:
        return build()
    return _cached("policy", (_structure(model, config, device), clip), build)


def minibatch_loss(model, layout, config, drift, log_std_slice, needs_taps: bool,
                   device, compile: bool = True) -> Callable:
    """``fn(params, meta, obs, act, logp_old, val_old, adv, ret, valid) -> (loss [P],
    taps)``: :func:`~metarl.inner.losses.ppo_loss` for a minibatch, ``taps`` the
    per-layer activations when the optimiser reads them (else None). The same code runs
    eagerly with ``compile=False`` or a drift that is not ``compilable``."""
    coefs = types.SimpleNamespace(clip_eps=config.clip_eps, vf_coef=config.vf_coef,
                                  ent_coef=config.ent_coef)
    fused = config.fused

    def build():
        def forward(flat, obs, taps=None):
            return population_forward(model, layout, flat, obs, fused=fused, taps=taps)

        def fn(params, meta, obs, act, logp_old, val_old, adv, ret, valid):
            taps = {} if needs_taps else None
            loss = ppo_loss(coefs, drift, meta, forward, params, log_std_slice, obs, act,
                            logp_old, val_old, adv, ret, valid, taps)
            return loss, taps

        return fn

    if not (compile and getattr(drift, "compilable", True)):
        return build()
    log_std = (log_std_slice.start, log_std_slice.stop) if log_std_slice else None
    key = (_structure(model, config, device), drift.compile_key(), config.clip_eps, config.vf_coef,
           config.ent_coef, log_std, needs_taps)
    return _cached("loss", key, build)


__all__ = ["policy_step", "minibatch_loss", "clear", "MAX_ENTRIES", "BUILT"]
