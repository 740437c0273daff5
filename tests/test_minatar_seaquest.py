"""Seaquest-MinAtar against gymnax's ``MinSeaquest``, transition by transition.

How the random choices are matched: :class:`Seaquest` draws a step's random choices first
(``_draws(keys)`` -> enemy side, kind and row, diver side and row) and then applies
``_transition(state, action, draws)``. The tests give gymnax a ``jax.random`` key per game
and step, compute from that key the values gymnax's ``step_env`` draws (replicating its key
splitting: ``split(key) -> enemy, diver``; ``split(enemy) -> choice, row`` with
``uniform(choice, (2,))`` for side and kind and ``randint(row, 1, 9)``; ``split(diver) ->
side, row`` with ``bernoulli`` and ``randint``) and pass them to ``_transition``, so both
make the same choices. Gymnax's reset is deterministic.

State conversion: metarl's object lists (fixed capacities, rows in order of appearance)
are padded with zero rows to gymnax's 100-slot buffers, and back (checking that gymnax
never holds more objects than metarl's capacity).
"""

import numpy as np
import pytest
import torch

from metarl.envs.minatar.base import MinAtarEnv
from metarl.envs.minatar.seaquest import CAPACITY, WIDTH, Seaquest

GAME = Seaquest()
# metarl list -> (gymnax buffer, gymnax count)
LISTS = {"torpedoes": ("f_bullets", "f_bullet_count"), "bullets": ("e_bullets", "e_bullet_count"),
         "fish": ("e_fish", "e_fish_count"), "subs": ("e_subs", "e_subs_count"),
         "divers": ("divers", "divers_count")}
SCALARS = {"oxygen": "oxygen", "sub_x": "sub_x", "sub_y": "sub_y", "sub_right": "sub_or",
           "divers_aboard": "diver_count", "torpedo_cooldown": "shot_timer",
           "surfaced": "surface", "enemy_timer": "e_spawn_timer", "diver_timer": "d_spawn_timer",
           "spawn_interval": "e_spawn_speed", "move_interval": "move_speed",
           "ramps": "ramp_index"}


@pytest.fixture(scope="module")
def gx():
    """gymnax's environment, its jitted batched step / observation, and the draws."""
    pytest.importorskip("gymnax")
    import jax
    from gymnax.environments.minatar.seaquest import EnvState, MinSeaquest

    env = MinSeaquest()
    params = env.default_params

    def draws(key):
        enemy, diver = jax.random.split(key)
        choice, row = jax.random.split(enemy)
        v = jax.random.uniform(choice, shape=(2,))
        side, drow = jax.random.split(diver)
        return {"enemy_right": v[0] < 0.5, "enemy_is_sub": v[1] < (1.0 / 3.0),
                "enemy_y": jax.random.randint(row, (), 1, 9),
                "diver_right": jax.random.bernoulli(side),
                "diver_y": jax.random.randint(drow, (), 1, 9)}

    class G:
        pass

    g = G()
    g.jax, g.env, g.params, g.EnvState = jax, env, params, EnvState
    g.step = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))
    g.obs = jax.jit(jax.vmap(lambda s: env.get_obs(s, params)))
    g.draws = jax.jit(jax.vmap(draws))
    g.keys = lambda seed, n: jax.random.split(jax.random.PRNGKey(seed), n)
    return g


def to_gymnax(g, s):
    """metarl state (batched torch) -> gymnax ``EnvState`` (batched jax)."""
    jnp = g.jax.numpy
    n = s["sub_x"].shape[0]
    f = {}
    for ours, theirs in SCALARS.items():
        v = s[ours].numpy()
        f[theirs] = jnp.asarray(v if v.dtype == bool else v.astype(np.int32))
    for kind, (buf, cnt) in LISTS.items():
        rows = np.zeros((n, 100, WIDTH[kind]), np.int32)
        rows[:, :CAPACITY[kind]] = s[kind].numpy()
        f[buf], f[cnt] = jnp.asarray(rows), jnp.asarray(s["n_" + kind].numpy().astype(np.int32))
    f["time"] = jnp.zeros(n, jnp.int32)
    f["terminal"] = jnp.zeros(n, bool)
    return g.EnvState(**f)


