"""SpaceInvaders-MinAtar: metarl's torch game against gymnax's, transition by transition.

gymnax is the oracle (the ``reference`` extra): at every compared step metarl's state is
copied into gymnax's ``EnvState``, both games take the same action from that same state,
and the next observation (gymnax's ``get_obs``), reward, terminal flag and every state
field must agree exactly. SpaceInvaders has no random events (gymnax's ``step_env`` and
``reset_env`` never use their key), so no random draws need to be matched; the keys passed
to both sides are arbitrary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl import rng
from metarl.envs.minatar.base import _where
from metarl.envs.minatar.space_invaders import ENEMY_SHOT_INTERVAL, SpaceInvaders

jax = pytest.importorskip("jax")
pytest.importorskip("gymnax")
jnp = jax.numpy
from gymnax.environments.minatar.space_invaders import (  # noqa: E402
    EnvState,
    MinSpaceInvaders,
)

GAME = SpaceInvaders()
GYM = MinSpaceInvaders()
PARAMS = GYM.default_params
_INT_FIELDS = {"pos": "pos", "alien_dir": "alien_dir", "move_interval": "enemy_move_interval",
               "move_timer": "alien_move_timer", "shot_timer": "alien_shot_timer",
               "cooldown": "shot_timer", "ramp_index": "ramp_index"}
_MAP_FIELDS = {"aliens": "alien_map", "f_bullets": "f_bullet_map", "e_bullets": "e_bullet_map"}

_gym_step = jax.jit(jax.vmap(lambda k, s, a: GYM.step_env(k, s, a, PARAMS)))
_gym_obs = jax.jit(jax.vmap(GYM.get_obs))


def to_gymnax(state: dict) -> EnvState:
    """metarl's batched state as gymnax's (batched) ``EnvState``."""
    n = state["pos"].shape[0]
    fields = {g: jnp.asarray(state[m].numpy().astype(np.int32)) for m, g in _INT_FIELDS.items()}
    fields.update({g: jnp.asarray(state[m].numpy().astype(np.float32))
                   for m, g in _MAP_FIELDS.items()})
    return EnvState(**fields, ramping=jnp.ones(n, bool), time=jnp.zeros(n, jnp.int32),
                    terminal=jnp.zeros(n, bool))


def from_gymnax(gs: EnvState) -> dict:
    """gymnax's batched ``EnvState`` as metarl's state fields."""
    out = {m: torch.from_numpy(np.asarray(getattr(gs, g)).astype(np.int64))
           for m, g in _INT_FIELDS.items()}
    out.update({m: torch.from_numpy(np.asarray(getattr(gs, g)) != 0)
                for m, g in _MAP_FIELDS.items()})
    return out


def step_both(state: dict, action: torch.Tensor, t: int = 0):
    """Step both games from ``state``; assert they agree; return metarl's transition."""
    n = action.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(t), n)
    g_obs, g_state, g_reward, g_done, _ = _gym_step(keys, to_gymnax(state),
                                                    jnp.asarray(action.numpy()))
    new, reward, terminated = GAME.step(state, action, rng.seed_keys(list(range(n))))
    torch.testing.assert_close(GAME.observe(new), torch.from_numpy(np.asarray(g_obs) != 0),
                               rtol=0, atol=0)
    torch.testing.assert_close(reward, torch.from_numpy(np.array(g_reward)), rtol=0, atol=0)
    torch.testing.assert_close(terminated, torch.from_numpy(np.array(g_done)), rtol=0, atol=0)
    for k, v in from_gymnax(g_state).items():
        torch.testing.assert_close(new[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    return new, reward, terminated


def play(policy, n: int, steps: int, seed: int = 0):
    """Play ``n`` games side by side for ``steps`` steps, resetting ended games; returns
    the rewards ``[steps, n]``, terminal flags ``[steps, n]`` and ramp indices ``[steps, n]``."""
    gen = torch.Generator().manual_seed(seed)
    state = GAME.reset(rng.seed_keys(list(range(n))))
    rewards, dones, ramps = [], [], []
    for t in range(steps):
        state, reward, terminated = step_both(state, policy(state, gen), t)
        rewards.append(reward)
        dones.append(terminated)
        ramps.append(state["ramp_index"])
        state = _where(terminated, GAME.reset(rng.seed_keys(list(range(n)))), state)
    return torch.stack(rewards), torch.stack(dones), torch.stack(ramps)


def random_policy(state, gen):
    """Random actions, firing half of the time (so that aliens get hit)."""
    n = state["pos"].shape[0]
    move = torch.randint(0, 3, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.5, 3, move)


def _lookahead(state, first, steps):
    """metarl's game ``steps`` steps ahead: action ``first`` then no-ops; returns the state
    and the reward collected."""
    keys = rng.seed_keys([0] * first.shape[0])
    state, total, _ = GAME.step(state, first, keys)
    for _ in range(steps - 1):
        state, reward, _ = GAME.step(state, torch.zeros_like(first), keys)
        total = total + reward
    return state, total


def hunter_policy(state, gen):
    """Fire when a look-ahead says the shot will hit, else walk to the nearest column that
    an alien will occupy a few steps ahead, never stepping into a column where an alien
    bullet is about to land (clears waves, so the difficulty ramp is reached)."""
    n = state["pos"].shape[0]
    rows = torch.arange(n)
    pos = state["pos"]
    _, shot = _lookahead(state, torch.full((n,), 3), 9)
    _, idle = _lookahead(state, torch.zeros(n, dtype=torch.long), 9)
    future, _ = _lookahead(state, torch.zeros(n, dtype=torch.long), 4)
    occupied = future["aliens"].any(dim=1)
    dist = (torch.arange(10) - pos.view(n, 1)).abs() + 100 * (~occupied).long()
    target = dist.argmin(dim=1)
    wanted = torch.where(target < pos, 1, torch.where(target > pos, 2, 0))
    wanted = torch.where((shot > idle) & (state["cooldown"] == 0), 3, wanted)
    # candidate actions in order of preference; the first whose landing column is safe wins
    choice = torch.full((n,), -1)
    for cand in (wanted, torch.full((n,), 0), torch.full((n,), 1), torch.full((n,), 2)):
        to = (pos - (cand == 1).long() + (cand == 2).long()).clamp(0, 9)
        safe = ~state["e_bullets"][rows, 7:9, to].any(dim=1)
        choice = torch.where((choice < 0) & safe, cand, choice)
    return torch.where(choice < 0, wanted, choice)


def random_states(n: int, seed: int) -> dict:
    """States gymnax's rules can hold (and corner cases: aliens on the walls and on row 9,
    bullets everywhere, every timer value), drawn independently."""
    g = torch.Generator().manual_seed(seed)
    density = torch.tensor([0.01, 0.03, 0.1, 0.3, 0.6])[torch.randint(0, 5, (n,), generator=g)]
    interval = torch.randint(6, 13, (n,), generator=g)
    return {
        "pos": torch.randint(0, 10, (n,), generator=g),
        "alien_dir": torch.randint(0, 2, (n,), generator=g) * 2 - 1,
        "move_interval": interval,
        "move_timer": (torch.rand(n, generator=g) * (interval + 1)).long(),
        "shot_timer": torch.randint(0, ENEMY_SHOT_INTERVAL + 1, (n,), generator=g),
        "cooldown": torch.randint(0, 6, (n,), generator=g),
        "ramp_index": 12 - interval,
        "aliens": torch.rand(n, 10, 10, generator=g) < density.view(n, 1, 1),
        "f_bullets": torch.rand(n, 10, 10, generator=g) < 0.1,
        "e_bullets": torch.rand(n, 10, 10, generator=g) < 0.05,
    }



def test_random_play_matches_gymnax():
    """64 games x 200 random steps, with resets: identical transitions."""
    rewards, dones, _ = play(random_policy, 64, 200)
    # the run must exercise kills and deaths for the comparison to mean something
    assert rewards.sum() >= 50 and dones.sum() >= 20


def test_every_action_from_random_states_matches_gymnax():
    """One step from 2,048 varied states, each with all four actions."""
    state = random_states(2048, seed=1)
    for a in range(4):
        _, reward, terminated = step_both(state, torch.full((2048,), a), a)
    assert reward.sum() > 0 and terminated.any() and not terminated.all()


def test_difficulty_ramp_over_long_episodes_matches_gymnax():
    """A wave-clearing policy for 600 steps: waves are cleared, the march interval ramps,
    and gymnax agrees at every step (ramp index and interval are compared as state)."""
    _, _, ramps = play(hunter_policy, 16, 600, seed=2)
    assert (ramps[-1] >= 2).all()


@pytest.mark.parametrize("interval", [12, 7, 6])
def test_clearing_the_last_alien_speeds_up_until_interval_6(interval):
    state = GAME.reset(rng.seed_keys([0]))
    state["move_interval"] = torch.tensor([interval])
    state["ramp_index"] = torch.tensor([12 - interval])
    state["move_timer"] = torch.tensor([3])
    state["aliens"] = torch.zeros(1, 10, 10, dtype=torch.bool)
    state["aliens"][0, 4, 6] = True
    state["f_bullets"] = torch.zeros(1, 10, 10, dtype=torch.bool)
    state["f_bullets"][0, 5, 6] = True              # hits the alien this step
    new, reward, terminated = step_both(state, torch.tensor([0]))
    assert reward.tolist() == [1.0] and terminated.tolist() == [False]
    expected = max(interval - 1, 6)
    assert new["move_interval"].tolist() == [expected]
    assert new["ramp_index"].tolist() == [12 - expected]
    assert torch.equal(new["aliens"], GAME.reset(rng.seed_keys([0]))["aliens"])


def test_reset_is_gymnax_reset():
    """Resets take no randomness: 300 keys all give gymnax's initial state."""
    state = GAME.reset(rng.seed_keys(list(range(300))))
    _, g = GYM.reset_env(jax.random.PRNGKey(0), PARAMS)
    for k, v in from_gymnax(jax.tree.map(lambda x: jnp.stack([x] * 300), g)).items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    torch.testing.assert_close(
        GAME.observe(state)[0], torch.from_numpy(np.asarray(GYM.get_obs(g)) != 0),
        rtol=0, atol=0)


def test_observe_channel_order_is_gymnax():
    state = random_states(256, seed=3)
    ours = GAME.observe(state)
    theirs = torch.from_numpy(np.asarray(_gym_obs(to_gymnax(state))) != 0)
    assert ours.shape == (256, 10, 10, 6) and len(GAME.channels) == 6
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # both walking directions occur, so the two direction channels were both compared
    assert ours[..., 2].any() and ours[..., 3].any()
