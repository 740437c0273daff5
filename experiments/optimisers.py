"""The optimiser study: how should a learned optimiser for PPO be meta-learned?

Meta-trains OPEN (recurrent), OPEN-FF and No-Features on Breakout-MinAtar with OpenAI-ES;
distils each into a network of its own width (black-box, on the family's synthetic data;
recurrent OPEN by an unrolled match), OPEN-FF and No-Features also into formulas
(symbolic, gplearn: there is none for recurrent OPEN), asks an LLM for each one's update
starting from Adam (OPEN) or SGD (the others); then evaluates every result beside Adam and
SGD on Breakout-MinAtar (in distribution) and on CartPole-v1, Asterix-, Freeway-,
SpaceInvaders-MinAtar and Ant-v4 (generalisation). Ends with ``report.md`` in ``--out``::

    python experiments/optimisers.py --scale smoke     # about two minutes on 2 CPU cores
    python experiments/optimisers.py --scale small     # about 50 minutes on 2 CPU cores
    python experiments/optimisers.py --scale paper --model o3-mini --base-url URL

Resuming, the LLM endpoint and the scales work as in ``experiments/lpo.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _study import GENERAL, META_ENV  # noqa: E402, F401
from _study import main as study_main  # noqa: E402

from metarl.families.optim.proposal import PROPOSALS_BY_MEMBER  # noqa: E402
from metarl.families.optim.symbolic import SymbolicData  # noqa: E402
from metarl.families.optim.synthetic import SyntheticOptions  # noqa: E402

SCALES = {
    "smoke": {
        "es": dict(popsize=4, generations=2, eval_every=1, eval_seeds=2,
                   inner={"total_timesteps": 8192}),
        "distill": {"optim": dict(epochs=1, batch_size=256, grid=SyntheticOptions(
            batches_per_epoch=2, val_batches=1, unroll=5))},
        "symbolic": {"optim": dict(population=100, generations=2,
                                   grid=SymbolicData(points=256))},
        "propose": dict(generations=2, seeds=2, inner={"total_timesteps": 8192}),
        "eval_seeds": 2,
        # Ant with 64 environments instead of 2,048 (its 2 updates take a second)
        "eval_steps": {"CartPole-v1": 1024, "*MinAtar": 8192,
                       "Ant-v4": {"num_envs": 64, "total_timesteps": 1280}},
    },
    # Sized to fit an hour on 2 cores (it took 49 minutes). A learned optimiser's step
    # costs more than the rest of PPO's update: OPEN took 8 minutes to evaluate at 32
    # MinAtar updates and 131,072 CartPole and Ant steps (a drift rule about 4 minutes at
    # twice the MinAtar budget). So ES runs 8 generations (12 took 32 minutes for the
    # three members) and evaluation 16 MinAtar updates and 65,536 CartPole and Ant steps.
    "small": {
        "es": dict(popsize=16, generations=8, eval_every=4, eval_seeds=4,
                   inner={"total_timesteps": 65536}),
        "distill": {"optim": dict(epochs=5)},
        "symbolic": {"optim": dict(population=1000, generations=10)},
        "propose": dict(generations=10, seeds=4, inner={"total_timesteps": 65536}),
        "eval_seeds": 4,
        "eval_steps": {"CartPole-v1": 65536, "*MinAtar": 131072,
                       "Ant-v4": {"num_envs": 256, "total_timesteps": 65536}},
    },
    "paper": {  # the paper's: 800 generations of 64, 1e7 MinAtar steps per agent
        "es": dict(popsize=64, generations=800, eval_every=8, eval_seeds=8, inner={}),
        "distill": {"optim": dict(epochs=20)},
        "symbolic": {"optim": dict(population=1000, generations=20)},
        "propose": dict(generations=30, seeds=8, inner={}),
        "eval_seeds": 16,
        "eval_steps": {},
    },
}

#: what the scripted model answers at the smoke scale: the warm start again, then the
#: example update the prompt shows
SCRIPTED = {m: [("warm_start_again", p.warm_start_code), (p.example["name"],
                                                          p.example["code"])]
            for m, p in PROPOSALS_BY_MEMBER.items()}

FINDINGS = [
    dict(text="LLM proposal generalises best for optimisers with few, interpretable inputs",
         a="No-Features LLM proposal", b="No-Features ES (black box)", expect="not worse"),
    dict(text="black-box distillation into a same-size network can improve generalisation",
         a="OPEN-FF distilled (same width)", b="OPEN-FF ES (black box)", expect="better"),
    dict(text="symbolic distillation does not scale to many inputs (OPEN-FF's 19)",
         a="OPEN-FF symbolic", b="OPEN-FF ES (black box)", expect="worse"),
    dict(text="black-box ES is practically the only option for many inputs (OPEN)",
         a="OPEN ES (black box)", b="OPEN LLM proposal", expect="better"),
]

LEARNED = [
    dict(member="open", prefix="OPEN ", family="optim", distill=["same"], symbolic=False,
         propose="open"),
    dict(member="open-ff", prefix="OPEN-FF ", family="optim", distill=["same"],
         symbolic=True, propose="open-ff"),
    dict(member="no-features", prefix="No-Features ", family="optim", distill=["same"],
         symbolic=True, propose="no-features"),
]


def main(argv=None) -> int:
    return study_main("optimisers", __doc__, SCALES, argv, learned=LEARNED,
                      handcrafted=["adam", "sgd"], baseline="adam", findings=FINDINGS,
                      scripted=SCRIPTED)


if __name__ == "__main__":
    sys.exit(main())
