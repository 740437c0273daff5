"""The MinAtar games through metarl's registry: ids, specs, configurations, PPO."""

import pytest
import torch

from metarl import envs
from metarl.configs import config_for
from metarl.envs.minatar import GAMES
from metarl.inner.ppo import train

#: the minimal action sets and channel counts of gymnax's MinAtar (as the paper ran it)
EXPECTED = {"Asterix-MinAtar": (5, 4), "Breakout-MinAtar": (3, 4), "Freeway-MinAtar": (3, 7),
            "SpaceInvaders-MinAtar": (4, 6), "Seaquest-MinAtar": (6, 10)}


@pytest.mark.parametrize("env_id", sorted(GAMES))
def test_registered_game_has_the_papers_spec(env_id):
    assert envs.backends_for(env_id) == ["torch"]
    env = envs.make(env_id, 4, seed=0)
    actions, channels = EXPECTED[env_id]
    assert env.spec.num_actions == actions and env.spec.obs_shape == (100 * channels,)
    assert env.spec.max_episode_steps == (2500 if env_id == "Freeway-MinAtar" else 1000)
    obs = env.reset()
    assert obs.shape == (4, 100 * channels) and set(obs.unique().tolist()) <= {0.0, 1.0}
    gymnax = pytest.importorskip("gymnax")
    genv, params = gymnax.make(env_id)
    assert genv.action_space(params).n == actions
    assert tuple(genv.observation_space(params).shape) == (10, 10, channels)


@pytest.mark.parametrize("env_id", ["Breakout-MinAtar", "SpaceInvaders-MinAtar"])
def test_ppo_trains_on_a_game_with_the_papers_row(env_id):
    cfg = config_for(env_id, total_timesteps=64 * 128, num_envs=64)
    assert (cfg.num_steps, cfg.update_epochs, cfg.num_minibatches, cfg.activation) == (
        128, 4, 8, "relu")
    res = train(cfg, "ppo-clip", None, [0, 1])
    assert res.env_steps == 2 * 64 * 128
    assert bool(torch.isfinite(res.final_return).all()) and not bool(res.failed.any())
    # the same seed trains alike alone or in a population
    alone = train(cfg, "ppo-clip", None, [1])
    assert torch.equal(alone.final_return, res.final_return[1:])


def test_meta_training_on_breakout_and_cartpole(tmp_path):
    """`metarl meta-train lpo --envs Breakout-MinAtar CartPole-v1` end to end (a tiny
    budget): fitness is the mean of each environment's normalised return."""
    from metarl.cli import main

    out = tmp_path / "run"
    assert main(["meta-train", "lpo", "--envs", "Breakout-MinAtar", "CartPole-v1",
                 "--generations", "1", "--popsize", "2", "--eval-every", "1",
                 "--eval-seeds", "1", "--total-timesteps", "8192", "--wandb", "off",
                 "--no-progress", "--out", str(out)]) == 0
    import json

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert lines and all(torch.isfinite(torch.tensor(x["fitness_mean"])) for x in lines)
    art = json.loads((out / "results.json").read_text())
    assert art["generations"] == 1
