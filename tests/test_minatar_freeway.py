"""Freeway-MinAtar: metarl's torch game against gymnax's, transition by transition.

Method: at every step each game's metarl state is copied into gymnax's ``EnvState`` (with
``time = 0``), both sides step with the same action, and the next observation (gymnax's
``get_obs``), reward, terminal flag and every state field are compared exactly. The one
random choice of a step (the car velocities a crossing gives) is shared by replicating
gymnax's draws: from the key passed to gymnax's ``step_env``, the test splits it into the
speed and direction keys as gymnax does, draws ``randint(1, 6)`` speeds and ``choice([-1,
1])`` directions with ``jax.random``, and passes their product to metarl's
``Freeway._transition`` as its draws. Reset states are compared the same way (gymnax's
reset draws, replicated, become metarl's reset draws), and metarl's own draws are checked
to have gymnax's distribution (speeds uniform in 1..5, directions +-1 with probability 1/2).
"""

import numpy as np
import pytest
import torch

from metarl import rng
from metarl.envs.minatar.base import MinAtarEnv
from metarl.envs.minatar.freeway import Freeway

jax = pytest.importorskip("jax")
pytest.importorskip("gymnax")
jnp = jax.numpy
from gymnax.environments.minatar.freeway import EnvState, MinFreeway  # noqa: E402
from minatar_oracle import assert_transition_matches  # noqa: E402


def _velocities(key):
    """The car velocities gymnax draws from ``key`` (in reset and in every step)."""
    key_speed, key_dirs = jax.random.split(key)
    speeds = jax.random.randint(key_speed, shape=(8,), minval=1, maxval=6)
    return speeds * jax.random.choice(key_dirs, jnp.array([-1, 1]), shape=(8,))


@pytest.fixture(scope="module")
def gym():
    env = MinFreeway()
    params = env.default_params
    step = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))
    reset = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))
    draws = jax.jit(jax.vmap(_velocities))
    return env, params, step, reset, draws


def to_gymnax(s):
    n = s["pos"].shape[0]
    rows = torch.arange(1, 9).expand(n, 8)
    cars = torch.stack([s["car_x"], rows, s["car_timer"], s["car_v"]], dim=2)
    return EnvState(pos=jnp.asarray(s["pos"].numpy().astype(np.int32)),
                    cars=jnp.asarray(cars.numpy().astype(np.int32)),
                    move_timer=jnp.asarray(s["move_timer"].numpy().astype(np.int32)),
                    time=jnp.zeros(n, jnp.int32), terminal=jnp.zeros(n, bool))


def assert_same_state(ours, theirs, where=""):
    cars = np.asarray(theirs.cars)
    for name, theirs_f in (("pos", theirs.pos), ("move_timer", theirs.move_timer),
                           ("car_x", cars[..., 0]), ("car_timer", cars[..., 2]),
                           ("car_v", cars[..., 3])):
        np.testing.assert_array_equal(ours[name].numpy(), np.asarray(theirs_f),
                                      err_msg=f"{name} {where}")
    np.testing.assert_array_equal(cars[..., 1], np.broadcast_to(np.arange(1, 9), cars.shape[:2]))


def random_states(n, gen):
    """States off the usual path: cars anywhere with any velocity and timer, the chicken
    on any row with any move timer."""
    def ints(high, shape=(n,)):
        return torch.randint(0, high, shape, generator=gen)

    speed = ints(5, (n, 8)) + 1
    v = speed * (ints(2, (n, 8)) * 2 - 1)
    timer = (torch.rand(n, 8, generator=gen) * (speed + 1)).long()
    return {"pos": ints(9) + 1, "move_timer": ints(4), "car_x": ints(10, (n, 8)),
            "car_timer": timer, "car_v": v}


def _select(mask, a, b):
    return {k: torch.where(mask.reshape(-1, *([1] * (v.dim() - 1))), a[k], v)
            for k, v in b.items()}


def test_steps_match_gymnax(gym):
    """64 games x 400 steps (half from random states) with a mostly-up policy, so the
    chicken crosses (redrawing the cars), is hit, and cars wrap around."""
    env, params, gstep, _, gdraws = gym
    game = Freeway()
    n, steps = 64, 400
    gen = torch.Generator().manual_seed(0)
    state = _select(torch.arange(n) < n // 2, random_states(n, gen),
                    game.reset(rng.seed_keys(list(range(n)))))
    counts = dict(cross=0, hit=0, wrap=0, wait=0)
    base = jax.random.PRNGKey(0)
    for t in range(steps):
        u = torch.rand(n, generator=gen)
        action = torch.where(u < 0.7, 1, torch.where(u < 0.85, 0, 2))
        jkeys = jax.random.split(jax.random.fold_in(base, t), n)
        obs_g, st_g, rew_g, done_g, _ = gstep(jkeys, to_gymnax(state), jnp.asarray(
            action.numpy().astype(np.int32)), params)
        draws = {"velocity": torch.from_numpy(np.asarray(gdraws(jkeys)).astype(np.int64))}
        new, rew, term = game._transition(state, action, draws)
        assert_transition_matches(game, new, rew, term, obs_g, st_g, rew_g, done_g,
                                  assert_same_state, f"at step {t}")

        moved_up = (new["pos"] < state["pos"])
        counts["cross"] += int(rew.sum())
        counts["hit"] += int(((new["pos"] == 9) & (state["pos"] < 8) & (rew == 0)).sum())
        counts["wrap"] += int(((new["car_x"] - state["car_x"]).abs() == 9).sum())
        counts["wait"] += int(((action == 1) & (state["pos"] > 1) & ~moved_up
                               & (new["pos"] != 9)).sum())
        state = new
    assert min(counts.values()) >= 5, counts