def from_gymnax(st):
    """gymnax ``EnvState`` -> metarl state; fails if a list would not fit metarl's capacity."""
    s = {}
    for ours, theirs in SCALARS.items():
        v = np.asarray(getattr(st, theirs))
        s[ours] = torch.from_numpy(v.copy() if v.dtype == bool else v.astype(np.int64))
    for kind, (buf, cnt) in LISTS.items():
        rows, count = np.asarray(getattr(st, buf)), np.asarray(getattr(st, cnt))
        assert count.max() <= CAPACITY[kind], f"gymnax holds more {kind} than metarl's capacity"
        assert not rows[:, CAPACITY[kind]:].any()
        s[kind] = torch.from_numpy(rows[:, :CAPACITY[kind]].astype(np.int64))
        s["n_" + kind] = torch.from_numpy(count.astype(np.int64))
    return s


def to_draws(d):
    return {k: torch.from_numpy(np.array(v).astype(np.int64 if "_y" in k else bool))
            for k, v in d.items()}


def assert_states_equal(ours, theirs, where=""):
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), f"{where}: state field {k} differs"


def random_states(n, r: np.random.Generator):
    """Mid-game states with every counter in its range and a few objects of each kind,
    often near the submarine and often two of a kind on one cell (so that hits, pick-ups,
    crashes and the tie rules between objects on one cell are exercised)."""
    s = GAME.reset(torch.zeros(n, dtype=torch.int64))

    def ints(lo, hi):
        return torch.from_numpy(r.integers(lo, hi + 1, n))

    s["sub_x"], s["sub_y"] = ints(0, 9), ints(0, 8)
    s["sub_right"] = torch.from_numpy(r.random(n) < 0.5)
    s["oxygen"] = torch.where(torch.from_numpy(r.random(n) < 0.3), ints(0, 3), ints(0, 200))
    s["divers_aboard"] = ints(-2, 6)
    s["torpedo_cooldown"] = ints(0, 5)
    s["surfaced"] = (s["sub_y"] == 0) & torch.from_numpy(r.random(n) < 0.5)
    s["spawn_interval"], s["move_interval"] = ints(1, 20), ints(2, 5)
    s["enemy_timer"] = torch.minimum(ints(0, 20), s["spawn_interval"])
    s["diver_timer"], s["ramps"] = ints(0, 30), ints(0, 25)
    most = {"torpedoes": 2, "divers": 3, "fish": 6, "subs": 6, "bullets": 6}
    for kind, cap in CAPACITY.items():
        count = r.integers(0, most[kind] + 1, n)
        rows = np.zeros((n, cap, WIDTH[kind]), np.int64)
        for i in range(n):
            c = count[i]
            near = r.random(c) < 0.5
            x0, y0 = int(s["sub_x"][i]), int(s["sub_y"][i])
            rows[i, :c, 0] = np.where(near, np.clip(x0 + r.integers(-2, 3, c), 0, 9),
                                      r.integers(0, 10, c))
            rows[i, :c, 1] = np.where(near, np.clip(y0 + r.integers(-1, 2, c), 0, 8),
                                      r.integers(0, 9, c))
            rows[i, :c, 2] = r.integers(0, 2, c)
            if c >= 2 and r.random() < 0.5:  # two objects of a kind on one cell
                rows[i, 1, :3] = rows[i, 0, :3]
            if WIDTH[kind] > 3:
                rows[i, :c, 3] = r.integers(0, 6, c)
            if WIDTH[kind] > 4:
                rows[i, :c, 4] = r.integers(0, 11, c)
        s[kind] = torch.from_numpy(rows)
        s["n_" + kind] = torch.from_numpy(count.astype(np.int64))
    # in some games two torpedoes flying towards each other meet on a fish's cell
    meet = torch.from_numpy(r.random(n) < 0.3)
    t = s["torpedoes"][meet]
    right = t[:, 0, 2]
    land = t[:, 0, 0] + 2 * right - 1
    t[:, 1] = torch.stack([(land + 2 * right - 1).clamp(0, 9), t[:, 0, 1], 1 - right], 1)
    s["torpedoes"][meet] = t
    s["n_torpedoes"][meet] = 2
    fish = s["fish"][meet]
    fish[:, 0, :2] = torch.stack([land.clamp(0, 9), t[:, 0, 1]], 1)
    s["fish"][meet] = fish
    s["n_fish"][meet] = s["n_fish"][meet].clamp(min=1)
    return s


