"""Meta-training by evolution: failure containment, exact resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarl.artifact import load
from metarl.cli import main
from metarl.meta.evolve import FAILED_FITNESS, EvolveConfig, meta_train

TINY_INNER = dict(total_timesteps=256, num_steps=32, num_minibatches=2, update_epochs=2,
                  backend="torch")
TINY_FLAGS = ["--total-timesteps", "256", "--num-steps", "32", "--num-minibatches", "2",
              "--update-epochs", "2", "--backend", "torch", "--wandb", "off", "--no-progress"]


def tiny(**kw):
    base = dict(generations=3, popsize=4, eval_every=2, eval_seeds=2, wandb="off",
                inner=dict(TINY_INNER))
    return EvolveConfig(**{**base, **kw})


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "wall_time", "inner_share")}
            for r in rows]


def read_metrics(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def test_nan_member_is_scored_logged_and_the_run_goes_on(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"members \[1\] failed"):
        res = meta_train(tiny(), out=tmp_path, progress=False,
                         fail_members=lambda gen: [1] if gen == 0 else [])
    rows = read_metrics(tmp_path)
    assert rows[0]["failed"] == 1 and rows[1]["failed"] == 0
    # the failed member is scored FAILED_FITNESS, its return recorded as missing, and the
    # generation's statistics are those of the members that trained
    fit = rows[0]["member_fitness"]
    assert fit[1] == FAILED_FITNESS and rows[0]["member_returns"]["CartPole-v1"][1] is None
    ok = [f for i, f in enumerate(fit) if i != 1]
    assert rows[0]["fitness_mean"] == pytest.approx(sum(ok) / 3)
    assert rows[0]["fitness_min"] == pytest.approx(min(ok))
    assert min(ok) > FAILED_FITNESS and rows[0]["fitness_min"] > 0  # CartPole returns
    assert len(rows) == 3 and res["best_eval_fitness"] > 0
    art = load(tmp_path / "best.pt")
    assert torch.isfinite(art.representation["params"]).all()


def test_run_directory_and_artifacts(tmp_path):
    res = meta_train(tiny(strategy="cma-es"), out=tmp_path, progress=False)
    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md", "best.pt",
                 "final.pt", "checkpoint.pt"):
        assert (tmp_path / name).exists(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["env_steps"] == res["env_steps"] > 0
    art = load(tmp_path / "best.pt")
    assert art.family == "drift" and art.representation["member"] == "lpo"
    prov = art.provenance
    assert prov["method"] == "evolve" and prov["strategy"]["strategy"] == "cma-es"
    assert prov["meta_train_envs"] == ["CartPole-v1"] and prov["env_steps"] > 0
    assert prov["metarl_version"] and prov["seed"] == 0


GENERATIONS = 8


def run_cli(out, *extra, algorithm="lpo"):
    return [sys.executable, "-m", "metarl.cli", "meta-train", algorithm, "--generations",
            str(GENERATIONS),
            "--popsize", "4", "--eval-every", "2", "--eval-seeds", "2", "--out", str(out),
            *TINY_FLAGS, *extra]


@pytest.mark.parametrize("algorithm, strategy", [
    ("lpo", "openai-es"), ("lpo", "cma-es"), ("open-ff", "openai-es"), ("open", "cma-es")])
def test_sigkill_mid_generation_then_resume_is_exact(tmp_path, algorithm, strategy):
    # A generation must last long enough that the kill lands before the run ends (LPO's
    # tiny generations take a few milliseconds): LPO trains 8 updates, not 4.
    budget = ["--total-timesteps", "1024"] if algorithm == "lpo" else []
    flags = [strategy, *budget]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(run_cli(straight, "--es", *flags, algorithm=algorithm), check=True,
                   env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(run_cli(killed, "--es", *flags, algorithm=algorithm), env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for generation 2's checkpoint, then kill mid-gen 3
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["generation"] >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # it really stopped early
    assert torch.load(ckpt, weights_only=False)["generation"] < GENERATIONS

    subprocess.run(run_cli(killed, "--es", *flags, "--resume", algorithm=algorithm),
                   check=True, env=env, capture_output=True)
    for name in ("best.pt", "final.pt"):
        a, b = load(straight / name), load(killed / name)
        assert torch.equal(a.representation["params"], b.representation["params"]), name
        assert a.provenance["env_steps"] == b.provenance["env_steps"]
    assert strip_times(read_metrics(straight)) == strip_times(read_metrics(killed))


@pytest.mark.parametrize("args, message", [
    (["lpo", "--es", "snes"], "unknown evolution strategy 'snes'"),
    (["ppo-clip"], "cannot meta-train 'ppo-clip'"),
    (["adam"], "handcrafted member of the optim family"),
    (["opne-ff"], "unknown algorithm 'opne-ff'"),
    (["open-ff", "--init", "ppo-clip"], "starts from a network artifact of open-ff"),
    (["lpo", "--init", "nothere.pt"], "--init nothere.pt: no artifact at 'nothere.pt'"),
    (["lpo", "--envs"], "--envs is empty"),
    (["lpo", "--envs", "CartPole-v7"], "unknown environment id 'CartPole-v7'"),
    (["lpo", "--envs", "CartPole-v1", "MountainCar-v0"], "no PPO reference return"),
    (["lpo", "--envs", "CartPole-v1", "Acrobot-v1", "--reference-return", "-80"],
     "sets one value for every environment"),
    (["lpo", "--sigma", "0"], "sigma must be a positive finite number"),
    (["lpo", "--device", "cuda:0"], "no CUDA device available"),
    (["lpo", "--popsize", "5"], "popsize must be even"),
    (["lpo", "--generations", "0"], "generations must be a positive integer"),
    (["lpo", "--total-timesteps", "0"], "total_timesteps must be a positive integer"),
])
def test_bad_input_fails_at_once(tmp_path, capsys, args, message):
    code = main(["meta-train", *args, "--out", str(tmp_path / "r"), "--wandb", "off",
                 "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_resume_without_checkpoint_or_with_other_config(tmp_path, capsys):
    assert main(["meta-train", "lpo", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    meta_train(tiny(generations=1, eval_every=1), out=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        meta_train(tiny(generations=1, eval_every=1, popsize=6), out=tmp_path / "r",
                   resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        meta_train(tiny(generations=1, eval_every=1), out=tmp_path / "r", progress=False)


def test_init_of_another_family_or_width_is_refused(tmp_path):
    from metarl.artifact import network_artifact, save

    save(network_artifact("open-ff", torch.zeros(707), {}), tmp_path / "opt.pt")
    save(network_artifact("lpo", torch.zeros(144), {}, hidden=16), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="network open-ff of the optim family; meta-training "
                                         "lpo starts from a network artifact of lpo"):
        meta_train(tiny(init=str(tmp_path / "opt.pt")), out=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"144 parameters \(width 16\).*default lpo with 1152"):
        meta_train(tiny(init=str(tmp_path / "narrow.pt")), out=tmp_path / "b",
                   progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_another_runs_directory_is_not_overwritten(tmp_path):
    """A directory holding another command's run (or a meta-train killed before its
    first checkpoint) is refused, and its metrics are kept."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"keep": 1}\n')
    with pytest.raises(ValueError, match="already holds another run"):
        meta_train(tiny(), out=tmp_path, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"keep": 1}\n'


def test_zeros_init_and_seeded_default_init():
    from metarl.meta.evolve import initial_params

    assert torch.equal(initial_params(tiny(algorithm="open-ff", init="zeros")),
                       torch.zeros(707))
    a = initial_params(tiny(algorithm="open-ff", seed=3))
    assert torch.equal(a, initial_params(tiny(algorithm="open-ff", seed=3)))
    assert not torch.equal(a, initial_params(tiny(algorithm="open-ff", seed=4)))
    assert torch.equal(initial_params(tiny()), torch.zeros(1152))  # LPO: zeros, i.e. PPO
