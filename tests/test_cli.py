import json
import subprocess
import sys

import pytest

from metarl.artifact import load
from metarl.cli import main
from metarl.inner.ppo import prepare_configs, train
from metarl.train import parse_seeds

TINY = ["--total-timesteps", "256", "--num-steps", "32", "--backend", "torch", "--no-progress"]


def test_train_writes_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--algorithm", "dpo", "--envs", "CartPole-v1", "--seeds", "3",
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "mean ± s.e." in printed and "| 2 |" in printed
    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    env = results["envs"]["CartPole-v1"]
    # the command's numbers are the library's: the same training called directly
    member, params = load("dpo").build()
    cfg = prepare_configs(["CartPole-v1"], total_timesteps=256, num_steps=32,
                          backend="torch")["CartPole-v1"]
    direct = train(cfg, member, params, seeds=[0, 1, 2], progress=False)
    assert env["final_return"] == [float(x) for x in direct.final_return]
    assert env["mean"] == pytest.approx(sum(env["final_return"]) / 3)
    config = json.loads((out / "config.json").read_text())
    assert config["envs"]["CartPole-v1"]["total_timesteps"] == 256
    assert config["envs"]["CartPole-v1"]["lr"] == 1e-3  # the paper's CartPole row
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["update"] == 1


def test_flags_override_config(tmp_path):
    out = tmp_path / "run"
    main(["train", "--envs", "CartPole-v1", "--seeds", "0,5", "--lr", "0.0005",
          "--num-envs", "2", "--no-anneal-lr", "--out", str(out), *TINY])
    config = json.loads((out / "config.json").read_text())
    cfg = config["envs"]["CartPole-v1"]
    assert cfg["lr"] == 0.0005 and cfg["num_envs"] == 2 and cfg["anneal_lr"] is False
    assert config["seeds"] == [0, 5]


@pytest.mark.parametrize("args, message", [
    (["--envs", "CartPol-v1"], "Closest known ids: CartPole-v1"),
    (["--algorithm", "clip"], "known: drift: ppo-clip, dpo, lpo; optim: adam, sgd"),
    (["--algorithm", "open-fff"], "Did you mean 'open-ff'?"),
    (["--total-timesteps", "0"], "total_timesteps must be a positive integer"),
    (["--total-timesteps", "-100"], "total_timesteps must be a positive integer"),
    (["--normalize-obs"], "continuous-control option"),
    (["--seeds", "0"], "--seeds must be a positive count"),
    (["--seeds", "a,b"], "comma-separated integers"),
    (["--device", "cuda"], "no CUDA device available"),
    (["--device", "tpu9"], "is not a torch device"),
])
def test_bad_input_fails_with_a_message(tmp_path, capsys, args, message):
    code = main(["train", "--out", str(tmp_path / "r"), "--no-progress", "--backend", "torch",
                 "--total-timesteps", "512", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "results.json").exists()


def test_train_fills_the_optimiser_slot_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--algorithm", "sgd", "--seeds", "2", "--sgd-lr", "0.01",
                 "--out", str(out), *TINY]) == 0
    assert "sgd: drift ppo-clip, optimiser sgd" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())["envs"]["CartPole-v1"]
    assert results["family"] == "optim" and config["sgd_lr"] == 0.01
    assert config["separate_grad_clip"] is None  # resolved per family inside the loop


def test_envs_lists_ids(capsys):
    assert main(["envs", "CartPole"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1" in out and "envpool, torch, gymnasium" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--total-timesteps" in out and "--algorithm" in out


def test_parse_seeds():
    assert parse_seeds("8") == list(range(8))
    assert parse_seeds("3,5") == [3, 5]
    assert parse_seeds(2) == [0, 1]


def test_train_and_evaluate_refuse_another_runs_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"command": "meta-train"}')
    (out / "metrics.jsonl").write_text('{"generation": 0}\n')
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert main(["evaluate", "ppo-clip", "--out", str(out), *TINY]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"generation": 0}\n'


def test_an_algorithm_that_cannot_train_is_refused_before_any_work(tmp_path, capsys):
    """sgd on an environment without a tuned SGD rate, and OPEN without the fused forward
    (dormancy needs it), fail before a run directory or an earlier row is written."""
    out = tmp_path / "ev"
    assert main(["evaluate", "ppo-clip", "sgd", "--envs", "Pendulum-v1", "--out", str(out),
                 *TINY]) == 2
    assert "no tuned SGD learning rate; pass --sgd-lr" in capsys.readouterr().err
    assert main(["train", "--algorithm", "open", "--no-fused", "--out", str(out),
                 *TINY]) == 2
    assert "drop --no-fused" in capsys.readouterr().err
    assert not out.exists()