def test_reset_states_match_gymnax(gym):
    """Gymnax's reset draws, replicated, give gymnax's reset state and observation; metarl's
    own draws have gymnax's distribution."""
    env, params, _, greset, gdraws = gym
    game = Freeway()
    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    obs_g, st_g = greset(keys, params)
    ours = game._initial({"velocity": torch.from_numpy(
        np.asarray(gdraws(keys)).astype(np.int64))})
    assert_same_state(ours, st_g)
    np.testing.assert_array_equal(game.observe(ours).numpy(), np.asarray(obs_g).astype(bool))

    v = game.reset(rng.seed_keys(list(range(500))))["car_v"]  # 4,000 velocities
    speed_freq = torch.bincount(v.abs().flatten(), minlength=6)[1:] / v.numel()
    assert ((speed_freq - 0.2).abs() < 0.03).all(), speed_freq  # 1..5 equally likely
    assert (v.abs().min(), v.abs().max()) == (1, 5)
    assert abs(float((v > 0).float().mean()) - 0.5) < 0.04


def test_channel_and_action_order(gym):
    """Each channel holds what gymnax's ``get_obs`` puts there, and actions 1 and 2 move
    the chicken up and down as gymnax's minimal set (n, u, d) does."""
    env = gym[0]
    game = Freeway()
    assert game.channels == ("chicken", "car", "speed1", "speed2", "speed3", "speed4",
                             "speed5")
    assert game.actions == ("n", "u", "d") and list(np.asarray(env.action_set)) == [0, 2, 4]
    s = game._initial({"velocity": torch.tensor([[1, -2, 3, -4, 5, -1, 2, -3]])})
    s["car_x"] = torch.tensor([[0, 9, 4, 5, 6, 7, 8, 3]])
    g = to_gymnax(s)
    one = g.replace(pos=g.pos[0], cars=g.cars[0], move_timer=g.move_timer[0], time=0,
                    terminal=False)
    obs = game.observe(s)[0]
    np.testing.assert_array_equal(obs.numpy(), np.asarray(env.get_obs(one)).astype(bool))
    # chicken at (9, 4); car 0 (row 1, column 0, +1) trails at column 9 in speed1;
    # car 1 (row 2, column 9, -2) trails at column 0 (wrapped) in speed2
    assert obs[9, 4, 0] and obs[1, 0, 1] and obs[1, 9, 2] and obs[2, 9, 1] and obs[2, 0, 3]
    s["move_timer"] = torch.tensor([0])
    for a, row in ((0, 9), (1, 8), (2, 9)):
        s2 = dict(s, pos=torch.tensor([9 if a != 2 else 8]))
        new = game._transition(s2, torch.tensor([a]), {"velocity": s["car_v"]})[0]
        assert int(new["pos"]) == row, (a, int(new["pos"]))


def _actions(seeds, t):
    """An action per environment that depends only on its seed and the step (mostly up)."""
    bits = rng.bits(rng.fold(rng.seed_keys(seeds), t), (1,))[:, 0]
    return torch.tensor([1, 1, 1, 0, 2])[bits % 5]


def test_wrapper_truncates_at_2500_and_reports_returns():
    env = MinAtarEnv(Freeway(), 8, list(range(8)), "cpu")
    obs = env.reset()
    assert obs.shape == (8, 700) and obs.dtype == torch.float32
    running = torch.zeros(8)
    ends = []
    for t in range(3000):
        step = env.step(_actions(list(range(8)), t))
        assert not step.terminated.any()
        running += step.reward
        done = step.done
        np.testing.assert_allclose(step.episode_return[done].numpy(), running[done].numpy())
        assert (step.episode_return[~done] == 0).all()
        if done.any():
            assert done.all() and step.truncated.all()
            assert (step.episode_length == 2500).all()
            ends.append(t)
            # every chicken crossed, so the returns compared above are not all zero
            assert (running >= 3).all(), running
            running.zero_()
        if ends and t == ends[-1] + 1:
            assert not step.valid.any() and (step.reward == 0).all()
            grid = step.obs.reshape(8, 10, 10, 7)
            assert (grid[:, 9, 4, 0]).all() and (grid[:, 1:9, 0, 1]).all()  # fresh games
    assert ends == [2499]


def test_same_seed_same_trajectory_in_any_batch():
    big = MinAtarEnv(Freeway(), 8, list(range(8)), "cpu")
    small = MinAtarEnv(Freeway(), 3, [5, 100, 2], "cpu")
    ob, os_ = big.reset(), small.reset()
    assert torch.equal(ob[[5, 2]], os_[[0, 2]])
    for t in range(400):
        sb = big.step(_actions(list(range(8)), t))
        ss = small.step(_actions([5, 100, 2], t))
        for f in ("obs", "reward", "terminated", "truncated", "valid"):
            assert torch.equal(getattr(sb, f)[[5, 2]], getattr(ss, f)[[0, 2]]), (f, t)
    assert not torch.equal(sb.obs[5], sb.obs[2])  # the two seeds do play different games
