"""Breakout-MinAtar: metarl's torch game against gymnax's, transition by transition.

Method: at every step each game's metarl state is copied into gymnax's ``EnvState`` (with
``time = 0`` and ``terminal = False``), both sides step with the same action, and the
next observation (gymnax's ``get_obs``), reward, terminal flag and every state field are
compared exactly. Breakout's steps draw no random numbers, so nothing has to be shared
there; its one random choice, the ball's start side at reset, is copied from gymnax's
reset after the fact (the side gymnax chose becomes metarl's reset draw) when comparing
reset states, and metarl's own reset draws are checked to be states gymnax produces.
"""

import numpy as np
import pytest
import torch

from metarl import rng
from metarl.envs.minatar.base import MinAtarEnv
from metarl.envs.minatar.breakout import Breakout

jax = pytest.importorskip("jax")
pytest.importorskip("gymnax")
jnp = jax.numpy
from gymnax.environments.minatar.breakout import EnvState, MinBreakout  # noqa: E402
from minatar_oracle import assert_transition_matches  # noqa: E402

FIELDS = ("ball_y", "ball_x", "ball_dir", "pos", "last_y", "last_x", "strike")


@pytest.fixture(scope="module")
def gym():
    env = MinBreakout()
    params = env.default_params
    step = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))
    reset = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))
    return env, params, step, reset


def to_gymnax(s):
    n = s["pos"].shape[0]

    def i32(t):
        return jnp.asarray(t.numpy().astype(np.int32))

    return EnvState(
        ball_y=i32(s["ball_y"]), ball_x=i32(s["ball_x"]), ball_dir=i32(s["ball_dir"]),
        pos=i32(s["pos"]), brick_map=jnp.asarray(s["bricks"].numpy().astype(np.float32)),
        strike=jnp.asarray(s["strike"].numpy()), last_y=i32(s["last_y"]),
        last_x=i32(s["last_x"]), time=jnp.zeros(n, jnp.int32),
        terminal=jnp.zeros(n, bool))


def assert_same_state(ours, theirs, where=""):
    for f in FIELDS:
        np.testing.assert_array_equal(ours[f].numpy(), np.asarray(getattr(theirs, f)),
                                      err_msg=f"{f} {where}")
    np.testing.assert_array_equal(ours["bricks"].numpy(),
                                  np.asarray(theirs.brick_map).astype(bool),
                                  err_msg=f"bricks {where}")


def random_states(n, gen):
    """States off the usual path: any ball cell above row 9, any direction, paddle and
    strike flag, and bricks in rows 1-3 at densities from none (so the refill runs) to
    full."""
    def ints(high):
        return torch.randint(0, high, (n,), generator=gen)

    density = torch.tensor([0.0, 0.03, 0.3, 1.0])[ints(4)]
    bricks = torch.zeros(n, 10, 10, dtype=torch.bool)
    bricks[:, 1:4] = torch.rand(n, 3, 10, generator=gen) < density[:, None, None]
    y, x = ints(9), ints(10)
    return {"ball_y": y, "ball_x": x, "ball_dir": ints(4), "pos": ints(10),
            "last_y": (y - 1).clamp(min=0), "last_x": (x + 1).clamp(max=9),
            "bricks": bricks, "strike": ints(2).bool()}


def test_steps_match_gymnax(gym):
    """64 games x 400 steps (half starting from random states, resets on termination)
    with a mostly ball-following policy, so bricks are broken, the paddle bounces the
    ball both ways, walls are cleared and refilled, and balls are lost."""
    env, params, gstep, _ = gym
    game = Breakout()
    n, steps = 64, 400
    gen = torch.Generator().manual_seed(0)
    resets = 0
    state = game.reset(rng.seed_keys(list(range(n))))
    rand = random_states(n, gen)
    half = torch.arange(n) < n // 2
    state = {k: torch.where(half.reshape(-1, *([1] * (v.dim() - 1))), rand[k], v)
             for k, v in state.items()}
    counts = dict(reward=0, terminal=0, refill=0, straight=0, edge=0)
    jkeys = jax.random.split(jax.random.PRNGKey(0), n)
    for t in range(steps):
        # half the games chase the ball's column, half the column it moves to next
        ahead = torch.tensor([-1, 1, 1, -1])[state["ball_dir"]] * (torch.arange(n) % 2)
        follow = torch.sign(state["ball_x"] + ahead - state["pos"])  # -1, 0, 1
        follow = torch.tensor([1, 0, 2])[follow + 1]
        action = torch.where(torch.rand(n, generator=gen) < 0.8, follow,
                             torch.randint(0, 3, (n,), generator=gen))
        obs_g, st_g, rew_g, done_g, _ = gstep(jkeys, to_gymnax(state), jnp.asarray(
            action.numpy().astype(np.int32)), params)
        new, rew, term = game.step(state, action, rng.seed_keys(list(range(n))))
        assert_transition_matches(game, new, rew, term, obs_g, st_g, rew_g, done_g,
                                  assert_same_state, f"at step {t}")

        bounced = (state["ball_y"] == 8) & (new["ball_y"] == 8) & ~term
        counts["reward"] += int(rew.sum())
        counts["terminal"] += int(term.sum())
        counts["refill"] += int((new["bricks"].sum((1, 2)) > state["bricks"].sum((1, 2))).sum())
        counts["straight"] += int((bounced & (state["ball_x"] == new["pos"])).sum())
        counts["edge"] += int((bounced & (state["ball_x"] != new["pos"])).sum())
        # games that ended start again from a fresh reset
        keys = rng.fold(rng.seed_keys(list(range(n))), 1000 + t)
        fresh = game.reset(keys)
        resets += int(term.sum())
        state = {k: torch.where(term.reshape(-1, *([1] * (v.dim() - 1))), fresh[k], v)
                 for k, v in new.items()}
    # every rule was exercised
    assert min(counts.values()) >= 5, counts
    assert resets == counts["terminal"]


