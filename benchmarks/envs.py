"""Throughput of metarl's MinAtar games against gymnax and the ``minatar`` package.

For each registered MinAtar game, in one process on the CPU, it times three ways of
stepping the game with uniformly random actions (the minimal action set, no sticky actions,
auto-reset after an episode ends):

- **metarl**: :class:`~metarl.envs.minatar.MinAtarEnv` at ``--num-envs`` environments,
  ``torch.set_num_threads(--threads)``; the actions are drawn with ``torch.randint`` inside
  the timed loop;
- **gymnax**: ``jax.jit(jax.vmap(env.step))`` at ``--num-envs`` environments, with the key
  split, the random actions and the per-environment step keys inside the jitted function,
  blocking on the observations every step (XLA's default CPU threading);
- **minatar**: the reference Python package, one ``Environment`` per game in a Python loop
  over ``--minatar-envs`` environments (``act``, then ``state`` for the observation, and
  ``reset`` when an episode ends or reaches the cap), reported per environment-step.

Each figure is environment-steps per second, after a warm-up (and jit compilation), the
best of ``--repeats`` timings of ``--steps`` steps (``--steps // 10`` for minatar's loop);
the best is the least disturbed by other load on a shared machine.

    python benchmarks/envs.py
    python benchmarks/envs.py --games Breakout-MinAtar,Freeway-MinAtar --threads 1

Prints a table with the ratios metarl / gymnax and metarl / minatar and ends with one JSON
line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metarl.envs.minatar import GAMES, MinAtarEnv, game

#: the ``minatar`` package's module name of each game
MINATAR_NAMES = {"Asterix-MinAtar": "asterix", "Breakout-MinAtar": "breakout",
                 "Freeway-MinAtar": "freeway", "Seaquest-MinAtar": "seaquest",
                 "SpaceInvaders-MinAtar": "space_invaders"}


def best_rate(run, repeats: int) -> float:
    """The highest steps/s of ``repeats`` calls of ``run() -> (steps, seconds)``."""
    return max(steps / seconds for steps, seconds in (run() for _ in range(repeats)))


def metarl_rate(env_id: str, num_envs: int, steps: int, repeats: int) -> float:
    env = MinAtarEnv(game(env_id), num_envs, list(range(num_envs)), "cpu")
    gen = torch.Generator().manual_seed(0)
    num_actions = env.spec.num_actions
    env.reset()
    for _ in range(20):  # warm-up
        env.step(torch.randint(num_actions, (num_envs,), generator=gen))

    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(torch.randint(num_actions, (num_envs,), generator=gen))
        return steps * num_envs, time.perf_counter() - t0

    return best_rate(run, repeats)


def gymnax_rate(env_id: str, num_envs: int, steps: int, repeats: int) -> float:
    import gymnax
    import jax

    env, params = gymnax.make(env_id)
    num_actions = env.action_space(params).n
    vstep = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    @jax.jit
    def step(key, state):
        key, k_act, k_step = jax.random.split(key, 3)
        actions = jax.random.randint(k_act, (num_envs,), 0, num_actions)
        obs, state, reward, terminated, truncated, _ = vstep(
            jax.random.split(k_step, num_envs), state, actions, params)
        return key, state, obs, reward, terminated | truncated

    key = jax.random.PRNGKey(0)
    _, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(
        jax.random.split(key, num_envs), params)
    for _ in range(20):  # compilation and warm-up
        key, state, obs, _, _ = step(key, state)
    obs.block_until_ready()

    def run():
        nonlocal key, state
        t0 = time.perf_counter()
        for _ in range(steps):
            key, state, obs, _, _ = step(key, state)
            obs.block_until_ready()
        return steps * num_envs, time.perf_counter() - t0

    return best_rate(run, repeats)


def minatar_rate(env_id: str, num_envs: int, steps: int, repeats: int) -> float:
    import numpy as np
    from minatar import Environment

    envs = []
    for i in range(num_envs):
        e = Environment(MINATAR_NAMES[env_id], sticky_action_prob=0.0)
        e.seed(i)
        e.reset()
        envs.append(e)
    minimal = np.asarray(envs[0].minimal_action_set())
    cap = game(env_id).max_steps
    elapsed = [0] * num_envs
    rs = np.random.RandomState(0)

    def run():
        actions = minimal[rs.randint(len(minimal), size=(steps, num_envs))].tolist()
        t0 = time.perf_counter()
        for t in range(steps):
            for i, e in enumerate(envs):
                _, terminal = e.act(actions[t][i])
                e.state()
                elapsed[i] += 1
                if terminal or elapsed[i] >= cap:
                    e.reset()
                    elapsed[i] = 0
        return steps * num_envs, time.perf_counter() - t0

    run()  # warm-up
    return best_rate(run, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-envs", type=int, default=4096,
                   help="environments of metarl and gymnax")
    p.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    p.add_argument("--threads", type=int, default=2, help="torch threads for metarl")
    p.add_argument("--games", default=",".join(sorted(GAMES)),
                   help="comma-separated env ids (default: every registered MinAtar game)")
    p.add_argument("--minatar-envs", type=int, default=64,
                   help="environments of the minatar package's Python loop")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure (the best)")
    args = p.parse_args(argv)
    games = [g.strip() for g in args.games.split(",") if g.strip()]
    unknown = [g for g in games if g not in GAMES]
    if unknown:
        p.error(f"unknown game(s) {unknown}; registered MinAtar games: {sorted(GAMES)}")
    for name, value in (("--num-envs", args.num_envs), ("--steps", args.steps),
                        ("--threads", args.threads), ("--minatar-envs", args.minatar_envs),
                        ("--repeats", args.repeats)):
        if value < 1:
            p.error(f"{name} must be a positive integer, got {value}")
    torch.set_num_threads(args.threads)

    results = {}
    for env_id in games:
        m = metarl_rate(env_id, args.num_envs, args.steps, args.repeats)
        g = gymnax_rate(env_id, args.num_envs, args.steps, args.repeats)
        r = minatar_rate(env_id, args.minatar_envs, max(args.steps // 10, 1), args.repeats)
        results[env_id] = {"metarl": m, "gymnax": g, "minatar": r,
                           "metarl_over_gymnax": m / g, "metarl_over_minatar": m / r}

    print(f"environment-steps/s on the CPU, metarl with {args.threads} torch thread(s); "
          f"metarl and gymnax at {args.num_envs} environments, minatar's Python loop at "
          f"{args.minatar_envs}; best of {args.repeats}")
    print(f"{'game':24s} {'metarl':>12s} {'gymnax':>12s} {'minatar':>10s} "
          f"{'/ gymnax':>9s} {'/ minatar':>10s}")
    for env_id, r in results.items():
        print(f"{env_id:24s} {r['metarl']:12,.0f} {r['gymnax']:12,.0f} {r['minatar']:10,.0f} "
              f"{r['metarl_over_gymnax']:8.2f}x {r['metarl_over_minatar']:9.2f}x")
    out = {"num_envs": args.num_envs, "steps": args.steps, "threads": args.threads,
           "minatar_envs": args.minatar_envs, "repeats": args.repeats,
           "torch": torch.__version__, "games": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
