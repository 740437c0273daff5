import csv
import json

import pytest
import torch

from metarl.artifact import FORMAT, Artifact, load, network_artifact, save
from metarl.cli import main
from metarl.evaluate import evaluate

TINY = dict(total_timesteps=256, num_steps=32, num_minibatches=2, update_epochs=2,
            backend="torch")


def test_round_trip_and_build(tmp_path):
    params = torch.randn(1152) * 0.01
    art = network_artifact("lpo", params, {"method": "evolve", "meta_train_envs": ["X"],
                                           "where": tmp_path})
    path = save(art, tmp_path / "a.pt")
    back = load(path)
    assert back.family == "drift" and back.kind == "network"
    assert back.provenance["where"] == str(tmp_path)  # plain values only, readable again
    drift, meta = back.build()
    assert drift.name == "lpo" and torch.equal(meta, params)
    assert "parameters: 1152" in back.describe()


def test_handcrafted_names_are_artifacts():
    for name in ("ppo-clip", "dpo", "lpo"):
        art = load(name)
        drift, meta = art.build()
        assert drift.name == name and art.kind == "handcrafted"


def test_not_an_artifact(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a metarl artifact"):
        load(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'metarl-artifact' header"):
        load(tmp_path / "other.pt")
    torch.save({"format": FORMAT}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="damaged metarl artifact"):
        load(tmp_path / "broken.pt")
    for rep in ({}, {"kind": "network", "member": "lpo"}):
        torch.save({"format": FORMAT, "family": "drift", "representation": rep},
                   tmp_path / "broken.pt")
        with pytest.raises(ValueError, match="damaged metarl artifact"):
            load(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="handcrafted name"):
        load(tmp_path / "missing.pt")


def test_newer_format_is_refused(tmp_path):
    d = network_artifact("lpo", torch.zeros(1152), {}).to_dict()
    d["format_version"] = 99
    torch.save(d, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="newer metarl"):
        load(tmp_path / "future.pt")


def test_wrong_parameter_count(tmp_path):
    art = Artifact("drift", {"kind": "network", "member": "lpo", "params": torch.zeros(5)})
    with pytest.raises(ValueError, match="expects 1152 parameters"):
        art.build()


def test_show_command(tmp_path, capsys):
    save(network_artifact("lpo", torch.zeros(1152), {"method": "evolve"}), tmp_path / "a.pt")
    assert main(["show", str(tmp_path / "a.pt")]) == 0
    assert "representation: network (lpo)" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "nope.pt")]) == 2
    assert "no artifact" in capsys.readouterr().err


def test_evaluate_table_in_and_out_of_distribution(tmp_path):
    art = network_artifact("lpo", torch.zeros(1152),
                           {"method": "evolve", "meta_train_envs": ["CartPole-v1"],
                            "env_steps": 1234, "wall_time": 5.0})
    save(art, tmp_path / "lpo.pt")
    res = evaluate([str(tmp_path / "lpo.pt"), "ppo-clip"], ["CartPole-v1", "Pendulum-v1"],
                   seeds=2, out=tmp_path / "eval", progress=False, echo=lambda *a: None,
                   **TINY)
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "CartPole-v1 (in dist.)" in table and "Pendulum-v1 (generalisation)" in table
    assert "1,234" in table
    rows = list(csv.DictReader(open(tmp_path / "eval" / "table.csv")))
    assert len(rows) == 4 and {r["env"] for r in rows} == {"CartPole-v1", "Pendulum-v1"}
    assert (tmp_path / "eval" / "curves.png").stat().st_size > 1000
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    cart = results["algorithms"][0]["envs"]["CartPole-v1"]
    assert cart["in_distribution"] and cart["normalized_mean"] == pytest.approx(
        (cart["mean"] - 22.29) / (475.0 - 22.29))  # random policy 0, PPO's reference 1
    # A zero LPO is PPO up to a 1e-4 offset: on the same seeds the two train alike.
    lpo, ppo = (r["envs"]["CartPole-v1"]["final_return"] for r in res["algorithms"])
    assert torch.allclose(torch.as_tensor(lpo), torch.as_tensor(ppo), rtol=0.05, atol=1.0)
    assert [r["found_by"] for r in res["algorithms"]] == ["ES", "handcrafted"]


