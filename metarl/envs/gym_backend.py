"""Gymnasium backend: the slow fallback for ids that envpool and torch-native lack."""

from __future__ import annotations

import numpy as np
import torch

from metarl.envs.base import VecEnv
from metarl.envs.spec import EnvSpec


def gymnasium_ids() -> frozenset[str]:
    try:
        import gymnasium
    except ImportError:  # an install without gymnasium (a GPU image) has the other backends
        return frozenset()
    return frozenset(gymnasium.registry.keys())


class GymnasiumEnv(VecEnv):
    def __init__(self, env_id: str, num_envs: int, env_seeds: list[int], device):
        import gymnasium

        try:
            self._vec = gymnasium.vector.SyncVectorEnv(
                [lambda: gymnasium.make(env_id) for _ in range(num_envs)],
                autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP,
            )
        except (ImportError, gymnasium.error.Error) as e:
            raise ValueError(f"{env_id} is registered in gymnasium but cannot be made here "
                             f"({type(e).__name__}: {e}); pick another id") from None
        obs_space = self._vec.single_observation_space
        act_space = self._vec.single_action_space
        if not hasattr(obs_space, "shape") or obs_space.shape is None:
            raise ValueError(f"{env_id}: observation space {obs_space} is not a Box")
        max_steps = getattr(self._vec.envs[0].spec, "max_episode_steps", None)
        if hasattr(act_space, "n"):
            spec = EnvSpec(env_id, "gymnasium", tuple(obs_space.shape),
                           num_actions=int(act_space.n), max_episode_steps=max_steps)
        else:
            spec = EnvSpec(
                env_id, "gymnasium", tuple(obs_space.shape),
                action_shape=tuple(act_space.shape),
                action_low=tuple(float(x) for x in act_space.low.reshape(-1)),
                action_high=tuple(float(x) for x in act_space.high.reshape(-1)),
                max_episode_steps=max_steps,
            )
        super().__init__(spec, num_envs, device)
        self._seeds = [int(s) for s in env_seeds]

    def _reset(self) -> torch.Tensor:
        obs, _ = self._vec.reset(seed=self._seeds)
        return torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)

    def _step(self, actions: torch.Tensor):
        a = actions.detach().cpu().numpy()
        obs, reward, term, trunc, _ = self._vec.step(a)
        dev = self.device
        return (
            torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=dev),
            torch.as_tensor(reward, dtype=torch.float32, device=dev),
            torch.as_tensor(term, dtype=torch.bool, device=dev),
            torch.as_tensor(trunc, dtype=torch.bool, device=dev),
        )

    def close(self) -> None:
        self._vec.close()
