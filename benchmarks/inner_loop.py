"""Throughput of population PPO (CartPole-v1 by default, the paper's configuration).

For each population size P it trains P agents at once and reports agent-steps per second
(environment steps summed over members, divided by wall time), then trains members of
the same population one at a time in the same process (P = 1 calls of the same function)
and reports the ratio. One-at-a-time throughput does not depend on
how many members are run in sequence, so it is measured on ``--alone`` members and
compared with every P.

    python benchmarks/inner_loop.py                       # P = 1, 8, 64, envpool backend
    python benchmarks/inner_loop.py --backend torch --ablate
    python benchmarks/inner_loop.py --sizes 64 --optimisers  # + the optimiser slot at P=64
    python benchmarks/inner_loop.py --backend torch --compile  # + compile=True at each P
    python benchmarks/inner_loop.py --env Breakout-MinAtar --sizes 1,8,64 --updates 3

With ``--optimisers``, each optimiser-family member (adam, sgd, and the learned open-ff,
open, no-features at their seeded initialisation) fills the optimiser slot at the largest
P, and its throughput is printed next to the drift loop's (ppo-clip with Adam) at the
same P, as a ratio (eager against eager; with ``--compile`` the members run compiled, after
a compiling warm-up, against the eager drift loop).

Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metarl.configs import config_for
from metarl.inner import train


def rate(cfg, seeds, algorithm="ppo-clip", meta_params=None, **kw):
    t0 = time.perf_counter()
    res = train(cfg, algorithm, meta_params, seeds=seeds, **kw)
    wall = time.perf_counter() - t0
    return res.env_steps / wall, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,64", help="population sizes")
    ap.add_argument("--updates", type=int, default=12, help="PPO updates per measurement")
    ap.add_argument("--alone", type=int, default=4, help="members trained one at a time")
    ap.add_argument("--backend", default="envpool", help="environment backend")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimisers", action="store_true",
                    help="also measure every optimiser-family member in the optimiser slot "
                         "at the largest P")
    ap.add_argument("--env", default="CartPole-v1",
                    help="environment id (its configuration row; e.g. Breakout-MinAtar)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--compile", action="store_true",
                    help="also measure each P with compile=True: the first call's extra "
                         "time (compilation) and the rate of a second call")
    ap.add_argument("--ablate", action="store_true",
                    help="also measure P=64 with vmap(functional_call) instead of the fused "
                         "forward, and with the other environment backend")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = args.backend if args.env == "CartPole-v1" or args.backend != "envpool" else "auto"
    base = config_for(args.env, backend=backend, device=args.device)
    cfg = base.replace(total_timesteps=base.batch_size * args.updates)
    print(f"{args.env}, {cfg.num_envs} envs x {cfg.num_steps} steps per update, "
          f"{cfg.update_epochs} epochs x {cfg.num_minibatches} minibatches, "
          f"{args.updates} updates, backend {args.backend}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate(cfg.replace(total_timesteps=cfg.batch_size), [0])  # warm-up

    if args.alone < 1:
        raise SystemExit("--alone must be at least 1 (the ratios are against it)")
    t0 = time.perf_counter()
    steps = sum(train(cfg, "ppo-clip", seeds=[1000 + i]).env_steps
                for i in range(args.alone))
    alone = steps / (time.perf_counter() - t0)
    print(f"one at a time: {alone:,.0f} agent-steps/s (mean of {args.alone} members)")

    headline = {"benchmark": "inner_loop", "env": args.env, "backend": backend,
                "device": args.device, "threads": torch.get_num_threads(),
                "one_at_a_time_steps_per_s": round(alone)}
    for p in [int(s) for s in args.sizes.split(",")]:
        r, res = rate(cfg, list(range(p)))
        t = res.timings
        share = t["rollout"] / (t["rollout"] + t["update"])
        print(f"P={p:>3}: {r:>10,.0f} agent-steps/s   {r / alone:6.1f}x one-at-a-time   "
              f"(rollout {share:.0%} of loop time)")
        headline[f"P{p}_steps_per_s"] = round(r)
        headline[f"P{p}_ratio"] = round(r / alone, 2)
        headline[f"P{p}_rollout_share"] = round(share, 3)
        if args.compile:
            first, _ = rate(cfg.replace(compile=True), list(range(p)))
            rc, res_c = rate(cfg.replace(compile=True), list(range(p)))
            compile_s = res.env_steps / first - res.env_steps / rc
            t = res_c.timings
            print(f"P={p:>3} compiled: {rc:>10,.0f} agent-steps/s   {rc / r:5.2f}x eager   "
                  f"{rc / alone:6.1f}x one-at-a-time   (rollout "
                  f"{t['rollout'] / (t['rollout'] + t['update']):.0%}; first call "
                  f"{compile_s:.1f} s longer: compilation)")
            headline[f"P{p}_compiled_steps_per_s"] = round(rc)
            headline[f"P{p}_compiled_over_eager"] = round(rc / r, 3)
            headline[f"P{p}_compile_s"] = round(compile_s, 1)

    if args.optimisers:
        from metarl.families import get_family

        optim = get_family("optim")
        p = max(int(s) for s in args.sizes.split(","))
        drift_rate = headline[f"P{p}_steps_per_s"]
        ocfg = cfg.replace(compile=args.compile)
        for name in optim.members:
            meta = optim.initial_params(name, 0) if optim.is_learned(name) else None
            if args.compile:  # compile outside the timed run
                rate(ocfg.replace(total_timesteps=cfg.batch_size), list(range(p)), name, meta)
            r, res = rate(ocfg, list(range(p)), name, meta)
            t = res.timings
            print(f"P={p:>3} optimiser slot {name:>12}: {r:>10,.0f} agent-steps/s   "
                  f"{r / drift_rate:5.2f}x the drift loop (ppo-clip + Adam)   "
                  f"(update {t['update'] / (t['rollout'] + t['update']):.0%} of loop time)")
            headline[f"P{p}_optim_{name}_steps_per_s"] = round(r)
            headline[f"P{p}_optim_{name}_ratio_to_drift"] = round(r / drift_rate, 3)

    if args.ablate:
        p = 64
        r, _ = rate(cfg.replace(fused=False), list(range(p)))
        print(f"P={p} with vmap(functional_call): {r:,.0f} agent-steps/s")
        headline["P64_vmap_steps_per_s"] = round(r)
        other = "torch" if args.backend == "envpool" else "envpool"
        r, _ = rate(cfg.replace(backend=other), list(range(p)))
        print(f"P={p} on the {other} backend: {r:,.0f} agent-steps/s")
        headline[f"P64_{other}_steps_per_s"] = round(r)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
