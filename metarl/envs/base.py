"""The vectorised environment interface every backend implements.

All backends share envpool's *next-step auto-reset*: when an environment ends at step t
(``terminated`` or ``truncated``), the observation returned at t is the true final
observation, and the *following* step resets it, ignores its action and returns the first
observation of the new episode with reward 0. That following step is flagged
``valid = False`` and must never be learned from; the inner loop masks it. Because the
final observation is returned, a truncated episode can be bootstrapped from its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarl.envs.spec import EnvSpec


@dataclass
class Step:
    """One step of ``num_envs`` environments. All tensors are ``[num_envs, ...]``.

    ``episode_return`` and ``episode_length`` hold the return and length of the episode
    that ended at this step where ``terminated | truncated``, and 0 elsewhere.
    ``valid`` is False on the auto-reset step described in the module docstring.
    """

    obs: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    valid: torch.Tensor
    episode_return: torch.Tensor
    episode_length: torch.Tensor

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class VecEnv:
    """Base class: tracks episode statistics and checks actions; backends do the rest.

    Subclasses implement ``_reset() -> obs`` and ``_step(actions) -> (obs, reward,
    terminated, truncated)`` with torch tensors on ``self.device``.
    """

    spec: EnvSpec

    def __init__(self, spec: EnvSpec, num_envs: int, device: torch.device):
        self.spec = spec
        self.num_envs = num_envs
        self.device = torch.device(device)
        self._ep_return = torch.zeros(num_envs, dtype=torch.float32, device=self.device)
        self._ep_length = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._prev_done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    # -- to implement -------------------------------------------------------------------
    def _reset(self) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, actions: torch.Tensor):
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------
    def reset(self) -> torch.Tensor:
        """Reset every environment; returns observations ``[num_envs, *obs_shape]``."""
        self._ep_return.zero_()
        self._ep_length.zero_()
        self._prev_done.zero_()
        return self._reset()

    #: whether every observation :meth:`step` returns is a new tensor that the backend
    #: never writes again (the torch-native ones); else callers keeping it make a copy
    fresh_obs: bool = False

    #: whether :meth:`step_unchecked` can be traced by ``torch.compile`` (torch tensor
    #: code with no host reads once :meth:`prepare_trace` has run)
    traceable: bool = False

    def prepare_trace(self) -> None:
        """Switch to code ``torch.compile`` can trace whole (only where :attr:`traceable`);
        the numbers stay the same."""
        raise NotImplementedError(f"{type(self).__name__} cannot be traced")

    def step(self, actions: torch.Tensor) -> Step:
        """Step every environment with ``actions`` (``[num_envs]`` integer actions for a
        discrete space, ``[num_envs, *action_shape]`` floats for a continuous one)."""
        self.check_actions(actions)
        return self.step_unchecked(actions)

    def step_unchecked(self, actions: torch.Tensor) -> Step:
        """:meth:`step` without the check of the actions (for callers whose actions are
        valid by construction, such as the inner loop's policy)."""
        obs, reward, terminated, truncated = self._step(actions)
        valid = ~self._prev_done
        reward = reward * valid
        self._ep_return += reward
        self._ep_length += valid
        done = terminated | truncated
        ep_ret = self._ep_return * done
        ep_len = self._ep_length * done
        not_done = ~done
        self._ep_return *= not_done
        self._ep_length *= not_done
        self._prev_done = done
        return Step(obs, reward, terminated, truncated, valid, ep_ret, ep_len)

    @property
    def running_return(self) -> torch.Tensor:
        """Return so far of each environment's current episode ``[num_envs]``."""
        return self._ep_return

    def check_actions(self, actions) -> None:
        spec = self.spec
        if not isinstance(actions, torch.Tensor):
            raise TypeError(
                f"{spec.env_id}: actions must be a torch.Tensor, got {type(actions).__name__}"
            )
        if spec.discrete:
            expected = (self.num_envs,)
            if tuple(actions.shape) != expected or actions.dtype.is_floating_point:
                raise ValueError(
                    f"{spec.env_id}: expected integer actions of shape {expected} "
                    f"(one action in [0, {spec.num_actions}) per environment), got "
                    f"{tuple(actions.shape)} {actions.dtype}"
                )
            # The range is checked where reading it is cheap (the CPU); on an accelerator
            # the check would make the host wait for the device every step.
            if actions.device.type == "cpu" and actions.numel():
                lo, hi = torch.aminmax(actions)
                if int(lo) < 0 or int(hi) >= spec.num_actions:
                    raise ValueError(
                        f"{spec.env_id}: actions must be in [0, {spec.num_actions}), got "
                        f"values from {int(lo)} to {int(hi)}")
        else:
            expected = (self.num_envs, *spec.action_shape)
            if tuple(actions.shape) != expected or not actions.dtype.is_floating_point:
                raise ValueError(
                    f"{spec.env_id}: expected float actions of shape {expected} "
                    f"(low {list(spec.action_low)}, high {list(spec.action_high)}), got "
                    f"{tuple(actions.shape)} {actions.dtype}"
                )

    def close(self) -> None:
        pass