def test_reset_states_match_gymnax(gym):
    """Gymnax's reset states, with its start side copied into metarl's reset draw, give
    the same state and observation; metarl's own draws give only those two states, each
    about half the time."""
    env, params, _, greset = gym
    game = Breakout()
    obs_g, st_g = greset(jax.random.split(jax.random.PRNGKey(3), 64), params)
    right = torch.from_numpy(np.asarray(st_g.ball_x) == 9)
    assert 0 < int(right.sum()) < 64  # both sides occur in gymnax's draws
    ours = game._initial({"right": right})
    assert_same_state(ours, st_g)
    np.testing.assert_array_equal(game.observe(ours).numpy(), np.asarray(obs_g).astype(bool))

    mine = game.reset(rng.seed_keys(list(range(400))))
    side = mine["ball_x"] == 9
    assert 0.4 < side.float().mean() < 0.6
    expect = game._initial({"right": side})
    for k in expect:
        assert torch.equal(mine[k], expect[k]), k
    assert set(mine["ball_x"].tolist()) == {0, 9}


def test_channel_and_action_order(gym):
    """Each channel holds what gymnax's ``get_obs`` puts there, and actions 1 and 2 move
    the paddle left and right as gymnax's minimal set (n, l, r) does."""
    env = gym[0]
    game = Breakout()
    assert game.channels == ("paddle", "ball", "trail", "brick")
    assert game.actions == ("n", "l", "r") and list(np.asarray(env.action_set)) == [0, 1, 3]
    s = game._initial({"right": torch.tensor([False])})
    s["ball_y"], s["ball_x"] = torch.tensor([5]), torch.tensor([6])
    obs = game.observe(s)[0]
    np.testing.assert_array_equal(obs.numpy(), np.asarray(env.get_obs(
        to_gymnax(s).replace(**{f: getattr(to_gymnax(s), f)[0] for f in FIELDS + (
            "brick_map", "time", "terminal")}))).astype(bool))
    assert obs[9, 4, 0] and obs[5, 6, 1] and obs[3, 0, 2] and obs[:, :, 3].sum() == 30
    for a, moved in ((0, 4), (1, 3), (2, 5)):
        assert int(game.step(s, torch.tensor([a]), torch.zeros(1, dtype=torch.long))[0][
            "pos"]) == moved


def _actions(seeds, t):
    """An action per environment that depends only on its seed and the step."""
    return rng.bits(rng.fold(rng.seed_keys(seeds), t), (1,))[:, 0] % 3


def test_wrapper_runs_resets_and_reports_returns():
    env = MinAtarEnv(Breakout(), 8, list(range(8)), "cpu")
    obs = env.reset()
    assert obs.shape == (8, 400) and obs.dtype == torch.float32
    running = torch.zeros(8)
    episodes, after_done = 0, torch.zeros(8, dtype=torch.bool)
    for t in range(3000):
        step = env.step(_actions(list(range(8)), t))
        assert torch.equal(step.valid, ~after_done)
        # the auto-reset step shows a fresh game: 30 bricks, ball on row 3, reward 0
        grid = step.obs.reshape(8, 10, 10, 4)
        fresh = grid[after_done]
        assert (fresh[..., 3].sum((1, 2)) == 30).all() and (fresh[:, 3, :, 1].sum(1) == 1).all()
        assert (step.reward[after_done] == 0).all()
        running += step.reward
        done = step.done
        np.testing.assert_allclose(step.episode_return[done].numpy(), running[done].numpy())
        assert (step.episode_return[~done] == 0).all()
        episodes += int(done.sum())
        running[done] = 0
        after_done = done
    assert episodes >= 50  # random play loses the ball within a few dozen steps


def test_same_seed_same_trajectory_in_any_batch():
    big = MinAtarEnv(Breakout(), 8, list(range(8)), "cpu")
    small = MinAtarEnv(Breakout(), 3, [5, 100, 2], "cpu")
    ob, os_ = big.reset(), small.reset()
    assert torch.equal(ob[[5, 2]], os_[[0, 2]])
    differ = False
    for t in range(400):
        sb = big.step(_actions(list(range(8)), t))
        ss = small.step(_actions([5, 100, 2], t))
        for f in ("obs", "reward", "terminated", "truncated", "valid"):
            assert torch.equal(getattr(sb, f)[[5, 2]], getattr(ss, f)[[0, 2]]), (f, t)
        differ |= not torch.equal(sb.obs[5], sb.obs[2])
    assert differ  # the two seeds do play different games
