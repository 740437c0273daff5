"""Meta-learning happens: evolution raises fitness over generations on tiny problems.

Starting exactly at PPO (zero LPO weights) and 20 generations of 8-16 members is too little
to beat PPO reliably at this scale, so the tiny problem starts the strategies from a
damaged drift (random LPO weights large enough to hamper learning) and checks that both
strategies recover fitness: the population's mean fitness over the last five generations
must exceed that of the first five by a clear margin. Every generation shares one inner
seed, so fitness is comparable across generations.
"""

import json

import pytest
import torch

from metarl.artifact import network_artifact, save
from metarl.meta.evolve import EvolveConfig, meta_train


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1152, generator=g) * 0.15
    path = tmp_path_factory.mktemp("init") / "damaged.pt"
    save(network_artifact("lpo", params, {"method": "test: random weights"}), path)
    return path


@pytest.mark.parametrize("strategy, popsize, settings", [
    ("openai-es", 8, dict(sigma=0.1, lr=0.01)),
    # CMA-ES with 8 members improves too (37 -> ~100) but its population mean is noisy
    # enough that a single generation can move the five-generation averages by 20%.
    # (slow: 40 s; the fast set keeps OpenAI-ES's, and CMA-ES's resume tests)
    pytest.param("cma-es", 16, dict(sigma=0.05), marks=pytest.mark.slow),
])
def test_fitness_improves_over_20_generations(tmp_path, damaged, strategy, popsize, settings):
    cfg = EvolveConfig(strategy=strategy, generations=20, popsize=popsize, eval_every=20,
                       eval_seeds=4, wandb="off", new_seed_each_generation=False,
                       init=str(damaged), **settings,
                       inner=dict(total_timesteps=4096, num_steps=32, backend="torch"))
    meta_train(cfg, out=tmp_path, progress=False, echo=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fitness = [r["fitness_mean"] for r in rows]
    first, last = sum(fitness[:5]) / 5, sum(fitness[-5:]) / 5
    assert last > 1.25 * first, fitness


def test_es_raises_open_ff_fitness_on_a_tiny_problem(tmp_path):
    """OPEN-FF from its seeded default initialisation (a random optimiser, whose updates
    are not aligned with the gradient) on CartPole-v1 with 16-unit agents and 4,096 steps:
    OpenAI-ES (8 members, sigma 0.1, meta lr 0.03) finds an optimiser that learns. Measured
    during development: 21.6 mean fitness over the first five generations, 85.5 over the
    last five of 20."""
    cfg = EvolveConfig(algorithm="open-ff", strategy="openai-es", generations=20, popsize=8,
                       sigma=0.1, lr=0.03, eval_every=20, eval_seeds=4, wandb="off",
                       new_seed_each_generation=False,
                       inner=dict(total_timesteps=4096, num_steps=32, hidden=16,
                                  backend="torch"))
    meta_train(cfg, out=tmp_path, progress=False, echo=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fitness = [r["fitness_mean"] for r in rows]
    first, last = sum(fitness[:5]) / 5, sum(fitness[-5:]) / 5
    assert last > 2 * first, fitness
    assert rows[-1]["eval_fitness"] > 2 * first, rows[-1]
