"""Black-box distillation of the learned optimisers on synthetic inputs (no environment).

OPEN-FF and No-Features match the teacher's update on fresh synthetic batches; recurrent
OPEN matches the final parameters of a synthetic unroll. Each is checked against the
teacher independently of the fitting code, and a killed run resumes exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metarl.artifact import load, network_artifact, save
from metarl.cli import main
from metarl.families import get_family
from metarl.families.optim import synthetic as S
from metarl.meta.distill import DistillConfig, distill

FAST = dict(lr_start=1e-2, lr_end=1e-3, wandb="off")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Each learned optimiser with a seeded random network whose last layer is scaled up
    10x, so that it takes steps of about 1e-3 (the default initialisation's are ~1e-4)."""
    root = tmp_path_factory.mktemp("teachers")
    fam = get_family("optim")
    out = {}
    for name in ("open-ff", "no-features", "open"):
        member = fam.make(name).reset_parameters(7)
        with torch.no_grad():
            member.l3.weight.mul_(10.0)
        params = member.flat_params()
        out[name] = save(network_artifact(name, params, {"method": "test", "env_steps": 500,
                                                         "wall_time": 2.0},
                                          name=f"t-{name}"), root / f"{name}.pt")
    return out


def fresh_error(teacher_path, student_path, n=4096, seed=12345):
    """The student's update MSE (1e-3 units) against the teacher on a fresh sample drawn
    here, and the zero update's, computed from the artifacts alone."""
    teacher, tp = load(teacher_path).build()
    student, sp = load(student_path).build()
    teacher.load_flat(tp)
    student.load_flat(sp)
    raw = S.sample(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = S.features(teacher, raw)
        t = S.update(teacher, x, raw["eps"]) / S.UNIT
        s = S.update(student, x, raw["eps"]) / S.UNIT
    return float(((s - t) ** 2).mean()), float((t ** 2).mean())


@pytest.mark.parametrize("name", ["open-ff", "no-features"])
def test_feed_forward_student_matches_the_teacher(name, teachers, tmp_path):
    res = distill(DistillConfig(teacher=str(teachers[name]), epochs=4, **FAST,
                                grid=S.SyntheticOptions(batches_per_epoch=40, val_batches=2)),
                  out=tmp_path / "d", progress=False)
    assert res["student"] == name and res["hidden"] == 16 and res["env_steps"] == 0
    assert res["train_points"] == 40 * 2048 and res["val_points"] == 2 * 2048
    # Measured: open-ff 2.22 against the zero update's 13.5; no-features 0.76 / 20.5.
    assert res["val_update_mse"] < 0.25 * res["val_update_mse_of_zero_update"]
    # Independently: the saved student against the teacher on points drawn here.
    err, zero = fresh_error(teachers[name], tmp_path / "d" / "student.pt")
    assert err < 0.25 * zero
    assert abs(err - res["val_update_mse"]) < 0.5 * res["val_update_mse"] + 1e-4
    art = load(tmp_path / "d" / "student.pt")
    assert art.provenance["teacher"] == f"t-{name}" and art.provenance["env_steps"] == 0
    assert art.representation["member"] == name
    # More training fits better: the error falls over the epochs.
    lines = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert lines[-1]["val_update_mse"] < 0.7 * lines[0]["val_update_mse"]


def test_smaller_student_and_its_artifact(teachers, tmp_path):
    res = distill(DistillConfig(teacher=str(teachers["open-ff"]), hidden=4, epochs=2, **FAST,
                                grid=S.SyntheticOptions(batches_per_epoch=20, val_batches=1)),
                  out=tmp_path / "d", progress=False)
    member, params = load(tmp_path / "d" / "student.pt").build()
    assert member.hidden == 4 and params.numel() == res["student_params"]
    assert res["student_params"] == 19 * 4 + 4 + 2 * 4 + 4 * 4 + 4 + 2 * 4 + 4 * 3 + 3


def test_recurrent_open_is_distilled_by_unrolling(teachers, tmp_path):
    grid = S.SyntheticOptions(batches_per_epoch=6, val_batches=1, unroll=12)
    res = distill(DistillConfig(teacher=str(teachers["open"]), epochs=3, batch_size=512,
                                **FAST, grid=grid), out=tmp_path / "d", progress=False)
    assert res["student"] == "open" and res["student_params"] == 1227
    # Measured: 25.8 against the zero update's 105 (final-parameter MSE, 1e-3 units).
    assert res["val_final_param_mse"] < 0.5 * res["val_final_param_mse_of_zero_update"]
    # Independently: unroll teacher and student on fresh draws; the student ends closer to
    # the teacher than not moving at all does.
    teacher, tp = load(teachers["open"]).build()
    student, sp = load(tmp_path / "d" / "student.pt").build()
    teacher.load_flat(tp)
    student.load_flat(sp)
    draws = S.unroll_draws(1024, 12, torch.Generator().manual_seed(99))
    with torch.no_grad():
        t, s = S.unroll(teacher, draws), S.unroll(student, draws)
    err = float((((s - t) / S.UNIT) ** 2).mean())
    zero = float((((draws["p0"] - t) / S.UNIT) ** 2).mean())
    assert err < 0.5 * zero

    # A feed-forward student of the recurrent teacher, on the same unroll.
    ff = distill(DistillConfig(teacher=str(teachers["open"]), student="open-ff", epochs=2,
                               batch_size=512, **FAST, grid=grid),
                 out=tmp_path / "ff", progress=False)
    assert ff["student"] == "open-ff" and ff["student_params"] == 707
    assert load(tmp_path / "ff" / "student.pt").name == "t-open-distill-open-ff-h16"
    with pytest.raises(ValueError, match="can be distilled into open-ff, not 'open'"):
        distill(DistillConfig(teacher=str(teachers["open-ff"]), student="open", epochs=1,
                              **FAST), out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_data_options_from_the_command_line(teachers, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["distill", str(teachers["no-features"]), "--epochs", "1", "--data",
                 "batches_per_epoch=3", "--data", "val_batches=1", "--wandb", "off",
                 "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grid"] == {"batches_per_epoch": 3, "val_batches": 1, "unroll": 100}
    assert cfg["batch_size"] == 2048
    assert json.loads((out / "results.json").read_text())["steps"] == 3
    for flags, msg in ((["--data", "batches=3"], "has no option batches"),
                       (["--data", "unroll=0"], "unroll must be an integer >= 1"),
                       (["--data", "unroll=x"], "expected int, got 'x'"),
                       (["--data", "unroll"], "KEY=VALUE")):
        assert main(["distill", str(teachers["open"]), "--out", str(tmp_path / "b"),
                     "--wandb", "off", *flags]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "b").exists()


def test_stream_batches_are_distinct_and_repeatable(teachers):
    """Each synthetic batch is a pure function of (seed, split, epoch, index), and no two
    positions share one: training epochs, held-out batches and seeds all differ."""
    from metarl.meta.distill import StreamData

    method = get_family("optim").method("distillation")
    teacher = method.teacher(*load(teachers["open-ff"]).build())
    opts = S.SyntheticOptions()

    def stream(seed, split):
        return StreamData(method, teacher, opts, 64, seed=seed, split=split)

    x = stream(42, 0)[(0, 0)][0]
    assert torch.equal(x, stream(42, 0)[(0, 0)][0])
    for other in (stream(42, 0)[(1, 0)], stream(42, 0)[(0, 1)], stream(42, 1)[(0, 0)],
                  stream(43, 0)[(0, 0)], stream(2**40, 0)[(0, 0)]):
        assert not torch.allclose(x, other[0])


def _cli(teacher, out, *extra):
    return [sys.executable, "-m", "metarl.cli", "distill", str(teacher), "--epochs", "5",
            "--batch-size", "512", "--lr-start", "1e-2", "--lr-end", "1e-3", "--data",
            "batches_per_epoch=8", "--data", "val_batches=1", "--data", "unroll=6",
            "--seed", "42", "--wandb", "off",
            "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize("name", ["open-ff", "open"])
def test_resume_after_kill_is_exact(name, teachers, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(teachers[name], straight), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(teachers[name], killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill after epoch 2's checkpoint, before the end
        try:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 1:
                break
        except Exception:  # noqa: BLE001 - read while Lightning replaces it; try again
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "student.pt").exists()  # it really stopped early

    subprocess.run(_cli(teachers[name], killed, "--resume"), check=True, env=env,
                   capture_output=True)
    a, b = load(straight / "student.pt"), load(killed / "student.pt")
    assert torch.equal(a.representation["params"], b.representation["params"])

    def lines(p):
        out = [json.loads(x) for x in (p / "metrics.jsonl").read_text().split("\n") if x]
        return [{k: v for k, v in ln.items() if k not in ("time", "wall_time")} for ln in out]
    assert lines(straight) == lines(killed) and len(lines(killed)) == 5