def test_transitions_match_gymnax(gx):
    """64 games x 200 steps of random play (with resets, half of them into random
    mid-game states): each metarl transition equals gymnax's from the same state."""
    n, steps = 64, 200
    r = np.random.default_rng(0)
    state = random_states(n, r)
    fresh = GAME.reset(torch.zeros(n, dtype=torch.int64))
    seen = {"reward": 0, "done": 0, "arrive": 0, "pickup": 0}
    for t in range(steps):
        keys = gx.keys(t, n)
        action = r.integers(0, 6, n)
        obs, nxt, reward, done, _ = gx.step(keys, to_gymnax(gx, state), gx.jax.numpy.asarray(
            action.astype(np.int32)), gx.params)
        ours, our_reward, our_done = GAME._transition(
            state, torch.from_numpy(action), to_draws(gx.draws(keys)))
        assert_states_equal(ours, from_gymnax(nxt), f"step {t}")
        assert torch.equal(GAME.observe(ours), torch.from_numpy(np.array(obs) > 0.5))
        assert torch.equal(our_reward, torch.from_numpy(np.array(reward)))
        assert torch.equal(our_done, torch.from_numpy(np.array(done)))
        seen["reward"] += int((our_reward > 0).sum())
        seen["done"] += int(our_done.sum())
        seen["arrive"] += int(((ours["sub_y"] == 0) & (state["sub_y"] > 0)).sum())
        seen["pickup"] += int((ours["divers_aboard"] > state["divers_aboard"]).sum())
        # games that ended restart, alternately from the start and from a random state
        restart = random_states(n, r) if t % 2 else fresh
        state = {k: torch.where(our_done.view(-1, *[1] * (v.dim() - 1)), restart[k], v)
                 for k, v in ours.items()}
    # the comparison covered the events it is meant to cover
    assert min(seen.values()) >= 20, seen


