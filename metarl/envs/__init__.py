"""Vectorised environments that speak torch tensors.

``make(env_id, num_envs, seed, device)`` picks a backend: envpool for every id it has, the
torch-native batched environments (``backend="torch"``), or gymnasium's vector env as the
slow fallback. All backends share envpool's next-step auto-reset (see
:mod:`metarl.envs.base`).
"""

from __future__ import annotations

import difflib

import torch

from metarl.envs.base import Step, VecEnv
from metarl.envs.envpool_backend import EnvpoolEnv, envpool_ids
from metarl.envs.gym_backend import GymnasiumEnv, gymnasium_ids
from metarl.envs.spec import EnvSpec
from metarl.envs.torch_backend import TORCH_ENVS

__all__ = ["make", "list_envs", "backends_for", "env_seeds", "spec_of", "EnvSpec", "Step",
           "VecEnv"]

BACKENDS = ("auto", "envpool", "torch", "gymnasium")
# The order "auto" tries backends in.
AUTO_ORDER = ("envpool", "torch", "gymnasium")


def env_seeds(seed: int, num_envs: int) -> list[int]:
    """The seeds of the ``num_envs`` environments that belong to a member with ``seed``.

    They depend only on ``(seed, index)``, so a member's environments are the same whether it
    trains alone or in a population.
    """
    from metarl import rng

    keys = rng.fold(rng.seed_keys([int(seed)]), 0xE5)
    s = rng.bits(keys, (num_envs,))[0] & 0x7FFFFFFF
    return [int(x) for x in s.tolist()]


def backends_for(env_id: str) -> list[str]:
    """The backends that provide ``env_id``, in the order ``backend="auto"`` tries them."""
    found = []
    for b in AUTO_ORDER:
        if b == "envpool" and env_id in envpool_ids():
            found.append(b)
        elif b == "torch" and env_id in TORCH_ENVS:
            found.append(b)
        elif b == "gymnasium" and env_id in gymnasium_ids():
            found.append(b)
    return found


def list_envs() -> dict[str, list[str]]:
    """Every known id, mapped to the backends that provide it."""
    ids = set(envpool_ids()) | set(TORCH_ENVS) | set(gymnasium_ids())
    return {i: backends_for(i) for i in sorted(ids)}


def _unknown(env_id: str) -> ValueError:
    known = sorted(set(envpool_ids()) | set(TORCH_ENVS) | set(gymnasium_ids()))
    close = difflib.get_close_matches(env_id, known, n=5, cutoff=0.5)
    hint = f" Closest known ids: {', '.join(close)}." if close else ""
    return ValueError(
        f"unknown environment id {env_id!r}.{hint} Run `metarl envs` to list every id."
    )


def check_env_id(env_id: str, backend: str = "auto", device="cpu") -> str:
    """Return the backend that will serve ``env_id``, or raise a helpful ValueError.

    ``"auto"`` takes envpool when it has the id, except on an accelerator, where a
    torch-native environment (which steps on the device, without a host round trip) is
    preferred when there is one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    found = backends_for(env_id)
    if not found:
        raise _unknown(env_id)
    if backend == "auto":
        if torch.device(device).type != "cpu" and "torch" in found:
            return "torch"
        return found[0]
    if backend not in found:
        raise ValueError(
            f"backend {backend!r} does not provide {env_id!r}; it is available from: "
            f"{', '.join(found)}"
        )
    return backend


def make(
    env_id: str,
    num_envs: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    seeds: list[int] | None = None,
) -> VecEnv:
    """A vectorised environment of ``num_envs`` copies of ``env_id`` on ``device``.

    Args:
        env_id: e.g. ``"CartPole-v1"``; ``metarl envs`` lists them all.
        num_envs: number of parallel environments (positive).
        seed: seeds the environments through :func:`env_seeds` unless ``seeds`` is given.
        device: where observations, rewards and flags are returned.
        backend: ``"auto"`` (envpool, then torch-native, then gymnasium; torch-native first
            on an accelerator), or one of them.
        seeds: one seed per environment, overriding ``seed``.
    """
    if not isinstance(num_envs, int) or num_envs <= 0:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    chosen = check_env_id(env_id, backend, device)
    if seeds is None:
        seeds = env_seeds(seed, num_envs)
    if len(seeds) != num_envs:
        raise ValueError(f"got {len(seeds)} seeds for {num_envs} environments")
    if chosen == "envpool":
        return EnvpoolEnv(env_id, num_envs, seeds, device)
    if chosen == "torch":
        return TORCH_ENVS[env_id](num_envs, seeds, device)
    return GymnasiumEnv(env_id, num_envs, seeds, device)


def spec_of(env_id: str, backend: str = "auto") -> EnvSpec:
    """The :class:`EnvSpec` of ``env_id`` (from a one-environment instance)."""
    env = make(env_id, 1, backend=backend)
    try:
        return env.spec
    finally:
        env.close()


def random_return(env_id: str, episodes_per_env: int = 8, num_envs: int = 64, seed: int = 0,
                  backend: str = "auto", max_steps: int = 1_000_000) -> float:
    """The mean return of a uniformly random policy on ``env_id`` (actions uniform over the
    discrete actions, or over the box): the first ``episodes_per_env`` episodes of each of
    ``num_envs`` environments seeded by ``seed`` (the same number from each, so that short
    episodes are not over-represented). A random policy scores 0 and the PPO reference 1
    in :func:`metarl.configs.normalized_return`; the configurations store the values this
    measures."""
    env = make(env_id, num_envs, seed=seed, backend=backend)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(num_envs, dtype=torch.float64)
    count = torch.zeros(num_envs, dtype=torch.int64)
    try:
        env.reset()
        spec = env.spec
        if not spec.discrete:
            low, high = spec.action_bounds()
        for _ in range(max_steps):
            if spec.discrete:
                a = torch.randint(0, spec.num_actions, (num_envs,), generator=g)
            else:
                a = low + (high - low) * torch.rand(num_envs, *spec.action_shape, generator=g)
            step = env.step(a)
            keep = (step.done & step.valid).cpu() & (count < episodes_per_env)
            total += torch.where(keep, step.episode_return.cpu().double(), 0.0)
            count += keep
            if bool((count >= episodes_per_env).all()):
                break
    finally:
        env.close()
    if int(count.sum()) == 0:
        raise ValueError(f"{env_id}: no episode ended in {max_steps} steps of a random policy")
    return float(total.sum() / count.sum())
