"""MinAtarEnv's bookkeeping: auto-reset, reset states and step keys, on both reset paths.

The wrapper computes the initial states of the environments that reset either for just
those rows (``reset_rows=True``, the CPU default) or from blocks drawn ahead
(``reset_rows=False``, the default off the CPU). Both must give, number for number, the
trajectories of the plain algorithm (a fresh reset state for every environment at every
step, kept where an episode ended). Two checks:

* the fingerprints of fixed-seed trajectories recorded with the plain wrapper, before the
  two paths were written (``RECORDED``; they also pin the games' rules, so a deliberate
  change to a game's rules means recording its line again);
* a side-by-side run of the plain algorithm (:class:`_Plain`, written here from the key
  scheme in ``MinAtarEnv``'s docstring) for every registered game, Seaquest included.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from metarl import rng
from metarl.envs.base import VecEnv
from metarl.envs.minatar import GAMES, MinAtarEnv, game
from metarl.envs.minatar.base import _S_RESET, _S_STEP, _where

NUM_ENVS = 16
SEEDS = list(range(100, 100 + NUM_ENVS))

#: env id -> (first 16 hex digits of the sha256 of the trajectory, sum of the rewards,
#: number of episode ends) of :func:`_fingerprint`, recorded with the plain wrapper
RECORDED = {
    "Asterix-MinAtar": ("0024caa7e1a8b14c", 293.0, 610),
    "Breakout-MinAtar": ("bd15c7da1c2e4456", 1485.0, 3767),
    "Freeway-MinAtar": ("ce05368cb8daa119", 8.0, 16),
    "SpaceInvaders-MinAtar": ("044a6ea4f72e4e24", 3061.0, 700),
}


def _actions(env: VecEnv, t: int) -> torch.Tensor:
    """Random actions of step ``t``, a function of the seeds and ``t`` only."""
    keys = rng.fold(rng.seed_keys(SEEDS), 7, t)
    return rng.bits(keys, ()) % env.spec.num_actions


def _fingerprint(env: VecEnv, steps: int = 2600, reset_at: int = 2560):
    """Steps ``env`` with :func:`_actions` (a full ``reset()`` before step ``reset_at``;
    2,600 steps include Freeway's 2,500-step cap) and hashes every observation, reward,
    termination and truncation: ``(hex digest[:16], reward sum, episode ends)``."""
    h = hashlib.sha256(env.reset().to(torch.uint8).numpy().tobytes())
    reward, ends = 0.0, 0
    for t in range(steps):
        if t == reset_at:
            h.update(env.reset().to(torch.uint8).numpy().tobytes())
        s = env.step(_actions(env, t))
        for x in (s.obs.to(torch.uint8), s.reward, s.terminated, s.truncated):
            h.update(x.numpy().tobytes())
        reward += float(s.reward.sum())
        ends += int(s.done.sum())
    return h.hexdigest()[:16], reward, ends


def _env(env_id: str, reset_rows: bool, block: int | None = None) -> MinAtarEnv:
    env = MinAtarEnv(game(env_id), NUM_ENVS, SEEDS, "cpu", reset_rows=reset_rows)
    if block is not None:
        env.block = block  # takes effect at the next reset()
    return env


class _Plain(VecEnv):
    """The plain algorithm: episode ``r`` of an environment starts from
    ``reset(fold(key, reset stream, r))``, its step ``t`` draws from ``fold(key, step
    stream, r, t)``, and every step computes a reset state for every environment, kept
    where the previous step ended an episode."""

    def __init__(self, env_id: str):
        self.game = game(env_id)
        self.spec = MinAtarEnv(self.game, 1, [0], "cpu").spec
        super().__init__(self.spec, NUM_ENVS, "cpu")
        self._keys = rng.seed_keys(SEEDS)

    def _initial(self):
        return self.game.reset(rng.fold_tensor(rng.fold(self._keys, _S_RESET), self._resets))

    def _observe(self):
        return self.game.observe(self.state).reshape(NUM_ENVS, -1).float()

    def _reset(self):
        self._resets = torch.zeros(NUM_ENVS, dtype=torch.int64)
        self._elapsed = torch.zeros(NUM_ENVS, dtype=torch.int64)
        self._done = torch.zeros(NUM_ENVS, dtype=torch.bool)
        self.state = self._initial()
        return self._observe()

    def _step(self, actions):
        resetting = self._done
        keys = rng.fold_tensor(rng.fold_tensor(rng.fold(self._keys, _S_STEP), self._resets),
                               self._elapsed)
        new_state, reward, terminated = self.game.step(self.state, actions.long(), keys)
        self._resets = self._resets + resetting
        self.state = _where(resetting, self._initial(), new_state)
        self._elapsed = torch.where(resetting, 0, self._elapsed + 1)
        terminated = terminated & ~resetting
        truncated = (self._elapsed >= self.game.max_steps) & ~terminated
        reward = torch.where(resetting, 0.0, reward.float())
        self._done = terminated | truncated
        return self._observe(), reward, terminated, truncated


@pytest.mark.parametrize("reset_rows", [True, False], ids=["rows", "block"])
@pytest.mark.parametrize("env_id", sorted(RECORDED))
def test_trajectory_is_the_one_recorded_before_the_reset_paths(env_id, reset_rows):
    digest, reward, ends = _fingerprint(_env(env_id, reset_rows))
    assert (digest, reward, ends) == RECORDED[env_id]


#: every registered game on both paths; small blocks (redrawn every step, every 3 steps)
#: on the game whose episodes are shortest
CASES = [(env_id, reset_rows, None) for env_id in sorted(GAMES) for reset_rows in (True, False)]
CASES += [("Breakout-MinAtar", False, 1), ("Breakout-MinAtar", False, 3)]


@pytest.mark.parametrize("env_id,reset_rows,block", CASES,
                         ids=[f"{e}-{'rows' if r else 'block'}{b or ''}" for e, r, b in CASES])
def test_reset_paths_match_the_plain_algorithm_step_by_step(env_id, reset_rows, block):
    env, plain = _env(env_id, reset_rows, block), _Plain(env_id)
    # every environment ends an episode (at the latest at the cap) before the full reset
    steps, reset_at = env.game.max_steps + 100, env.game.max_steps + 50
    torch.testing.assert_close(env.reset(), plain.reset(), rtol=0, atol=0)
    ends = 0
    for t in range(steps):
        if t == reset_at:  # a full reset restarts the counters and the blocks
            torch.testing.assert_close(env.reset(), plain.reset(), rtol=0, atol=0)
        a = _actions(env, t)
        s, p = env.step(a), plain.step(a)
        for name in ("obs", "reward", "terminated", "truncated", "valid", "episode_return",
                     "episode_length"):
            torch.testing.assert_close(getattr(s, name), getattr(p, name), rtol=0, atol=0,
                                       msg=f"{name} differs at step {t}")
        ends += int(s.done.sum())
    assert ends >= NUM_ENVS


@pytest.mark.parametrize("env_id", sorted(GAMES))
def test_game_resets_rows_alone_and_steps_keep_the_fields(env_id):
    """What the row path relies on: a game's reset of some rows equals those rows of a
    reset of all, and a step returns the reset's fields with their dtypes and shapes."""
    g = game(env_id)
    keys = rng.fold_tensor(rng.seed_keys(SEEDS), torch.arange(NUM_ENVS))
    full = g.reset(keys)
    rows = torch.tensor([3, 0, 11])
    part = g.reset(keys[rows])
    assert part.keys() == full.keys()
    for k, v in full.items():
        assert torch.equal(part[k], v[rows]), k
    actions = torch.arange(NUM_ENVS) % len(g.actions)
    stepped, _, _ = g.step(full, actions, keys)
    assert stepped.keys() == full.keys()
    for k, v in full.items():
        assert (stepped[k].dtype, stepped[k].shape) == (v.dtype, v.shape), k


@pytest.mark.parametrize("env_id", sorted(GAMES))
def test_drawn_ahead_states_fit_in_their_memory_budget(env_id):
    budget = MinAtarEnv.block_bytes
    env = MinAtarEnv(game(env_id), 4096, list(range(4096)), "cpu", reset_rows=False)
    held = sum(v.numel() * v.element_size() for v in env._block_states.values())
    per_block = held // env.block
    assert 1 <= env.block <= MinAtarEnv.block
    assert held <= budget or env.block == 1
    # the largest block within the budget (or the default size) was chosen
    assert env.block == MinAtarEnv.block or held + per_block > budget


@pytest.mark.parametrize("env_id", sorted(GAMES))
def test_float_observation_is_the_grid_and_keyless_games_ignore_keys(env_id):
    """``observe_float`` (what the agents see) is the bool grid as floats, on states met
    while playing; a game that says it draws nothing while stepping steps the same with
    any keys."""
    g = game(env_id)
    env = MinAtarEnv(g, 64, list(range(64)), "cpu")
    env.reset()
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        env.step(torch.randint(env.spec.num_actions, (64,), generator=gen))
        grid = g.observe(env.state)
        assert torch.equal(g.observe_float(env.state), grid.reshape(64, -1).float())
    if not g.random_steps:
        a = torch.randint(env.spec.num_actions, (64,), generator=gen)
        one = g.step(env.state, a, torch.arange(64))
        other = g.step(env.state, a, None)
        assert all(torch.equal(one[0][k], other[0][k]) for k in one[0])
        assert torch.equal(one[1], other[1]) and torch.equal(one[2], other[2])


def _seed_actions(seeds: list[int], t: int, num_actions: int) -> torch.Tensor:
    """An action per environment that depends only on its seed and the step."""
    return rng.bits(rng.fold(rng.seed_keys(seeds), t), ()) % num_actions


@pytest.mark.parametrize("env_id", ["Asterix-MinAtar", "SpaceInvaders-MinAtar"])
def test_wrapper_auto_reset_returns_and_batch_independence(env_id):
    """Episode returns are the sums of the rewards since the last end, and a seed's course
    is the same in another batch (other neighbours, other positions)."""
    g = game(env_id)
    A = len(g.actions)
    seeds = list(range(8))
    env = MinAtarEnv(g, 8, seeds, "cpu")
    obs = env.reset()
    assert obs.shape == (8, 100 * len(g.channels)) and obs.dtype == torch.float32
    running = torch.zeros(8)
    ended = 0
    trace = []
    for t in range(3000):
        s = env.step(_seed_actions(seeds, t, A))
        running += s.reward
        done = s.done
        if done.any():
            torch.testing.assert_close(s.episode_return[done], running[done])
            ended += int(done.sum())
        running = torch.where(done, 0.0, running)
        trace.append((s.obs[[2, 5]], s.reward[[2, 5]], done[[2, 5]]))
    assert ended >= 8
    other = [5, 100, 2]
    env2 = MinAtarEnv(game(env_id), 3, other, "cpu")
    env2.reset()
    for t in range(3000):
        s = env2.step(_seed_actions(other, t, A))
        obs, rew, done = trace[t]
        torch.testing.assert_close(s.obs[[2, 0]], obs, rtol=0, atol=0)
        torch.testing.assert_close(s.reward[[2, 0]], rew, rtol=0, atol=0)
        assert torch.equal(s.done[[2, 0]], done)
