"""envpool backend: C++ vectorised environments, zero-copy numpy <-> torch on CPU."""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from metarl.envs.base import VecEnv
from metarl.envs.spec import EnvSpec


@lru_cache(maxsize=1)
def envpool_ids() -> frozenset[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gymnasium's float32 precision notices
            import envpool
    except ImportError:  # pragma: no cover - envpool is a hard dependency on Linux
        return frozenset()
    return frozenset(envpool.list_all_envs())


def _make_pool(env_id: str, num_envs: int, env_seeds: list[int]):
    import envpool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium's float32 precision notices
        return envpool.make(
            env_id,
            env_type="gymnasium",
            num_envs=num_envs,
            seed=int(env_seeds[0]),
            env_seed=[int(s) for s in env_seeds],
        )


class EnvpoolEnv(VecEnv):
    def __init__(self, env_id: str, num_envs: int, env_seeds: list[int], device):
        pool = _make_pool(env_id, num_envs, env_seeds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs_space, act_space = pool.observation_space, pool.action_space
        self._dict_obs = hasattr(obs_space, "spaces")
        if self._dict_obs:
            # MiniGrid: the egocentric image, flattened, and the direction as a one-hot.
            self._ndir = int(obs_space["direction"].n) if "direction" in obs_space.spaces else 0
            obs_shape = (int(np.prod(obs_space["image"].shape)) + self._ndir,)
        else:
            obs_shape = tuple(obs_space.shape)
        max_steps = getattr(pool.spec.config, "max_episode_steps", None)
        if hasattr(act_space, "n"):
            spec = EnvSpec(env_id, "envpool", obs_shape, num_actions=int(act_space.n),
                           max_episode_steps=max_steps)
        else:
            spec = EnvSpec(
                env_id, "envpool", obs_shape,
                action_shape=tuple(act_space.shape),
                action_low=tuple(float(x) for x in np.broadcast_to(act_space.low, act_space.shape)),
                action_high=tuple(
                    float(x) for x in np.broadcast_to(act_space.high, act_space.shape)
                ),
                max_episode_steps=max_steps,
            )
        super().__init__(spec, num_envs, device)
        self._pool = pool
        self._act_dtype = np.int32 if spec.discrete else np.float64

    def _obs(self, obs) -> torch.Tensor:
        if self._dict_obs:
            img = torch.from_numpy(obs["image"]).reshape(self.num_envs, -1).float()
            parts = [img]
            if self._ndir:
                parts.append(torch.nn.functional.one_hot(
                    torch.from_numpy(obs["direction"]).long(), self._ndir).float())
            t = torch.cat(parts, dim=1)
        else:
            t = torch.from_numpy(obs)
            if t.dtype != torch.float32:
                t = t.float()
        return t.to(self.device, non_blocking=True)

    def _reset(self) -> torch.Tensor:
        obs, _ = self._pool.reset()
        return self._obs(obs)

    def _step(self, actions: torch.Tensor):
        a = actions.detach().cpu().numpy().astype(self._act_dtype, copy=False)
        obs, reward, term, trunc, _ = self._pool.step(a)
        dev = self.device
        return (
            self._obs(obs),
            torch.from_numpy(reward).to(dev, torch.float32),
            torch.from_numpy(term).to(dev),
            torch.from_numpy(trunc).to(dev),
        )

    def close(self) -> None:
        self._pool.close()
