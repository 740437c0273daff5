"""Share of meta-training wall time spent outside the inner loop.

Runs a few generations of ``metarl meta-train lpo`` at population 64 for each strategy and
splits the wall time of the whole call into the inner loop (training and evaluating
agents: every call of ``metarl.meta.evolve.score``) and everything else (ask, tell, fitness
bookkeeping, checkpoints, artifacts, logging, and the run's set-up and wrap-up, counted
against the loop on purpose). Target: under 2% outside the inner loop at population 64.

    python benchmarks/evolve.py
    python benchmarks/evolve.py --generations 4 --total-timesteps 8192

Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from metarl.meta import evolve


def measure(strategy: str, args) -> dict:
    inner = {"t": 0.0}
    original = evolve.score

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            inner["t"] += time.perf_counter() - t0

    cfg = evolve.EvolveConfig(
        strategy=strategy, generations=args.generations, popsize=args.popsize,
        eval_every=args.generations, eval_seeds=8, wandb=args.wandb,
        inner=dict(total_timesteps=args.total_timesteps, backend=args.backend))
    evolve.score = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            evolve.meta_train(cfg, out=out, progress=False, echo=lambda *a: None)
            total = time.perf_counter() - t0
    finally:
        evolve.score = original
    outside = total - inner["t"]
    return {"total_s": total, "inner_s": inner["t"], "outside_s": outside,
            "outside_share": outside / total,
            "outside_per_generation_s": outside / args.generations}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default="openai-es,cma-es")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--total-timesteps", type=int, default=4096,
                    help="inner steps per agent (the paper uses 5e5: the share only shrinks)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--wandb", default="offline", choices=["offline", "off"])
    args = ap.parse_args()
    print(f"lpo on CartPole-v1, population {args.popsize}, {args.generations} generations, "
          f"{args.total_timesteps} inner steps per agent, W&B {args.wandb}")
    headline = {"benchmark": "evolve", "popsize": args.popsize,
                "total_timesteps": args.total_timesteps}
    for name in args.strategies.split(","):
        m = measure(name, args)
        print(f"{name:>10}: {m['total_s']:.1f} s in all, inner loop {m['inner_s']:.1f} s, "
              f"outside {m['outside_s']:.2f} s = {m['outside_share']:.2%} "
              f"({m['outside_per_generation_s']:.3f} s per generation)")
        headline[f"{name}_outside_share"] = round(m["outside_share"], 4)
        headline[f"{name}_outside_per_generation_s"] = round(m["outside_per_generation_s"], 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
