"""What an environment looks like to an agent."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EnvSpec:
    """Shape of an environment's observations and actions.

    ``num_actions`` is set for discrete action spaces; ``action_low`` / ``action_high``
    (each ``[action_dim]``) for continuous (box) action spaces.
    """

    env_id: str
    backend: str
    obs_shape: tuple[int, ...]
    num_actions: int | None = None
    action_shape: tuple[int, ...] = ()
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None
    max_episode_steps: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    @property
    def obs_dim(self) -> int:
        n = 1
        for s in self.obs_shape:
            n *= s
        return n

    @property
    def action_dim(self) -> int:
        """Number of logits (discrete) or of action components (continuous)."""
        if self.discrete:
            return int(self.num_actions)
        n = 1
        for s in self.action_shape:
            n *= s
        return n

    def action_bounds(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            raise ValueError(f"{self.env_id} has a discrete action space: it has no bounds")
        low = torch.tensor(self.action_low, dtype=torch.float32, device=device)
        high = torch.tensor(self.action_high, dtype=torch.float32, device=device)
        return low, high