def test_default_seeds_leave_out_the_selection_seeds(tmp_path):
    """A proposal's fitness was measured on seeds 0..N-1 and the best kept: evaluate's
    default seeds skip them, and explicit seeds that overlap are flagged in the table."""
    prov = {"method": "propose", "meta_train_envs": ["CartPole-v1"], "seeds": 2,
            "selection_seeds": [0, 1], "env_steps": 10, "wall_time": 1.0}
    save(network_artifact("lpo", torch.zeros(1152), prov, name="proposed"), tmp_path / "p.pt")
    legacy = {k: v for k, v in prov.items() if k != "selection_seeds"}  # older provenance
    save(network_artifact("lpo", torch.zeros(1152), {**legacy, "seeds": 3}, name="older"),
         tmp_path / "o.pt")
    res = evaluate([str(tmp_path / "p.pt"), "ppo-clip"], ["CartPole-v1"], seeds=2,
                   out=tmp_path / "a", progress=False, echo=lambda *a: None, **TINY)
    assert res["seeds"] == [2, 3]
    table = (tmp_path / "a" / "table.md").read_text()
    assert "Seeds 2, 3. Left out: seeds 0, 1, on which proposed was selected." in table
    assert "| proposed | LLM proposal |" in table
    res = evaluate([str(tmp_path / "o.pt")], ["CartPole-v1"], seeds="2", out=tmp_path / "b",
                   progress=False, echo=lambda *a: None, **TINY)
    assert res["seeds"] == [3, 4]
    res = evaluate([str(tmp_path / "p.pt")], ["CartPole-v1"], seeds="1,5",
                   out=tmp_path / "c", progress=False, echo=lambda *a: None, **TINY)
    assert res["seeds"] == [1, 5]
    assert ("Warning: proposed was selected on seeds 1, so its figures there are not held "
            "out.") in res["seed_note"]
    assert res["seed_note"] in (tmp_path / "c" / "table.md").read_text()


def test_one_table_for_both_families(tmp_path):
    """An optimiser artifact, adam, sgd and ppo-clip in one evaluation: each fills its own
    family's slot, and --tune-lr tunes the optimiser slot's rate (none for a learned one)."""
    from metarl.families import get_family

    params = get_family("optim").initial_params("open-ff", 0)
    save(network_artifact("open-ff", params, {"method": "evolve",
                                              "meta_train_envs": ["CartPole-v1"]}),
         tmp_path / "opt.pt")
    res = evaluate([str(tmp_path / "opt.pt"), "adam", "sgd", "ppo-clip"], ["CartPole-v1"],
                   seeds=2, out=tmp_path / "eval", progress=False, echo=lambda *a: None,
                   tune_lr_factors=(0.5, 2.0), **TINY)
    rows = {r["algorithm"]: r for r in res["algorithms"]}
    assert [rows[n]["family"] for n in ("open-ff", "adam", "sgd", "ppo-clip")] == [
        "optim", "optim", "optim", "drift"]
    cart = {n: r["envs"]["CartPole-v1"] for n, r in rows.items()}
    assert cart["open-ff"]["lr"] is None and cart["open-ff"]["lr_scores"] is None
    assert set(cart["sgd"]["lr_scores"]) == {2.5e-4 * 0.5, 2.5e-4 * 2.0}
    assert set(cart["adam"]["lr_scores"]) == {1e-3 * 0.5, 1e-3 * 2.0}
    assert cart["open-ff"]["in_distribution"]
    assert "[no lr]" in (tmp_path / "eval" / "table.md").read_text()


def test_evaluate_bad_input(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["evaluate", str(tmp_path / "junk.pt"), "--envs", "CartPole-v1"]) == 2
    assert "not a metarl artifact" in capsys.readouterr().err
    assert main(["evaluate", "ppo-clip", "--envs"]) == 2
    assert "--envs is empty" in capsys.readouterr().err
    assert main(["evaluate", "ppo-clip", "--envs", "Cartpole"]) == 2
    assert "Closest known ids" in capsys.readouterr().err


def test_wandb_offline_run_is_written(tmp_path):
    pytest.importorskip("wandb")
    from metarl.meta.evolve import EvolveConfig, meta_train

    cfg = EvolveConfig(generations=1, popsize=2, eval_every=1, eval_seeds=1,
                       wandb="offline", inner=dict(TINY))
    meta_train(cfg, out=tmp_path, progress=False, echo=lambda *a: None)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.iterdir())


def test_selection_seeds_of_teachers_and_of_namesakes():
    """A formula distilled from a proposal was, through its teacher, selected on the
    proposal's seeds; two artifacts of one name keep their own selection seeds."""
    from metarl.evaluate import choose_seeds, selection_seeds

    prop = {"method": "propose", "selection_seeds": [0, 1, 2]}
    formula = {"method": "symbolic-gplearn", "teacher_provenance": prop}
    assert selection_seeds(formula) == {0, 1, 2}
    a = network_artifact("lpo", torch.zeros(1152), {"method": "propose",
                                                     "selection_seeds": [0]}, name="best")
    b = network_artifact("lpo", torch.zeros(1152), formula, name="best")
    a.name, b.name = "best (run1/best.pt)", "best (run2/best.pt)"  # as evaluate renames
    seeds, note = choose_seeds(2, [a, b])
    assert seeds == [3, 4]
    assert "seeds 0, on which best (run1/best.pt) was selected" in note
    assert "seeds 0-2, on which best (run2/best.pt) was selected" in note
    seeds, note = choose_seeds("4000000000,1", [a, b])  # explicit, huge: no giant sets
    assert seeds == [4000000000, 1] and "best (run2/best.pt) was selected on seeds 1" in note
