"""MinAtar games as batched torch environments: the game interface and the vector env.

MinAtar (Young & Tian 2019) reduces five Atari games to a 10 x 10 grid with one binary
channel per kind of object. metarl writes each game from its rules as tensor operations
over ``n`` games at once (:class:`Game`), and :class:`MinAtarEnv` turns a game into a
:class:`~metarl.envs.base.VecEnv` with the behaviour of metarl's other backends:
next-step auto-reset, an episode cap, and randomness from :mod:`metarl.rng` keyed by each
environment's seed, its reset count and its step count, so an environment's episodes
depend only on its own seed and run the same on any device.

The settings are those of the paper's runs (gymnax's MinAtar): no sticky actions, the
minimal action set of each game, episodes capped at 1,000 steps (2,500 for Freeway), and
observations of ``10 x 10 x C`` binary values, flattened for the agents' MLP.
"""

from __future__ import annotations

import torch

from metarl import rng
from metarl.envs.base import VecEnv
from metarl.envs.spec import EnvSpec

_S_RESET, _S_STEP = 0x4E5, 0x57E  # random streams of resets and of steps


class Game:
    """One MinAtar game, functional and batched over ``n`` games.

    A state is a ``dict`` of tensors whose first dimension is ``n``. Randomness comes only
    from the ``keys [n]`` (int64 :mod:`metarl.rng` keys) passed in, so a game's course is
    a function of its keys and actions.
    """

    env_id: str = ""
    #: the observation channels, in order
    channels: tuple[str, ...] = ()
    #: the minimal action set, in gymnax's order (action ``i`` is ``actions[i]``)
    actions: tuple[str, ...] = ()
    #: the episode cap
    max_steps: int = 1000

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Initial states of ``n = len(keys)`` games."""
        raise NotImplementedError

    def step(self, state: dict[str, torch.Tensor], action: torch.Tensor,
             keys: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(new_state, reward [n] float32, terminated [n] bool)`` after ``action [n]``
        (int64 indices into :attr:`actions`)."""
        raise NotImplementedError

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The observation ``[n, 10, 10, len(channels)]`` (bool)."""
        raise NotImplementedError


def _where(mask: torch.Tensor, a: dict, b: dict) -> dict:
    """``a`` where ``mask [n]`` else ``b``, field by field."""
    out = {}
    for k, va in a.items():
        m = mask.reshape(-1, *([1] * (va.dim() - 1)))
        out[k] = torch.where(m, va, b[k])
    return out


class MinAtarEnv(VecEnv):
    """A :class:`Game` as a vectorised environment of ``num_envs`` games.

    Observations are ``[num_envs, 10 * 10 * C]`` float32 (the binary grid, flattened in
    ``(row, column, channel)`` order). An environment that ends resets on the next step
    (which ignores its action and returns reward 0), as with every metarl backend; its
    ``r``-th episode starts from a state drawn with the key ``fold(key, reset stream, r)``
    and its ``t``-th step draws from ``fold(key, step stream, r, t)``.
    """

    def __init__(self, game: Game, num_envs: int, env_seeds: list[int], device):
        spec = EnvSpec(game.env_id, "torch", (10 * 10 * len(game.channels),),
                       num_actions=len(game.actions), max_episode_steps=game.max_steps,
                       extra={"grid": (10, 10, len(game.channels)),
                              "channels": game.channels, "actions": game.actions})
        super().__init__(spec, num_envs, device)
        self.game = game
        self._keys = rng.seed_keys(env_seeds, device=self.device)
        self._resets = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self.state = self._initial()

    def _initial(self) -> dict:
        keys = rng.fold_tensor(rng.fold(self._keys, _S_RESET), self._resets)
        return self.game.reset(keys)

    def _observe(self, state) -> torch.Tensor:
        return self.game.observe(state).reshape(self.num_envs, -1).float()

    def _reset(self) -> torch.Tensor:
        self._resets.zero_()
        self._elapsed.zero_()
        self._done.zero_()
        self.state = self._initial()
        return self._observe(self.state)

    def _step(self, actions: torch.Tensor):
        resetting = self._done
        keys = rng.fold_tensor(rng.fold_tensor(rng.fold(self._keys, _S_STEP), self._resets),
                               self._elapsed)
        new_state, reward, terminated = self.game.step(self.state, actions.long(), keys)
        self._resets += resetting
        self.state = _where(resetting, self._initial(), new_state)
        self._elapsed = torch.where(resetting, 0, self._elapsed + 1)
        terminated = terminated & ~resetting
        truncated = (self._elapsed >= self.game.max_steps) & ~terminated
        reward = torch.where(resetting, 0.0, reward.float())
        self._done = terminated | truncated
        return self._observe(self.state), reward, terminated, truncated
