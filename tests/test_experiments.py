"""experiments/: both studies at the smoke scale end with their report, reuse finished
cells on a rerun, and resume an interrupted cell; the report's statistics."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "experiments"


def load(name):
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study_mod = load("_study")
report_mod = load("_report")


def run(mod, out, capsys, *extra):
    assert mod.main(["--scale", "smoke", "--out", str(out), "--no-progress",
                     "--wandb", "offline", *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name, methods, n_cells", [
    ("lpo", ["ES (black box)", "distilled (same width)", "distilled (smaller)", "symbolic",
             "LLM proposal", "ppo-clip", "dpo"], 12),
    ("optimisers", ["OPEN ES (black box)", "OPEN distilled (same width)",
                    "OPEN LLM proposal", "OPEN-FF ES (black box)", "OPEN-FF symbolic",
                    "No-Features LLM proposal", "adam", "sgd"], 24),
])
def test_smoke_study_reports_reuses_and_resumes(name, methods, n_cells, tmp_path, capsys):
    mod = load(name)
    out = tmp_path / name
    first = run(mod, out, capsys)
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    envs = [mod.META_ENV, *mod.GENERAL]
    for m in methods:
        assert f"| {m} |" in report
        assert set(results["normalized"][m]) == set(envs)
    for e in envs:
        assert e in report
    assert (out / "bars.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert "## The paper's findings" in report
    # Every method on the same seeds, none of them a proposal's selection seeds (0-1).
    seed_lists = {json.dumps(json.loads((c / "results.json").read_text())["seeds"])
                  for c in (out / "cells").glob("eval-*")}
    assert seed_lists == {"[2, 3]"}, seed_lists
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert len(cells) == n_cells, cells
    for c in cells:  # every cell logged to W&B (offline) once
        assert (out / "cells" / c / "wandb-logged.json").exists(), c
    assert "finished earlier" not in first

    # A rerun of the finished study trains nothing: every cell is reused (a finished LLM
    # loop too, whatever the endpoint: this one would refuse a connection).
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("results.json")}
    second = run(mod, out, capsys, "--base-url", "http://127.0.0.1:9/v1")
    assert second.count("finished earlier, reused") == n_cells
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (out / "report.md").read_text() == report  # the same report from the same cells

    # An interrupted evaluation (one environment done, the cell not) redoes only the rest.
    ev = out / "cells" / f"eval-{study_mod._slug(methods[-1])}"
    kept = ev / mod.META_ENV / "results.json"
    kept_mtime = kept.stat().st_mtime_ns
    (ev / "results.json").unlink()
    for e in mod.GENERAL:
        (ev / e / "results.json").unlink()
    third = run(mod, out, capsys)
    assert f"eval-{study_mod._slug(methods[-1])}: resuming" in third
    assert third.count("finished earlier, reused") == n_cells - 1
    assert kept.stat().st_mtime_ns == kept_mtime
    assert json.loads((out / "results.json").read_text())["normalized"] == \
        results["normalized"]

    # Another configuration in a finished cell is refused, not reused or overwritten.
    record = out / "cells" / f"es-{'lpo' if name == 'lpo' else 'open'}" / "cell.json"
    held = json.loads(record.read_text())
    held["config"]["generations"] += 1
    record.write_text(json.dumps(held))
    with pytest.raises(ValueError, match="was run with another configuration"):
        run(mod, out, capsys)


def test_a_study_directory_is_not_taken_over(tmp_path):
    study_mod.Study("lpo", "smoke", tmp_path / "s", wandb="off")
    with pytest.raises(ValueError, match="holds the lpo study at scale smoke"):
        study_mod.Study("lpo", "small", tmp_path / "s", wandb="off")
    with pytest.raises(ValueError, match="holds the lpo study"):
        study_mod.Study("optimisers", "smoke", tmp_path / "s", wandb="off")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty and holds no study"):
        study_mod.Study("lpo", "smoke", tmp_path / "other", wandb="off")
    with pytest.raises(ValueError, match="--scale must be one of smoke, small, paper"):
        study_mod.Study("lpo", "huge", tmp_path / "x")


def test_sign_flip_p_value_exact_and_its_edge_cases():
    # 4 positive differences: only "all +" and "all -" reach |sum| = 10: p = 2/16.
    assert report_mod.paired_sign_flip([1, 2, 3, 4]) == pytest.approx(2 / 16)
    assert report_mod.paired_sign_flip([1e-13, 2e-13]) == pytest.approx(2 / 4)  # scale-free
    # 17 pairs (Monte Carlo) agrees with the exact answer for the same shape at 16 + 1.
    d = [1.0] * 10 + [-1.0] * 7
    exact = sum(abs(sum(-v if m >> i & 1 else v for i, v in enumerate(d))) >= 3
                for m in range(1 << 17)) / (1 << 17)
    assert abs(report_mod.paired_sign_flip(d) - exact) < 0.01
    assert report_mod.paired_sign_flip([0, 0, 0]) == 1.0
    assert report_mod.paired_sign_flip([1.0, -1.0]) == 1.0
    assert math.isnan(report_mod.paired_sign_flip([]))
    # Many pairs, all one way: the Monte Carlo p is tiny.
    assert report_mod.paired_sign_flip([1.0] * 40) < 1e-3


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_n():
    import random

    rnd = random.Random(0)
    small = [rnd.gauss(1.0, 1.0) for _ in range(8)]
    large = [rnd.gauss(1.0, 1.0) for _ in range(400)]
    for x in (small, large):
        lo, hi = report_mod.bootstrap_ci(x)
        m = sum(x) / len(x)
        assert lo < m < hi
    assert (report_mod.bootstrap_ci(large)[1] - report_mod.bootstrap_ci(large)[0]) < \
        (report_mod.bootstrap_ci(small)[1] - report_mod.bootstrap_ci(small)[0]) / 3
    assert all(math.isnan(v) for v in report_mod.bootstrap_ci([1.0]))


def test_verdicts():
    v = report_mod.verdict
    big = {"n": 20, "p": 0.001, "diff": 0.3}
    assert v("small", big, "better") == "supported"
    assert v("small", big, "worse") == "contradicted"
    assert v("small", {**big, "diff": -0.3}, "worse") == "supported"
    assert v("small", {**big, "diff": -0.3}, "not worse") == "contradicted"
    assert v("small", big, "not better") == "contradicted"
    assert v("small", {**big, "p": 0.4}, "better").startswith("not shown")
    assert v("small", {**big, "p": 0.4}, "not worse").startswith("not contradicted")
    assert v("smoke", big, "better").startswith("too small to say (smoke")
    assert v("paper", {**big, "n": 4}, "better") == \
        "too small to say (4 pairs; 6 or more are needed)"
    assert v("paper", {**big, "p": float("nan")}, "better").startswith("too small")


def _eval(returns, seeds=(2, 3)):
    return {"seeds": list(seeds), "algorithms": [{"envs": {
        e: {"final_return": r} for e, r in returns.items()}}]}


def test_matrix_normalises_counts_failures_and_pairs_by_seed():
    from metarl.configs import config_for

    cp = config_for("CartPole-v1")  # reference 475, random 22.29
    evals = {"a": _eval({"CartPole-v1": [475.0, float("nan")], "Ant-v4": [10.0, 30.0]}),
             "ppo-clip": _eval({"CartPole-v1": [cp.random_return, 475.0],
                                "Ant-v4": [0.0, 20.0]}),
             "other": _eval({"CartPole-v1": [1.0, 2.0], "Ant-v4": [1.0, 2.0]}, (4, 5))}
    mx = report_mod.Matrix(evals, ["CartPole-v1", "Ant-v4"], "ppo-clip")
    assert mx.norm("a", "CartPole-v1") == [pytest.approx(1.0), 0.0]  # failed seed -> 0
    assert mx.failed["a", "CartPole-v1"] == 1 and mx.failed["ppo-clip", "CartPole-v1"] == 0
    assert mx.referenced == ["CartPole-v1"]  # Ant is normalised by ppo-clip's own mean
    assert mx.norm("ppo-clip", "Ant-v4") and \
        sum(mx.norm("ppo-clip", "Ant-v4")) / 2 == pytest.approx(1.0)
    c = mx.compare("a", "ppo-clip", ["CartPole-v1", "Ant-v4"])
    assert c["n"] == 2 and c["diff"] == pytest.approx((1.0 - 0.0 + 0.0 - 1.0) / 2)
    with pytest.raises(ValueError, match="different seeds"):
        mx.compare("a", "other", ["CartPole-v1"])
    assert "1 failed" in report_mod.table(mx, ["CartPole-v1"], ["Ant-v4"])


def test_matrix_leaves_an_environment_unnormalised_below_random():
    evals = {"ppo-clip": _eval({"Ant-v4": [-90.0, -80.0]})}  # random is about -57
    mx = report_mod.Matrix(evals, ["Ant-v4"], "ppo-clip")
    assert "not normalised" in mx.scale_source["Ant-v4"]
    assert all(math.isnan(v) for v in mx.norm("ppo-clip", "Ant-v4"))


def test_a_finding_whose_method_was_not_run_says_why_once():
    evals = {"ppo-clip": _eval({"CartPole-v1": [400.0, 450.0]})}
    mx = report_mod.Matrix(evals, ["CartPole-v1"], "ppo-clip")
    why = "no LLM endpoint: pass --base-url (and --model)"
    text = report_mod.findings_section(
        "small", mx, [dict(text="t", a="LLM proposal", b="ppo-clip", envs=["CartPole-v1"],
                           expect="better")],
        {"propose-a": why, "propose-b": why, "propose-c": "another reason"})
    row = next(line for line in text.splitlines() if line.startswith("| 1. t"))
    assert row.count(why) == 1 and "another reason" in row and "LLM proposal not run" in row
