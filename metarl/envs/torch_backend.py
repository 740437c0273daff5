"""Torch-native batched environments: classic control written as tensor operations.

They run on the agents' device (no host round trip on CUDA), follow the same next-step
auto-reset as envpool, and draw their reset states from :mod:`metarl.rng` keyed by each
environment's seed, so an environment's episodes depend only on its own seed. Dynamics and
constants follow gymnasium's ``CartPole-v1`` and ``Pendulum-v1``. The MinAtar games
(:mod:`metarl.envs.minatar`) are registered here too.
"""

from __future__ import annotations

import math

import torch

from metarl import rng
from metarl.envs.base import VecEnv
from metarl.envs.spec import EnvSpec


class _TorchEnv(VecEnv):
    max_steps: int
    #: reset states drawn ahead per environment (one draw serves this many resets)
    block = 32
    traceable = True
    fresh_obs = True
    #: draw every environment's next initial state each step (no host read), as off the
    #: CPU; set by :meth:`prepare_trace`
    direct_resets = False

    def __init__(self, spec: EnvSpec, num_envs: int, env_seeds: list[int], device):
        super().__init__(spec, num_envs, device)
        self._keys = rng.seed_keys(env_seeds, device=self.device)
        self._env_index = torch.arange(num_envs, device=self.device)
        self._resets = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self._draw_block(torch.zeros(num_envs, dtype=torch.int64, device=self.device))
        self.state = self._next_initial()

    def _draw_block(self, start: torch.Tensor) -> None:
        """Draw the initial states of resets ``start .. start + block - 1`` of every env.

        The r-th initial state of an environment is a function of its key and r only, so
        drawing ahead in blocks changes nothing but the cost (one draw per ``block``
        resets instead of one per step)."""
        r = start.unsqueeze(1) + torch.arange(self.block, device=self.device)  # [N, K]
        keys = rng.fold_tensor(self._keys.unsqueeze(1).expand_as(r), r)
        self._block_start = start
        self._block_states = self._initial_state(keys)  # [N, K, state_dim]

    def _next_initial(self) -> torch.Tensor:
        """Initial states for each environment's current reset count ``[N, state_dim]``."""
        if self.device.type != "cpu" or self.direct_resets:
            # Checking the block would sync with the host every step (and break a traced
            # graph); drawing is cheap here. The r-th initial state is the same either way.
            return self._initial_state(rng.fold_tensor(self._keys, self._resets))
        offset = self._resets - self._block_start
        if bool((offset >= self.block).any()):
            self._draw_block(self._resets.clone())
            offset = self._resets - self._block_start
        return self._block_states[self._env_index, offset]

    def _uniform(self, keys: torch.Tensor, low: float, high: float, dim: int) -> torch.Tensor:
        return low + (high - low) * rng.uniform(keys, (dim,))

    def prepare_trace(self) -> None:
        self.direct_resets = True

    def _reset(self) -> torch.Tensor:
        self._resets.zero_()
        self._elapsed.zero_()
        self._done.zero_()
        self._draw_block(self._resets.clone())
        self.state = self._next_initial()
        return self._observe(self.state)

    def _step(self, actions: torch.Tensor):
        # Environments that ended on the previous step reset now and ignore the action.
        resetting = self._done
        new_state, reward, terminated = self._dynamics(self.state, actions)
        self._resets += resetting
        self.state = torch.where(resetting.unsqueeze(1), self._next_initial(), new_state)
        self._elapsed = torch.where(resetting, 0, self._elapsed + 1)
        terminated = terminated & ~resetting
        truncated = (self._elapsed >= self.max_steps) & ~terminated
        reward = torch.where(resetting, 0.0, reward)
        self._done = terminated | truncated
        return self._observe(self.state), reward, terminated, truncated


class CartPole(_TorchEnv):
    """gymnasium CartPole-v1: Euler integration, 500-step limit, reward 1 per step."""

    max_steps = 500
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_limit = 12 * 2 * math.pi / 360
    x_limit = 2.4

    def __init__(self, num_envs: int, env_seeds: list[int], device):
        spec = EnvSpec("CartPole-v1", "torch", (4,), num_actions=2, max_episode_steps=500)
        super().__init__(spec, num_envs, env_seeds, device)

    def _initial_state(self, keys: torch.Tensor) -> torch.Tensor:
        return self._uniform(keys, -0.05, 0.05, 4)

    def _observe(self, state):
        return state

    def _dynamics(self, state, actions):
        x, x_dot, theta, theta_dot = state.unbind(1)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        force = torch.where(actions == 1, self.force_mag, -self.force_mag)
        cos, sin = torch.cos(theta), torch.sin(theta)
        temp = (force + polemass_length * theta_dot * theta_dot * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * cos * cos / total_mass)
        )
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * x_acc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * theta_acc
        new = torch.stack([x, x_dot, theta, theta_dot], dim=1)
        terminated = (x.abs() > self.x_limit) | (theta.abs() > self.theta_limit)
        return new, torch.ones_like(x), terminated


class Pendulum(_TorchEnv):
    """gymnasium Pendulum-v1: torque in [-2, 2], 200-step limit, never terminates."""

    max_steps = 200
    max_speed, max_torque, dt, g, m, length = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0

    def __init__(self, num_envs: int, env_seeds: list[int], device):
        spec = EnvSpec("Pendulum-v1", "torch", (3,), action_shape=(1,), action_low=(-2.0,),
                       action_high=(2.0,), max_episode_steps=200)
        super().__init__(spec, num_envs, env_seeds, device)

    def _initial_state(self, keys: torch.Tensor) -> torch.Tensor:
        u = self._uniform(keys, -1.0, 1.0, 2)
        return torch.stack([u[..., 0] * math.pi, u[..., 1]], dim=-1)

    def _observe(self, state):
        th, thdot = state.unbind(1)
        return torch.stack([torch.cos(th), torch.sin(th), thdot], dim=1)

    def _dynamics(self, state, actions):
        th, thdot = state.unbind(1)
        u = actions[:, 0].clamp(-self.max_torque, self.max_torque)
        norm_th = torch.remainder(th + math.pi, 2 * math.pi) - math.pi
        cost = norm_th**2 + 0.1 * thdot**2 + 0.001 * u**2
        thdot = thdot + (
            3 * self.g / (2 * self.length) * torch.sin(th) + 3.0 / (self.m * self.length**2) * u
        ) * self.dt
        thdot = thdot.clamp(-self.max_speed, self.max_speed)
        th = th + thdot * self.dt
        return torch.stack([th, thdot], dim=1), -cost, torch.zeros_like(th, dtype=torch.bool)


def _registry() -> dict:
    from metarl.envs.minatar import MINATAR_ENVS

    return {"CartPole-v1": CartPole, "Pendulum-v1": Pendulum, **MINATAR_ENVS}


#: env id -> constructor ``(num_envs, env_seeds, device)``: classic control here, the
#: MinAtar games in :mod:`metarl.envs.minatar`
TORCH_ENVS = _registry()
