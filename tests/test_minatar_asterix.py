"""Asterix-MinAtar: metarl's torch game against gymnax's, transition by transition.

gymnax is the oracle (the ``reference`` extra): at every compared step metarl's state is
copied into gymnax's ``EnvState``, both games take the same action from that same state,
and the next observation (gymnax's ``get_obs``), reward, terminal flag and every state
field must agree exactly (entity fields only for live entities: gymnax leaves
meaningless values in dead slots).

Random events (a spawn's direction, kind and row) are matched by replicating gymnax's
draws: for the key passed to gymnax's ``step_env``, the test splits it as gymnax's
``spawn_entity`` does (three keys: direction, kind, slot order) and draws the same
``jax.random.choice`` / ``permutation`` values, then hands them to metarl's
``Asterix._transition`` in place of the draws from metarl's own keys. metarl's own draws
(``Asterix._draws``) are tested separately for their distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl import rng
from metarl.envs.minatar.asterix import Asterix
from metarl.envs.minatar.base import _where

jax = pytest.importorskip("jax")
pytest.importorskip("gymnax")
jnp = jax.numpy
from gymnax.environments.minatar.asterix import EnvState, MinAsterix  # noqa: E402

GAME = Asterix()
GYM = MinAsterix()
PARAMS = GYM.default_params
_INT_FIELDS = ("player_x", "player_y", "spawn_speed", "spawn_timer", "move_speed",
               "move_timer", "ramp_timer", "ramp_index")

_gym_step = jax.jit(jax.vmap(lambda k, s, a: GYM.step_env(k, s, a, PARAMS)))
_gym_obs = jax.jit(jax.vmap(GYM.get_obs))


@jax.jit
@jax.vmap
def _gym_draws(key):
    """The values gymnax's ``spawn_entity`` draws from the key ``step_env`` receives."""
    key_lr, key_gold, key_slot = jax.random.split(key, 3)
    lr = jax.random.choice(key_lr, jnp.array([1, 0]))
    gold = jax.random.choice(key_gold, jnp.array([1, 0]), p=jnp.array([1 / 3, 2 / 3]))
    return lr == 1, gold == 1, jax.random.permutation(key_slot, jnp.arange(8))


def to_gymnax(state: dict) -> EnvState:
    """metarl's batched state as gymnax's (batched) ``EnvState``."""
    n = state["player_x"].shape[0]
    alive = state["ent_alive"]
    ent = torch.stack([state["ent_x"], torch.arange(1, 9).expand(n, 8),
                       state["ent_right"].long(), state["ent_gold"].long(),
                       torch.ones(n, 8, dtype=torch.long)], dim=-1) * alive.unsqueeze(-1)
    fields = {k: jnp.asarray(state[k].numpy().astype(np.int32)) for k in _INT_FIELDS}
    return EnvState(**fields, shot_timer=jnp.zeros(n, jnp.int32),
                    entities=jnp.asarray(ent.numpy().astype(np.int32)),
                    time=jnp.zeros(n, jnp.int32), terminal=jnp.zeros(n, bool))


def from_gymnax(gs: EnvState) -> dict:
    """gymnax's batched ``EnvState`` as metarl's state fields."""
    out = {k: torch.from_numpy(np.array(getattr(gs, k)).astype(np.int64)) for k in _INT_FIELDS}
    ent = torch.from_numpy(np.array(gs.entities).astype(np.int64))
    out.update(ent_x=ent[..., 0], ent_row=ent[..., 1], ent_right=ent[..., 2] != 0,
               ent_gold=ent[..., 3] != 0, ent_alive=ent[..., 4] != 0)
    return out


