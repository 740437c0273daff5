"""Cost of one optimiser step for a population, per member of the optimiser family.

The optimiser slot of the inner loop runs its member once per minibatch on every
parameter of every agent: at P = 64 on CartPole (64x64 tanh actor and critic, 9,155
parameters each) that is 586,000 parameters per step, 16 steps per PPO update. This
script times that step alone, outside the loop, for Adam (the drift loop's optimiser, the
baseline) and each other member at its seeded initialisation, on random gradients and
activations, and prints each one's time per step and its ratio to Adam's in the same run.

    python benchmarks/optim_step.py                      # P = 64, 2 threads
    python benchmarks/optim_step.py --sizes 8,64 --threads 1 --steps 30
    python benchmarks/optim_step.py --compile            # the compiled step

It uses only the family's interface (``member.population(...).init/step``), so it runs
unchanged on earlier commits: check one out in a worktree and run this file there to
measure before and after in one sitting. Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metarl import rng
from metarl.configs import config_for
from metarl.families import OPTIM
from metarl.families.optim import AgentLayout, StepContext
from metarl.nets import ActorCritic

MEMBERS = ("adam", "sgd", "open", "open-ff", "no-features")


def time_member(name: str, P: int, steps: int, layout, cfg) -> tuple[float, float]:
    """Median seconds per step of member ``name`` for ``P`` agents (after two warm-up
    steps), and a checksum of the parameters after the timed steps."""
    member = OPTIM.make(name)
    meta = torch.stack([OPTIM.initial_params(name, s) for s in range(P)])
    g = torch.Generator().manual_seed(0)
    D = layout.numel
    params = torch.randn(P, D, generator=g) * 0.1
    grads = [torch.randn(P, D, generator=g) * 0.01 for _ in range(4)]
    acts = {k: torch.rand(P, w, generator=g) for k, w in layout.groups.items()}
    stepper = member.population(meta, layout, cfg, rng.seed_keys(list(range(P))))
    state = stepper.init(params)
    times = []
    for i in range(steps + 2):
        ctx = StepContext(i // 16, 64, (i // 4) % 4, 4, i % 4, 4,
                          acts if stepper.needs_activations else None)
        t0 = time.perf_counter()
        stepper.step(params, grads[i % 4], state, ctx)
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return times[len(times) // 2], float(params.double().sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64", help="population sizes")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per member")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--members", default=",".join(MEMBERS))
    ap.add_argument("--compile", action="store_true",
                    help="compile=True (the learned members' noise and network; the first "
                         "two steps, untimed, compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_for("CartPole-v1").replace(compile=args.compile)
    layout = AgentLayout.for_actor_critic(ActorCritic(4, 2, True, cfg.hidden, cfg.layers,
                                                      cfg.activation))
    names = ["adam"] + [m for m in args.members.split(",") if m and m != "adam"]
    headline = {"threads": args.threads, "params_per_agent": layout.numel,
                "compile": args.compile}
    for P in [int(s) for s in args.sizes.split(",")]:
        base = None
        print(f"P = {P}: {P * layout.numel:,} parameters per step")
        for name in names:
            sec, checksum = time_member(name, P, args.steps, layout, cfg)
            base = sec if name == "adam" else base
            print(f"  {name:12s} {1e3 * sec:8.2f} ms per step  "
                  f"{P * layout.numel / sec / 1e6:7.1f} M parameters/s  "
                  f"{sec / base:6.1f}x adam's time   (checksum {checksum:.6e})")
            headline[f"P{P}_{name}_ms"] = round(1e3 * sec, 3)
            headline[f"P{P}_{name}_vs_adam"] = round(sec / base, 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
