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
    a function of its keys and actions. Each row of ``reset(keys)`` depends on its own key
    only, and ``step`` returns the fields of ``reset`` with their dtypes and shapes
    (:class:`MinAtarEnv` writes reset rows into stepped states).
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

    #: whether :meth:`step` reads its ``keys`` (a game without random events says False
    #: and is passed None, which saves hashing a key per environment and step)
    random_steps: bool = True

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The observation ``[n, 10, 10, len(channels)]`` (bool)."""
        raise NotImplementedError

    def observe_float(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`observe` as float32 ``[n, 10 * 10 * len(channels)]`` (the agents' input).
        A bool is stored as one byte holding 0 or 1; converting those bytes as uint8 gives
        the same floats several times faster than torch's bool-to-float cast on the CPU.
        A game may build its floats directly instead (the same values)."""
        obs = self.observe(state)
        return obs.reshape(obs.shape[0], -1).view(torch.uint8).float()


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

    A game's initial state is a function of its key alone, so how the wrapper computes the
    states of the environments that reset changes only the cost, never a number:

    * on the CPU it resets just those environments (finding them is a cheap host read
      there), as one :meth:`Game.reset` of the resetting rows written into the new state;
    * on other devices, where finding them would make the host wait for the device every
      step, it draws each environment's next :attr:`block` initial states at once (for
      reset counts ``r .. r + block - 1``) every :attr:`block` steps and picks the one for
      the current count. An environment resets at most once per step, so its count
      cannot leave the block before the next draw, and the schedule needs no look at the
      device's numbers. The blocks hold ``block`` states per environment; ``block`` is
      lowered (to 1 at least) so that they fit in :attr:`block_bytes`.
    """

    #: each step's observation is built anew (Game.observe_float)
    fresh_obs = True
    #: reset states drawn ahead per environment off the CPU (one draw every ``block`` steps)
    block = 16
    #: the most memory the drawn-ahead states may take (a game's state is from about 150
    #: bytes, Breakout, to about 5 KB per environment, Seaquest)
    block_bytes = 64 * 2**20

    def __init__(self, game: Game, num_envs: int, env_seeds: list[int], device,
                 reset_rows: bool | None = None):
        spec = EnvSpec(game.env_id, "torch", (10 * 10 * len(game.channels),),
                       num_actions=len(game.actions), max_episode_steps=game.max_steps,
                       extra={"grid": (10, 10, len(game.channels)),
                              "channels": game.channels, "actions": game.actions})
        super().__init__(spec, num_envs, device)
        self.game = game
        keys = rng.seed_keys(env_seeds, device=self.device)
        self._reset_keys = rng.fold(keys, _S_RESET)  # per env, then folded with r
        self._step_keys = rng.fold(keys, _S_STEP)    # per env, then folded with r and t
        self._env_index = torch.arange(num_envs, device=self.device)
        self._resets = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._elapsed = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        #: reset only the environments that end (default on the CPU), or draw blocks ahead
        self.reset_rows = self.device.type == "cpu" if reset_rows is None else reset_rows
        if not self.reset_rows:
            one = self.game.reset(self._reset_keys[:1])  # the state of one environment
            per_env = sum(v.numel() * v.element_size() for v in one.values())
            self.block = max(1, min(self.block, self.block_bytes // (per_env * num_envs)))
        self._start_episodes()

    def _start_episodes(self) -> None:
        """Every environment starts episode ``self._resets`` (all counters are zero)."""
        self.state = self.game.reset(rng.fold_tensor(self._reset_keys, self._resets))
        # the step keys of the current episodes, ``fold(key, step stream, r)``
        self._episode_keys = rng.fold_tensor(self._step_keys, self._resets)
        if not self.reset_rows:
            self._draw_block()

    def _draw_block(self) -> None:
        """Draw the initial states of resets ``r .. r + block - 1`` of every environment,
        ``r`` its reset count now, as ``[num_envs, block, ...]`` fields."""
        r = self._resets.unsqueeze(1) + torch.arange(self.block, device=self.device)
        keys = rng.fold_tensor(self._reset_keys.unsqueeze(1).expand_as(r), r)
        states = self.game.reset(keys.reshape(-1))
        self._block_states = {k: v.reshape(self.num_envs, self.block, *v.shape[1:])
                              for k, v in states.items()}
        self._block_start = self._resets.clone()
        self._block_age = 0  # steps since the draw (a host counter: no device read)

    def _observe(self, state) -> torch.Tensor:
        return self.game.observe_float(state)

    def _reset(self) -> torch.Tensor:
        self._resets.zero_()
        self._elapsed.zero_()
        self._done.zero_()
        self._start_episodes()
        return self._observe(self.state)

    def _restart(self, resetting: torch.Tensor, new_state: dict) -> dict:
        """``new_state`` with the environments in ``resetting`` (their counts already
        advanced) at the initial state of their new episode; updates their step keys."""
        if self.reset_rows:
            rows = resetting.nonzero()[:, 0]
            if rows.numel() == 0:
                return new_state
            resets = self._resets[rows]
            fresh = self.game.reset(rng.fold_tensor(self._reset_keys[rows], resets))
            if self.game.random_steps:
                self._episode_keys[rows] = rng.fold_tensor(self._step_keys[rows], resets)
            return {k: v.index_put((rows,), fresh[k]) for k, v in new_state.items()}
        if self._block_age == self.block:
            self._draw_block()
        self._block_age += 1
        offset = self._resets - self._block_start  # in [0, block) by the schedule
        initial = {k: v[self._env_index, offset] for k, v in self._block_states.items()}
        if self.game.random_steps:
            self._episode_keys = rng.fold_tensor(self._step_keys, self._resets)
        return _where(resetting, initial, new_state)

    def _step(self, actions: torch.Tensor):
        # Environments that ended on the previous step reset now and ignore the action.
        resetting = self._done
        keys = (rng.fold_tensor(self._episode_keys, self._elapsed) if self.game.random_steps
                else None)
        new_state, reward, terminated = self.game.step(self.state, actions.long(), keys)
        self._resets += resetting
        self.state = self._restart(resetting, new_state)
        self._elapsed = torch.where(resetting, 0, self._elapsed + 1)
        terminated = terminated & ~resetting
        truncated = (self._elapsed >= self.game.max_steps) & ~terminated
        reward = torch.where(resetting, 0.0, reward.float())
        self._done = terminated | truncated
        return self._observe(self.state), reward, terminated, truncated