def step_both(state: dict, action: torch.Tensor, t: int = 0):
    """Step both games from ``state`` with gymnax's random choices; assert they agree;
    return metarl's transition."""
    n = action.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(t), n)
    g_obs, g_state, g_reward, g_done, _ = _gym_step(keys, to_gymnax(state),
                                                    jnp.asarray(action.numpy()))
    right, gold, order = _gym_draws(keys)
    draws = {"right": torch.from_numpy(np.array(right)), "gold": torch.from_numpy(np.array(gold)),
             "order": torch.from_numpy(np.array(order).astype(np.int64))}
    new, reward, terminated = GAME._transition(state, action, draws)
    torch.testing.assert_close(GAME.observe(new), torch.from_numpy(np.array(g_obs) != 0),
                               rtol=0, atol=0)
    torch.testing.assert_close(reward, torch.from_numpy(np.array(g_reward)), rtol=0, atol=0)
    torch.testing.assert_close(terminated, torch.from_numpy(np.array(g_done)), rtol=0, atol=0)
    theirs = from_gymnax(g_state)
    for k in _INT_FIELDS:
        torch.testing.assert_close(new[k], theirs[k], rtol=0, atol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")
    alive = theirs["ent_alive"]
    assert torch.equal(new["ent_alive"], alive)
    assert torch.equal(theirs["ent_row"][alive], (torch.arange(1, 9).expand_as(alive))[alive])
    for k in ("ent_x", "ent_right", "ent_gold"):
        assert torch.equal(new[k][alive], theirs[k][alive]), k
    return new, reward, terminated


def play(policy, n: int, steps: int, seed: int = 0):
    """Play ``n`` games side by side for ``steps`` steps, resetting ended games; returns
    rewards, terminal flags, the states' ``ramp_index`` and speeds and the episodes' ages
    (steps taken, counting this one), all ``[steps, n]``."""
    gen = torch.Generator().manual_seed(seed)
    state = GAME.reset(rng.seed_keys(list(range(n))))
    out = {"reward": [], "done": [], "ramp_index": [], "spawn_speed": [], "move_speed": [],
           "spawned": [], "age": []}
    age = torch.zeros(n, dtype=torch.long)             # steps into the current episode
    for t in range(steps):
        before = state["ent_alive"].sum()
        state, reward, terminated = step_both(state, policy(state, gen), seed * 100_000 + t)
        out["reward"].append(reward)
        out["done"].append(terminated)
        out["spawned"].append(state["ent_alive"].sum() - before)
        age = age + 1
        out["age"].append(age)
        age = torch.where(terminated, 0, age)
        for k in ("ramp_index", "spawn_speed", "move_speed"):
            out[k].append(state[k])
        state = _where(terminated, GAME.reset(rng.seed_keys(list(range(n)))), state)
    return {k: torch.stack(v) for k, v in out.items()}


def random_policy(state, gen):
    return torch.randint(0, 5, (state["player_x"].shape[0],), generator=gen)


def careful_policy(state, gen):
    """A random action among those that cannot be hit this step (no enemy on or marching
    onto the landing cell, and two columns away from the edges, where entities spawn and may
    march in the same step); no-op if none."""
    n = state["player_x"].shape[0]
    enemy = state["ent_alive"] & ~state["ent_gold"]
    x, right = state["ent_x"], state["ent_right"]
    scores = []
    for a in range(5):
        px = (state["player_x"] - int(a == 1) + int(a == 3)).clamp(0, 9).view(n, 1)
        py = (state["player_y"] - int(a == 2) + int(a == 4)).clamp(1, 8).view(n, 1)
        row = enemy & (torch.arange(1, 9) == py)
        hit = row & ((x == px) | ((x == px - 1) & right) | ((x == px + 1) & ~right))
        safe = ~hit.any(dim=1) & (px.view(n) > 1) & (px.view(n) < 8)
        scores.append(torch.where(safe, torch.rand(n, generator=gen), -1.0))
    scores = torch.stack(scores, dim=1)
    return torch.where(scores.max(dim=1).values > 0, scores.argmax(dim=1), 0)


def random_states(n: int, seed: int) -> dict:
    """Varied states: crowded and empty rows (including all eight rows taken, so that
    the no-free-row rule is exercised), entities on the edges, timers at 0 often."""
    g = torch.Generator().manual_seed(seed)
    density = torch.tensor([0.2, 0.5, 0.9, 1.0])[torch.randint(0, 4, (n,), generator=g)]
    spawn_speed = torch.randint(1, 11, (n,), generator=g)
    move_speed = torch.randint(1, 6, (n,), generator=g)

    def timer(top, p_zero):
        t = (torch.rand(n, generator=g) * (top + 1)).long()
        return torch.where(torch.rand(n, generator=g) < p_zero, 0, t)

    return {
        "player_x": torch.randint(0, 10, (n,), generator=g),
        "player_y": torch.randint(1, 9, (n,), generator=g),
        "spawn_speed": spawn_speed, "spawn_timer": timer(spawn_speed, 0.6),
        "move_speed": move_speed, "move_timer": timer(move_speed, 0.6),
        "ramp_timer": torch.where(torch.rand(n, generator=g) < 0.3, -1,
                                  torch.randint(-1, 101, (n,), generator=g)),
        "ramp_index": torch.randint(0, 10, (n,), generator=g),
        "ent_x": torch.randint(0, 10, (n, 8), generator=g),
        "ent_right": torch.rand(n, 8, generator=g) < 0.5,
        "ent_gold": torch.rand(n, 8, generator=g) < 0.4,
        "ent_alive": torch.rand(n, 8, generator=g) < density.view(n, 1),
    }


def test_random_play_matches_gymnax():
    """64 games x 200 random steps, with resets and gymnax's spawns: identical."""
    out = play(random_policy, 64, 200)
    assert out["reward"].sum() >= 10 and out["done"].sum() >= 20 and out["spawned"].sum() > 500


def test_every_action_from_random_states_matches_gymnax():
    """One step from 2,048 varied states, each with all five actions."""
    state = random_states(2048, seed=1)
    for a in range(5):
        _, reward, terminated = step_both(state, torch.full((2048,), a), a)
        assert reward.sum() > 0 and terminated.any() and not terminated.all()


def test_no_free_row_removes_the_last_row_of_the_ordering():
    """gymnax's row search skips the ordering's first place: with only that row free,
    nothing spawns and the entity on the ordering's last row goes."""
    state = GAME.reset(rng.seed_keys([0]))
    state["spawn_timer"] = torch.tensor([0])
    state["ent_alive"] = torch.ones(1, 8, dtype=torch.bool)
    state["ent_x"] = torch.full((1, 8), 4)
    state["player_x"] = torch.tensor([0])
    order = torch.tensor([[3, 0, 1, 2, 4, 5, 6, 7]])
    state["ent_alive"][0, 3] = False
    draws = {"right": torch.tensor([True]), "gold": torch.tensor([False]), "order": order}
    new, _, _ = GAME._transition(state, torch.tensor([0]), draws)
    expected = torch.ones(1, 8, dtype=torch.bool)
    expected[0, 3] = expected[0, 7] = False
    assert torch.equal(new["ent_alive"], expected)


def test_difficulty_ramp_over_long_episodes_matches_gymnax():
    """A careful policy plays 960 steps (most episodes last them all): the game speeds up
    every 102 steps of an episode, nine times, to a spawn and a march every step, and
    gymnax agrees at every step."""
    out = play(careful_policy, 16, 960, seed=2)
    ramp, age = out["ramp_index"], out["age"]
    # the k-th speed-up happens at the episode's step 102 k
    assert torch.equal(ramp, (age // 102).clamp(max=9))
    assert (ramp[-1] == 9).sum() >= 8
    full = ramp == 9
    assert (out["spawn_speed"][full] == 1).all() and (out["move_speed"][full] == 1).all()
    assert out["reward"].sum() > 0


def test_draws_distribution():
    """metarl's own draws: direction 1/2, gold 1/3, the ordering a uniform permutation."""
    d = GAME._draws(rng.seed_keys(list(range(20_000))))
    assert abs(d["right"].float().mean() - 0.5) < 0.02
    assert abs(d["gold"].float().mean() - 1 / 3) < 0.02
    assert torch.equal(d["order"].sort(dim=1).values, torch.arange(8).expand(20_000, 8))
    first = torch.bincount(d["order"][:, 0], minlength=8).float() / 20_000
    assert (first - 1 / 8).abs().max() < 0.02


def test_reset_is_gymnax_reset():
    """Resets take no randomness: 300 keys all give gymnax's initial state."""
    state = GAME.reset(rng.seed_keys(list(range(300))))
    _, g = GYM.reset_env(jax.random.PRNGKey(0), PARAMS)
    theirs = from_gymnax(jax.tree.map(lambda x: jnp.stack([x] * 300), g))
    for k in _INT_FIELDS:
        torch.testing.assert_close(state[k], theirs[k], rtol=0, atol=0)
    assert not state["ent_alive"].any() and not theirs["ent_alive"].any()
    torch.testing.assert_close(
        GAME.observe(state)[0], torch.from_numpy(np.array(GYM.get_obs(g)) != 0),
        rtol=0, atol=0)


def test_observe_channel_order_is_gymnax():
    state = random_states(256, seed=3)
    ours = GAME.observe(state)
    theirs = torch.from_numpy(np.array(_gym_obs(to_gymnax(state))) != 0)
    assert ours.shape == (256, 10, 10, 4) and len(GAME.channels) == 4
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert all(ours[..., c].any() for c in range(4))
