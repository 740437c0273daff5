"""Population PPO: metarl's inner loop against a purejaxrl-style JAX loop (CartPole-v1 by
default; ``--env`` takes a MinAtar game, gymnax's on the JAX side, its grid flattened).

For each population size P it trains P agents with both implementations, each side in
a fresh child process of this script run (in one process, torch ran about 5% slower after
a JAX run than before it, and stayed so), and reports agent-steps per second
(environment steps summed over members, divided by wall time), the ratio metarl / JAX,
and each side's mean final return (the mean return
of the episodes that ended in the last update, per environment as metarl measures it,
averaged over environments and members).

- **JAX**: one ``train(key)`` function, written here from the description of PPO in
  purejaxrl (no code copied), run as ``jax.jit(jax.vmap(train))`` over P keys. gymnax's
  ``CartPole-v1`` (auto-reset in the same step), separate actor and critic flax MLPs
  (64 x 64 tanh, orthogonal init with gains sqrt(2), 0.01 for the policy head and 1 for
  the value head, zero biases), optax: global grad-norm clip, then Adam whose rate falls
  linearly to 0 over the updates (constant within an update, as metarl's). Every number
  is metarl's ``config_for(env)`` row (CartPole-v1: 4 envs x 128 steps, 4 epochs x 4
  minibatches, lr 1e-3, betas (0.9, 0.999), eps 1e-5, clip 0.2 (also the value clip),
  ent 0.01, vf 0.5, grad norm 0.5, gamma 0.99, lambda 0.95, per-minibatch advantage
  normalisation). Compiled ahead of time (``lower().compile()``, reported as compile
  seconds), called once, and timed on its second call.
- **metarl**: ``metarl.inner.train(config_for("CartPole-v1", backend=...,
  total_timesteps=...), "ppo-clip", None, seeds=range(P))`` with
  ``torch.set_num_threads(--threads)``, after a one-update warm-up.

Known differences: metarl's environments reset on the step after an episode ends (that
step is masked out) and a truncated episode bootstraps from its final observation; the
JAX loop, like purejaxrl, treats truncation as termination. Sampling differs in its
random numbers only.

**The hang, and its workaround.** With jax/jaxlib 0.10.2 on a 2-core machine, the JAX
side hung in its first call for P >= 8 (every try; P = 1 ran), all threads asleep. The
native stacks (gdb) showed both threads of XLA's intra-op pool inside
``lapack_sorgqr_ffi`` -> ``jax::ParallelBatchMap`` -> ``BlockingCounter::Wait``: the
orthogonal initialisation's QR (``jnp.linalg.qr`` in flax's ``orthogonal``), batched by
``vmap``, runs as a LAPACK custom call on a pool thread and fans the batch out into that
same pool, then waits; two such calls (independent layers) running at once take every
thread of a 2-thread pool and wait for each other forever. ``XLA_FLAGS`` with
``--xla_cpu_multi_thread_eigen=false`` or ``--xla_cpu_use_thunk_runtime=false`` did not
help, and jax has no option for the pool's size. The workaround here: the orthogonal
init does its QR by Gram-Schmidt in plain ``jnp`` (``orthogonal`` below; it equals flax's
initialiser to float32 rounding, same Gaussian draw), so the compiled program has no
custom call at all (checked before compiling: a warning is printed if one appears).

On a machine with other load, ``--threads 2`` can make torch far slower (its threads
wait for each other); ``--threads 1`` measures metarl there.

    python benchmarks/vs_jax.py                                # P = 1, 8, 64, 5e5 steps
    python benchmarks/vs_jax.py --sizes 8 --total-timesteps 32768
    python benchmarks/vs_jax.py --backend envpool --threads 2
    python benchmarks/vs_jax.py --compile                      # metarl with compile=True
    python benchmarks/vs_jax.py --compile --sizes 64 --repeats 3   # medians of 3 pairs
    python benchmarks/vs_jax.py --env Breakout-MinAtar --sizes 64 --total-timesteps 65536

JAX is imported by this script only (the optional ``reference`` extra), never by metarl.
Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from statistics import median

import torch

from metarl.configs import config_for
from metarl.inner import train as metarl_train

# -- the JAX reference --------------------------------------------------------------------


def make_jax_train(cfg):
    """``train(key) -> {"final_return": [], "curve": [U]}`` for one agent of ``cfg``."""
    import flax.linen as nn
    import gymnax
    import jax
    import jax.numpy as jnp
    import optax

    env, env_params = gymnax.make(cfg.env_id)
    num_actions = env.action_space(env_params).n
    obs_dim = math.prod(env.observation_space(env_params).shape)  # MinAtar grids flattened
    N, T, E, M = cfg.num_envs, cfg.num_steps, cfg.update_epochs, cfg.num_minibatches
    B, U, MB = cfg.batch_size, cfg.num_updates, cfg.minibatch_size
    act = {"tanh": nn.tanh, "relu": nn.relu}[cfg.activation]

    def orthogonal(gain):
        """Orthogonal init (flax's kernel layout) by Gram-Schmidt: no LAPACK call (see the
        module docstring on the hang)."""

        def init(key, shape, dtype=jnp.float32):
            rows, cols = shape
            a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), dtype)

            def column(q, j):
                v = a[:, j]
                for _ in range(2):  # orthogonalise twice: float32 stays orthogonal
                    v = v - q @ (q.T @ v)
                return q.at[:, j].set(v / jnp.sqrt(v @ v)), None

            q, _ = jax.lax.scan(column, jnp.zeros_like(a), jnp.arange(a.shape[1]))
            return gain * (q.T if rows < cols else q)

        return init

    class Tower(nn.Module):
        out: int
        head_gain: float

        @nn.compact
        def __call__(self, x):
            for _ in range(cfg.layers):
                x = act(nn.Dense(cfg.hidden, kernel_init=orthogonal(math.sqrt(2)))(x))
            return nn.Dense(self.out, kernel_init=orthogonal(self.head_gain))(x)

    actor, critic = Tower(num_actions, 0.01), Tower(1, 1.0)

    def policy(params, obs):
        return actor.apply(params["actor"], obs)

    def value(params, obs):
        return critic.apply(params["critic"], obs)[..., 0]

    def schedule(count):  # optax counts minibatch steps: constant within an update
        return cfg.lr * (1.0 - (count // (E * M)) / U) if cfg.anneal_lr else cfg.lr

    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps))
    def flat(obs):  # [N, ...] -> [N, obs_dim] float32 (a MinAtar grid is bool)
        return obs.reshape(obs.shape[0], -1).astype(jnp.float32)

    def v_reset(keys, params):
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
        return flat(obs), state

    def v_step(keys, state, action, params):
        obs, *rest = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, action, params)
        return flat(obs), *rest

    def logp_of(logits, actions):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], -1)[..., 0]

    def loss_fn(params, mb):
        obs, actions, logp_old, val_old, adv, ret = mb
        logits, v = policy(params, obs), value(params, obs)
        logp_all = jax.nn.log_softmax(logits)
        logp = logp_of(logits, actions)
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = jnp.exp(logp - logp_old)
        clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
        actor_loss = -jnp.minimum(ratio * adv, clipped * adv).mean()
        v_clip = val_old + jnp.clip(v - val_old, -cfg.clip_eps, cfg.clip_eps)
        value_loss = 0.5 * jnp.maximum((v - ret) ** 2, (v_clip - ret) ** 2).mean()
        return actor_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy

    def gae(rewards, values, dones, last_value):  # [T, N] each; reverse scan over time
        def back(carry, x):
            adv, next_value = carry
            r, v, d = x
            delta = r + cfg.gamma * next_value * (1.0 - d) - v
            adv = delta + cfg.gamma * cfg.gae_lambda * (1.0 - d) * adv
            return (adv, v), adv

        _, advs = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value),
                               (rewards, values, dones), reverse=True)
        return advs

    def train(key):
        key, k_actor, k_critic, k_reset = jax.random.split(key, 4)
        dummy = jnp.zeros((obs_dim,))
        params = {"actor": actor.init(k_actor, dummy), "critic": critic.init(k_critic, dummy)}
        opt_state = tx.init(params)
        obs, env_state = v_reset(jax.random.split(k_reset, N), env_params)
        running, last = jnp.zeros(N), jnp.full(N, jnp.nan)

        def env_step(carry, _):
            params, env_state, obs, running, last, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            logits = policy(params, obs)
            action = jax.random.categorical(k_act, logits)
            next_obs, env_state, reward, terminated, truncated, _ = v_step(
                jax.random.split(k_env, N), env_state, action, env_params)
            done = terminated | truncated
            running = running + reward
            ended = jnp.where(done, running, 0.0)
            last = jnp.where(done, running, last)
            running = jnp.where(done, 0.0, running)
            step = (obs, action, logp_of(logits, action), reward, done.astype(jnp.float32),
                    ended)
            return (params, env_state, next_obs, running, last, key), step

        def update(carry, _):
            params, opt_state, env_state, obs, running, last, key = carry
            (_, env_state, obs, running, last, key), traj = jax.lax.scan(
                env_step, (params, env_state, obs, running, last, key), None, T)
            t_obs, t_act, t_logp, t_rew, t_done, t_ended = traj
            values = value(params, t_obs)  # the critic once over the rollout, as metarl
            adv = gae(t_rew, values, t_done, value(params, obs))
            batch = (t_obs, t_act, t_logp, values, adv, adv + values)
            batch = jax.tree.map(lambda x: x.reshape(B, *x.shape[2:]), batch)

            def epoch(carry, _):
                params, opt_state, key = carry
                key, k_perm = jax.random.split(key)
                perm = jax.random.permutation(k_perm, B)
                mbs = jax.tree.map(lambda x: x[perm].reshape(M, MB, *x.shape[1:]), batch)

                def minibatch(carry, mb):
                    params, opt_state = carry
                    loss, grads = jax.value_and_grad(loss_fn)(params, mb)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), loss

                (params, opt_state), losses = jax.lax.scan(minibatch, (params, opt_state),
                                                           mbs)
                return (params, opt_state, key), losses

            (params, opt_state, key), _ = jax.lax.scan(epoch, (params, opt_state, key),
                                                       None, E)
            # metarl's statistic: per environment, the mean return of the episodes that
            # ended in this rollout, else the last finished one, else the running return.
            count, total = t_done.sum(0), t_ended.sum(0)
            per_env = jnp.where(count > 0, total / jnp.maximum(count, 1.0),
                                jnp.where(jnp.isnan(last), running, last))
            return (params, opt_state, env_state, obs, running, last, key), per_env.mean()

        carry = (params, opt_state, env_state, obs, running, last, key)
        _, curve = jax.lax.scan(update, carry, None, U)
        return {"final_return": curve[-1], "curve": curve}

    return train


def jax_run(cfg, p: int):
    """``(agent-steps/s, compile seconds, mean final return)`` of P agents in JAX."""
    import jax

    keys = jax.vmap(jax.random.key)(jax.numpy.arange(p))
    t0 = time.perf_counter()
    lowered = jax.jit(jax.vmap(make_jax_train(cfg))).lower(keys)
    if "custom_call" in lowered.as_text():
        print("warning: the JAX program has a custom call; a batched LAPACK call can hang "
              "XLA's CPU pool (see the module docstring)")
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(keys))  # first call
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(keys))  # the timed second call
    wall = time.perf_counter() - t0
    final = float(jax.numpy.nanmean(out["final_return"]))
    return p * cfg.num_updates * cfg.batch_size / wall, compile_s, final


def metarl_run(cfg, p: int):
    """``(agent-steps/s, mean final return)`` of P agents in metarl."""
    t0 = time.perf_counter()
    res = metarl_train(cfg, "ppo-clip", None, seeds=list(range(p)))
    return res.env_steps / (time.perf_counter() - t0), res.mean


def worker(args, cfg) -> dict:
    """One side at one P, in this (fresh) process: what the parent prints."""
    p = int(args.sizes)
    if args.worker == "jax":
        rate, compile_s, ret = jax_run(cfg, p)
        return {"rate": rate, "compile_s": compile_s, "return": ret}
    out = {}
    t0 = time.perf_counter()
    metarl_run(cfg.replace(total_timesteps=cfg.batch_size), 1)  # warm-up (compiles)
    out["warmup_s"] = time.perf_counter() - t0
    if args.compile:  # compiled once per shape: a one-update call at this P first
        t0 = time.perf_counter()
        metarl_run(cfg.replace(total_timesteps=cfg.batch_size), p)
        out["first_call_s"] = time.perf_counter() - t0
    out["rate"], out["return"] = metarl_run(cfg, p)
    return out


def run_side(side: str, p: int) -> dict:
    """Run one side at one P in a child process of this script (same arguments)."""
    argv, skip = [], False
    for a in sys.argv[1:]:  # the parent's arguments, less its --sizes and --skip
        if skip:
            skip = False
        elif a in ("--sizes", "--skip"):
            skip = True
        elif not a.startswith(("--sizes=", "--skip=")):
            argv.append(a)
    cmd = [sys.executable, __file__, *argv, "--sizes", str(p), "--worker", side]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {side} run at P={p} failed (exit {proc.returncode}): "
                         + " ".join(cmd))
    for line in lines[:-1]:
        print(line)
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,64", help="population sizes")
    ap.add_argument("--total-timesteps", type=int, default=500_000,
                    help="environment steps per agent")
    ap.add_argument("--env", default="CartPole-v1",
                    help="CartPole-v1 or a MinAtar game (e.g. Breakout-MinAtar: its "
                         "configuration row, gymnax's game on the JAX side)")
    ap.add_argument("--backend", default="torch", help="metarl's environment backend")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--compile", action="store_true",
                    help="metarl with compile=True (compiled once, in the warm-up call; "
                         "the compile time is printed separately)")
    ap.add_argument("--skip", choices=("jax", "metarl"), default=None,
                    help="leave one side out")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each P this many times, alternating the sides, and "
                         "report the medians (the machine's noise is several percent)")
    ap.add_argument("--worker", choices=("jax", "metarl"), default=None,
                    help=argparse.SUPPRESS)  # one side at one P, run by the parent
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_for(args.env, backend=args.backend,
                     total_timesteps=args.total_timesteps, compile=args.compile)
    if args.worker:
        print(json.dumps(worker(args, cfg)))
        return
    steps = cfg.num_updates * cfg.batch_size
    import jax

    print(f"{cfg.env_id}, {cfg.num_envs} envs x {cfg.num_steps} steps, {cfg.update_epochs} "
          f"epochs x {cfg.num_minibatches} minibatches, {steps:,} steps per agent; metarl: "
          f"backend {args.backend}, torch {torch.__version__}, {args.threads} threads; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    headline = {"benchmark": "vs_jax", "env": cfg.env_id, "backend": args.backend,
                "threads": args.threads,
                "compile": args.compile, "metarl_warmup_s": None,
                "steps_per_agent": steps, "jax": jax.__version__}
    print(f"{'P':>4} {'JAX steps/s':>12} {'metarl steps/s':>15} {'metarl/JAX':>10} "
          f"{'JAX return':>10} {'metarl return':>13} {'JAX compile s':>13}")
    for p in [int(s) for s in args.sizes.split(",")]:
        nan = {"rate": float("nan"), "compile_s": float("nan"), "return": float("nan")}
        js, ms = [], []
        for _ in range(max(1, args.repeats)):
            js.append(run_side("jax", p) if args.skip != "jax" else nan)
            ms.append(run_side("metarl", p) if args.skip != "metarl" else nan)
        j_rate, j_compile, j_ret = (median([j[k] for j in js])
                                    for k in ("rate", "compile_s", "return"))
        m_rate, m_ret = (median([m[k] for m in ms]) for k in ("rate", "return"))
        if args.skip != "metarl":
            headline["metarl_warmup_s"] = round(ms[0]["warmup_s"], 1)
            if "first_call_s" in ms[0]:
                headline[f"P{p}_metarl_first_call_s"] = round(ms[0]["first_call_s"], 1)
        if len(js) > 1:
            pairs = [m["rate"] / j["rate"] for j, m in zip(js, ms)]
            print(f"{p:>4} each pair, metarl/JAX: "
                  + ", ".join(f"{r:.2f}x" for r in pairs), flush=True)
            headline[f"P{p}_pair_ratios"] = [None if math.isnan(r) else round(r, 3)
                                            for r in pairs]
        ratio = m_rate / j_rate
        print(f"{p:>4} {j_rate:>12,.0f} {m_rate:>15,.0f} {ratio:>9.2f}x "
              f"{j_ret:>10.1f} {m_ret:>13.1f} {j_compile:>13.1f}", flush=True)
        for name, v, nd in (("jax_steps_per_s", j_rate, 0), ("metarl_steps_per_s", m_rate, 0),
                            ("ratio", ratio, 3), ("jax_return", j_ret, 1),
                            ("metarl_return", m_ret, 1), ("jax_compile_s", j_compile, 1)):
            headline[f"P{p}_{name}"] = None if math.isnan(v) else round(v, nd or None)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
