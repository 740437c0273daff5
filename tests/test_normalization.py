"""Fitness across environments: random policy 0, PPO reference 1, order kept for negative
returns."""

import dataclasses

import pytest
import torch

from metarl.configs import RANDOM_RETURNS, config_for, normalized_return
from metarl.envs import random_return
from metarl.families import get_family

TINY = dict(total_timesteps=1024, num_steps=32, num_minibatches=2, update_epochs=2,
            backend="torch")


def test_scale_and_order():
    cart = config_for("CartPole-v1")
    assert normalized_return(cart.random_return, cart) == 0.0
    assert normalized_return(475.0, cart) == pytest.approx(1.0)
    # Pendulum's returns are negative: dividing by a negative reference reversed the order
    # (-300 / -200 = 1.5 > -250 / -200 = 1.25); the normalised score keeps it.
    pend = config_for("Pendulum-v1", reference_return=-200.0)
    assert pend.random_return == RANDOM_RETURNS["Pendulum-v1"] < -1000
    assert normalized_return(-250.0, pend) > normalized_return(-300.0, pend)
    assert -300.0 / -200.0 > -250.0 / -200.0  # the old rule's reversal
    with pytest.raises(ValueError, match="no PPO reference return"):
        normalized_return(1.0, config_for("MountainCar-v0", discrete=True))
    # the stored references of the negative-return rows (metarl's PPO, 8 seeds)
    for env_id, ref in (("Pendulum-v1", -209.75), ("Acrobot-v1", -83.69)):
        c = config_for(env_id)
        assert c.reference_return == ref and normalized_return(ref, c) == pytest.approx(1.0)
        assert normalized_return(ref - 50.0, c) < normalized_return(ref - 10.0, c) < 1.0
    with pytest.raises(ValueError, match="must be above the random policy's"):
        normalized_return(1.0, config_for("Pendulum-v1", reference_return=-2000.0))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Breakout-MinAtar", "Pendulum-v1"])
def test_stored_random_returns_are_measured(env_id):
    measured = random_return(env_id, episodes_per_env=4, num_envs=32, seed=1)
    stored = RANDOM_RETURNS[env_id]
    assert measured == pytest.approx(stored, rel=0.15, abs=0.15)


def test_two_environment_fitness_is_ordered_as_returns_are():
    """A population of two LPOs (PPO, and one with large random weights) on CartPole-v1 and
    Pendulum-v1 (negative returns, with a reference set here): each environment's
    normalised score is ordered as its raw returns, and fitness is their mean."""
    family = get_family("drift")
    member = family.make("lpo")
    n = member.num_meta_params
    params = torch.stack([torch.zeros(n), torch.randn(n, generator=torch.Generator()
                                                        .manual_seed(0)) * 3.0])
    configs = {"CartPole-v1": config_for("CartPole-v1", **TINY),
               "Pendulum-v1": dataclasses.replace(config_for("Pendulum-v1", **TINY),
                                                  reference_return=-200.0)}
    fitness, info = family.score(configs, member, params, [0])
    for env_id, c in configs.items():
        raw, norm = info["raw"][env_id], info["per_env"][env_id]
        assert torch.allclose(norm, normalized_return(raw, c))
        assert torch.equal(torch.argsort(raw), torch.argsort(norm))
    assert torch.allclose(fitness, (info["per_env"]["CartPole-v1"]
                                    + info["per_env"]["Pendulum-v1"]) / 2)


def test_per_environment_reference_and_random_returns():
    """``--reference-return ENV=VALUE`` (and ``--random-return``) set one environment's
    value among several; a single VALUE is for a single environment only."""
    from metarl.configs import parse_env_values
    from metarl.inner.ppo import prepare_configs

    assert parse_env_values(["475"], "--reference-return") == 475.0
    assert parse_env_values(["Acrobot-v1=-80", "CartPole-v1=400"], "--reference-return") == \
        {"Acrobot-v1": -80.0, "CartPole-v1": 400.0}
    for bad, why in ((["x"], "takes VALUE or ENV=VALUE"), (["=3"], "names no environment"),
                     (["A=1", "A=2"], "gives A twice"), (["1", "A=2"], "not both")):
        with pytest.raises(ValueError, match=why):
            parse_env_values(bad, "--reference-return")
    configs = prepare_configs(["CartPole-v1", "Acrobot-v1"],
                              reference_return=["Acrobot-v1=-80"],
                              random_return=["Acrobot-v1=-500"])
    assert configs["Acrobot-v1"].reference_return == -80.0
    assert configs["Acrobot-v1"].random_return == -500.0
    assert configs["CartPole-v1"].reference_return == 475.0  # keeps its own
    assert configs["CartPole-v1"].random_return == RANDOM_RETURNS["CartPole-v1"]
    with pytest.raises(ValueError, match="names Pong-v5, which is not among"):
        prepare_configs(["CartPole-v1"], reference_return={"Pong-v5": 1.0})
    with pytest.raises(ValueError, match="sets one value for every environment"):
        prepare_configs(["CartPole-v1", "Acrobot-v1"], reference_return=-80.0)
    assert prepare_configs(["CartPole-v1"], reference_return=400.0)[
        "CartPole-v1"].reference_return == 400.0


def test_meta_train_with_a_negative_return_environment(tmp_path):
    """`metarl meta-train lpo --envs CartPole-v1 Pendulum-v1` (Pendulum's returns are
    negative; its reference set on the command line): every member's logged fitness is the
    mean of its two normalised returns, and on each environment the normalised returns are
    ordered as the raw ones (plain division by a negative reference reverses them)."""
    import json

    from metarl.cli import main

    out = tmp_path / "run"
    assert main(["meta-train", "lpo", "--envs", "CartPole-v1", "Pendulum-v1",
                 "--reference-return", "Pendulum-v1=-200", "--generations", "1",
                 "--popsize", "6", "--sigma", "0.5", "--eval-every", "1", "--eval-seeds", "1",
                 "--total-timesteps", "8192", "--backend", "torch", "--wandb", "off",
                 "--no-progress", "--out", str(out)]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    fitness = torch.tensor(row["member_fitness"], dtype=torch.float64)
    configs = {e: config_for(e, reference_return=(-200.0 if e == "Pendulum-v1" else None))
               for e in ("CartPole-v1", "Pendulum-v1")}
    norm = {e: normalized_return(torch.tensor(row["member_returns"][e], dtype=torch.float64),
                                 configs[e]) for e in configs}
    assert torch.allclose(fitness, (norm["CartPole-v1"] + norm["Pendulum-v1"]) / 2)
    raw = torch.tensor(row["member_returns"]["Pendulum-v1"], dtype=torch.float64)
    assert raw.max() < 0 and len(set(raw.tolist())) > 2  # negative, and members differ
    assert torch.equal(torch.argsort(raw), torch.argsort(norm["Pendulum-v1"]))
    config = json.loads((out / "config.json").read_text())
    assert config["evolve"]["inner"]["reference_return"] == {"Pendulum-v1": -200.0}
    assert config["inner"]["Pendulum-v1"]["reference_return"] == -200.0
    assert config["inner"]["CartPole-v1"]["reference_return"] == 475.0
