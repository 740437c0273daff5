"""The mathematics of one PPO update, population first: the policy's log-probabilities,
generalised advantage estimates, the PPO loss with a drift as the policy objective's
regulariser, and gradient clipping. Pure functions of tensors, shared by the eager and the
compiled loops (:mod:`metarl.inner.compiled`)."""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def policy_logp(out: torch.Tensor, log_std: torch.Tensor | None, actions: torch.Tensor,
            entropy: bool = True):
    """Log-probability of ``actions`` and (unless ``entropy=False``, as when acting)
    the entropy, for logits or Gaussian means."""
    if log_std is None:
        logp_all = torch.log_softmax(out, dim=-1)
        logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)
    ls = log_std.unsqueeze(1)  # [P, 1, A]
    z = (actions - out) * torch.exp(-ls)
    logp = (-0.5 * z * z - ls - _LOG_SQRT_2PI).sum(-1)
    return logp, ((ls + 0.5 + _LOG_SQRT_2PI).sum(-1).expand_as(logp) if entropy else None)


def gae(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor,
        done: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates ``[P, T, N]`` of a rollout with next-step auto-reset.

    ``rewards``, ``terminated`` and ``done`` (terminated or truncated) are ``[P, T, N]``;
    ``values [P, T + 1, N]`` holds the critic's value of each step's observation and of the
    observation after the last step. With next-step auto-reset, the observation after a
    step that ended an episode is that episode's final observation, so:
    ``delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)`` (a truncated
    episode bootstraps from its final observation) and ``A_t = delta_t + gamma * lam *
    (1 - done_t) * A_{t+1}`` (no advantage flows across an episode's end). Steps in which
    an environment reset (``valid`` false) get an estimate too; the loss masks them out.
    """
    T = rewards.shape[1]
    not_term = (~terminated).to(values.dtype)
    # Every step's delta and discount at once (elementwise, so the same floats as step by
    # step); the recursion is then two operations per step, written in place.
    out = rewards + gamma * values[:, 1:] * not_term - values[:, :T]  # delta, then A
    decay = (~done).to(values.dtype).mul_(gamma * lam)
    tmp = torch.empty_like(out[:, 0])
    for t in range(T - 2, -1, -1):
        torch.mul(decay[:, t], out[:, t + 1], out=tmp)
        out[:, t] += tmp
    return out


def clip_grads(grads: torch.Tensor, max_norm: float,
               actor_mask: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """Gradients ``[P, D]`` scaled to a global norm of at most ``max_norm`` per member;
    with ``actor_mask [D]``, the actor's and the critic's entries separately. With
    ``inplace``, ``grads`` itself is scaled and returned."""
    if actor_mask is None:
        norm = grads.norm(dim=1, keepdim=True)
        scale = max_norm / torch.clamp(norm, min=max_norm)
        return grads.mul_(scale) if inplace else grads * scale
    a = actor_mask.to(grads.dtype)
    na = (grads * a).norm(dim=1, keepdim=True)
    nc = (grads * (1.0 - a)).norm(dim=1, keepdim=True)
    scale = torch.where(actor_mask, max_norm / torch.clamp(na, min=max_norm),
                        max_norm / torch.clamp(nc, min=max_norm))
    return grads.mul_(scale) if inplace else grads * scale


def ppo_loss(config, drift, meta, forward, params, log_std_slice, obs, act, logp_old,
              val_old, adv, ret, valid, taps=None):
    """PPO loss per member ``[P]`` with the drift as the policy objective's regulariser.
    ``taps``, when a dict, receives the per-layer activations of this forward pass."""
    out, value = forward(params, obs, taps) if taps is not None else forward(params, obs)
    log_std = params[:, log_std_slice] if log_std_slice else None
    return ppo_objective(config, drift, meta, out, value, log_std, act, logp_old, val_old,
                         adv, ret, valid)


def ppo_objective(config, drift, meta, out, value, log_std, act, logp_old, val_old, adv,
                  ret, valid):
    """The PPO loss per member ``[P]`` from the networks' outputs: ``out [P, B, A]`` (logits
    or Gaussian means), ``value [P, B]`` and ``log_std [P, A]`` (None for a discrete
    policy). Steps with ``valid`` zero are left out of every mean, including the per-
    minibatch advantage normalisation."""
    logp, entropy = policy_logp(out, log_std, act)
    w = valid
    wsum = w.sum(dim=1).clamp(min=1.0)

    def mean(x):
        return (x * w).sum(dim=1) / wsum

    mu = mean(adv).unsqueeze(1)
    std = torch.sqrt(mean((adv - mu) ** 2)).unsqueeze(1)
    adv = (adv - mu) / (std + 1e-8)
    ratio = torch.exp(logp - logp_old)
    drift_value = drift.population(meta, ratio, adv, config.clip_eps)
    actor_loss = -mean(ratio * adv - drift_value)
    v_clipped = val_old + (value - val_old).clamp(-config.clip_eps, config.clip_eps)
    value_loss = 0.5 * mean(torch.maximum((value - ret) ** 2, (v_clipped - ret) ** 2))
    return actor_loss + config.vf_coef * value_loss - config.ent_coef * mean(entropy)


__all__ = ["policy_logp", "gae", "ppo_loss", "ppo_objective", "clip_grads"]
