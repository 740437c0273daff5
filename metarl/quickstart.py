"""``metarl quickstart``: the README's main job on embedded defaults.

A short meta-training of LPO with OpenAI-ES on CartPole-v1 (about ten minutes on 2 CPU
cores), then an evaluation of the best artifact against ``ppo-clip`` and ``dpo`` on
CartPole-v1 (in distribution) and Acrobot-v1 (out of distribution). Small on purpose: it
shows the whole workflow and its files, not the paper's result, which takes 800
generations of 64.
"""

from __future__ import annotations

from pathlib import Path

from metarl.evaluate import evaluate
from metarl.meta.evolve import EvolveConfig, meta_train

INNER = dict(total_timesteps=32_768)
EVOLVE = dict(algorithm="lpo", strategy="openai-es", envs=["CartPole-v1"], generations=12,
              popsize=16, eval_every=4, eval_seeds=8, inner=INNER)
EVAL_ENVS = ["CartPole-v1", "Acrobot-v1"]


def quickstart(out: str | Path = "runs/quickstart", resume: bool = False,
               wandb: str = "offline", progress: bool = True, echo=print) -> dict:
    out = Path(out)
    cfg = EvolveConfig(**EVOLVE, wandb=wandb)
    echo(f"1/2 meta-training LPO with OpenAI-ES on CartPole-v1: {cfg.generations} "
         f"generations of {cfg.popsize}, {INNER['total_timesteps']:,} steps per agent")
    done = (out / "meta-train" / "results.json").exists()
    if (out / "meta-train").exists() and not resume:
        raise ValueError(f"{out} already holds a quickstart; add --resume to finish or "
                         f"re-evaluate it, or choose another --out")
    if not done:
        meta_train(cfg, out=out / "meta-train", progress=progress, echo=echo,
                   resume=resume and (out / "meta-train" / "checkpoint.pt").exists())
    echo("2/2 evaluating the best LPO against ppo-clip and dpo, 8 seeds each")
    return evaluate([str(out / "meta-train" / "best.pt"), "ppo-clip", "dpo"], EVAL_ENVS,
                    seeds=8, out=out / "evaluate", progress=progress, echo=echo,
                    overwrite=resume, **INNER)