def test_long_episodes_ramp_like_gymnax(gx):
    """16 games run 600 steps independently in metarl and gymnax (no state copying),
    diving and surfacing with 6 divers aboard at the start (so surfacing never ends the
    episode): observations, rewards and ends agree at every step, and the difficulty
    ramps once per arrival at the surface down to its floor."""
    n, steps = 16, 600
    jnp = gx.jax.numpy
    start = GAME.reset(torch.zeros(n, dtype=torch.int64))
    start["divers_aboard"] = torch.full((n,), 6)
    ours, theirs = start, to_gymnax(gx, start)
    r = np.random.default_rng(1)
    arrivals = torch.zeros(n, dtype=torch.int64)
    ended = torch.zeros(n, dtype=torch.bool)
    for t in range(steps):
        keys = gx.keys(10_000 + t, n)
        action = np.where(r.random(n) < 0.3, r.integers(0, 6, n), np.where(t % 2, 2, 4))
        obs, theirs, reward, done, _ = gx.step(keys, theirs, jnp.asarray(action, jnp.int32),
                                               gx.params)
        prev_y = ours["sub_y"]
        ours, our_reward, our_done = GAME._transition(ours, torch.from_numpy(action),
                                                      to_draws(gx.draws(keys)))
        assert torch.equal(GAME.observe(ours), torch.from_numpy(np.array(obs) > 0.5)), t
        assert torch.equal(our_reward, torch.from_numpy(np.array(reward))), t
        # gymnax's end flag stays set once an episode has ended (it carries the last one)
        ended |= our_done
        assert torch.equal(ended, torch.from_numpy(np.array(done))), t
        arrivals += (ours["sub_y"] == 0) & (prev_y > 0)
        # the ramp rule, counted from the arrivals seen here
        expected_spawn = (20 - arrivals).clamp(min=1)
        assert torch.equal(ours["spawn_interval"], expected_spawn)
        assert torch.equal(ours["move_interval"], (5 - arrivals // 2).clamp(min=2))
    assert_states_equal(ours, from_gymnax(theirs), "end")
    assert (arrivals >= 19).all(), arrivals
    assert (ours["spawn_interval"] == 1).all() and (ours["move_interval"] == 2).all()


def test_reset_is_gymnax_reset(gx):
    """Gymnax's reset is deterministic; 300 metarl resets all equal it."""
    _, st = gx.env.reset_env(gx.jax.random.PRNGKey(0), gx.params)
    batched = gx.jax.tree_util.tree_map(lambda a: a[None], st)
    want = from_gymnax(batched)
    ours = GAME.reset(torch.arange(300))
    for k, v in want.items():
        assert torch.equal(ours[k], v.expand_as(ours[k])), k
    assert torch.equal(GAME.observe(ours), torch.from_numpy(
        np.asarray(gx.obs(batched)) > 0.5).expand(300, -1, -1, -1))


def test_observation_channels_are_gymnax_order(gx):
    """One object of each kind on its own cell shows in the channel of that name, as in
    gymnax's ``get_obs`` (including the submarine's back wrapping from column -1 to 9)."""
    s = GAME.reset(torch.zeros(1, dtype=torch.int64))
    s.update(sub_x=torch.tensor([0]), sub_y=torch.tensor([4]), sub_right=torch.tensor([True]),
             oxygen=torch.tensor([95]), divers_aboard=torch.tensor([2]))
    place = {"torpedoes": (3, 2, 1), "bullets": (6, 2, 0), "fish": (2, 6, 1), "subs": (7, 7, 0),
             "divers": (4, 8, 1)}
    for kind, row in place.items():
        s[kind][0, 0, :3] = torch.tensor(row)
        s["n_" + kind] = torch.tensor([1])
    obs = GAME.observe(s)[0]
    assert torch.equal(obs, torch.from_numpy(np.array(gx.obs(to_gymnax(gx, s)))[0] > 0.5))
    ch = {name: i for i, name in enumerate(GAME.channels)}
    assert obs[4, 0, ch["sub_front"]] and obs[4, 9, ch["sub_back"]]
    assert obs[2, 3, ch["friendly_bullet"]] and obs[2, 6, ch["enemy_bullet"]]
    assert obs[6, 2, ch["enemy_fish"]] and obs[6, 1, ch["trail"]]
    assert obs[7, 7, ch["enemy_sub"]] and obs[7, 8, ch["trail"]]
    assert obs[8, 4, ch["diver"]] and obs[8, 3, ch["trail"]]
    assert obs[9, :, ch["oxygen_gauge"]].tolist() == [True] * 4 + [False] * 6
    assert obs[9, :, ch["diver_gauge"]].tolist() == [False] * 7 + [True] * 2 + [False]
    assert int(obs.sum()) == 10 + 4 + 2  # 10 object cells, 4 oxygen, 2 divers


def test_draws_have_gymnax_distribution():
    """Side 1/2 each, enemy submarine with probability 1/3, rows 1-8 uniform
    (20,000 draws; bounds are about 5 standard deviations)."""
    d = GAME._draws(torch.arange(20_000))
    assert abs(d["enemy_right"].float().mean() - 0.5) < 0.02
    assert abs(d["diver_right"].float().mean() - 0.5) < 0.02
    assert abs(d["enemy_is_sub"].float().mean() - 1 / 3) < 0.02
    for k in ("enemy_y", "diver_y"):
        counts = torch.bincount(d[k], minlength=10)
        assert counts[0] == 0 and counts[9] == 0
        assert ((counts[1:9] - 2500).abs() < 250).all(), counts
    assert not torch.equal(d["enemy_right"], d["diver_right"])


def test_wrapper_runs_and_reports_returns():
    """8 environments, 3,000 random steps: episodes end and restart, each reported
    return is the sum of the valid rewards of its episode."""
    env = MinAtarEnv(Seaquest(), 8, list(range(8)), "cpu")
    obs = env.reset()
    assert obs.shape == (8, 1000)
    gen = torch.Generator().manual_seed(0)
    running = torch.zeros(8)
    ended, positive = 0, 0
    for _ in range(3000):
        st = env.step(torch.randint(0, 6, (8,), generator=gen))
        running += st.reward * st.valid
        assert not (st.reward * ~st.valid).any()
        if st.done.any():
            assert torch.equal(st.episode_return[st.done], running[st.done])
            ended += int(st.done.sum())
            positive += int((st.episode_return[st.done] > 0).sum())
            running[st.done] = 0
        assert set(st.obs.unique().tolist()) <= {0.0, 1.0}
    assert ended >= 50 and positive >= 5, (ended, positive)


def test_same_seed_same_trajectory_in_any_batch():
    """An environment's course depends only on its seed and actions, not on its batch."""
    big = MinAtarEnv(Seaquest(), 6, [11, 12, 13, 14, 15, 16], "cpu")
    small = MinAtarEnv(Seaquest(), 2, [14, 99], "cpu")
    big.reset(), small.reset()
    gen = torch.Generator().manual_seed(3)
    ends = 0
    for _ in range(1500):
        a = torch.randint(0, 6, (6,), generator=gen)
        sb = big.step(a)
        ss = small.step(torch.stack([a[3], a[0]]))
        assert torch.equal(sb.obs[3], ss.obs[0])
        assert sb.reward[3] == ss.reward[0] and sb.done[3] == ss.done[0]
        ends += int(sb.done[3])
    assert ends >= 5
