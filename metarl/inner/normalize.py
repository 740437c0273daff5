"""Running observation and reward normalisation, one set of statistics per member.

The population shares one batch of environments, so normalisation is not an environment
wrapper: each member ``p`` keeps its own statistics, updated from its own ``N``
environments (the behaviour of purejaxrl's NormalizeVecObservation / NormalizeVecReward).
"""

from __future__ import annotations

import torch


class RunningMeanStd:
    """Mean and variance per member over a stream of batches ``[P, N, *shape]``."""

    def __init__(self, num_members: int, shape: tuple[int, ...], device):
        self.mean = torch.zeros(num_members, *shape, device=device)
        self.var = torch.ones(num_members, *shape, device=device)
        self.count = torch.full((num_members,), 1e-4, device=device)

    def update(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        batch_mean = x.mean(dim=1)
        batch_var = x.var(dim=1, unbiased=False)
        delta = batch_mean - self.mean
        tot = self.count + n
        c = self.count.view(-1, *([1] * (x.dim() - 2)))
        t = tot.view_as(c)
        self.mean = self.mean + delta * (n / t)
        m2 = self.var * c + batch_var * n + delta.pow(2) * c * n / t
        self.var = m2 / t
        self.count = tot

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


class ObsNormalizer:
    """``(obs - mean) / sqrt(var + 1e-8)``, clipped to [-clip, clip]."""

    def __init__(self, num_members: int, obs_dim: int, device, clip: float = 10.0):
        self.rms = RunningMeanStd(num_members, (obs_dim,), device)
        self.clip = clip

    def __call__(self, obs: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``obs [P, N, obs_dim]`` -> normalised, updating the statistics first."""
        if update:
            self.rms.update(obs)
        out = (obs - self.rms.mean.unsqueeze(1)) / torch.sqrt(self.rms.var.unsqueeze(1) + 1e-8)
        return out.clamp(-self.clip, self.clip)


class RewardNormalizer:
    """Divides rewards by the running standard deviation of the discounted return."""

    def __init__(self, num_members: int, num_envs: int, gamma: float, device):
        self.rms = RunningMeanStd(num_members, (), device)
        self.returns = torch.zeros(num_members, num_envs, device=device)
        self.gamma = gamma

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """``reward``, ``done`` ``[P, N]`` -> normalised reward ``[P, N]``."""
        self.returns = self.returns * self.gamma + reward
        self.rms.update(self.returns)
        self.returns = torch.where(done, torch.zeros_like(self.returns), self.returns)
        return reward / torch.sqrt(self.rms.var.unsqueeze(1) + 1e-8)
