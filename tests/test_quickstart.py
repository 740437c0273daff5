"""`metarl quickstart` (the README's main job), at a tiny budget."""

import json

import pytest

from metarl import quickstart as qs


def test_quickstart_runs_both_steps_and_refuses_to_reuse_silently(tmp_path, monkeypatch):
    inner = dict(total_timesteps=512, num_steps=32, num_minibatches=2, update_epochs=2)
    monkeypatch.setattr(qs, "INNER", inner)
    monkeypatch.setattr(qs, "EVOLVE", {**qs.EVOLVE, "generations": 2, "popsize": 4,
                                       "eval_every": 1, "eval_seeds": 2, "inner": inner})
    printed = []
    res = qs.quickstart(tmp_path / "q", wandb="off", progress=False, echo=printed.append)
    assert (tmp_path / "q" / "meta-train" / "best.pt").exists()
    names = [row["algorithm"] for row in res["algorithms"]]
    assert names == ["lpo-openai-es-best", "ppo-clip", "dpo"]
    table = (tmp_path / "q" / "evaluate" / "table.md").read_text()
    assert "CartPole-v1 (in dist.)" in table and "Acrobot-v1 (generalisation)" in table
    assert any("ppo-clip" in str(p) for p in printed)
    results = json.loads((tmp_path / "q" / "evaluate" / "results.json").read_text())
    assert results["meta_train_envs"] == ["CartPole-v1"]
    with pytest.raises(ValueError, match="already holds a quickstart"):
        qs.quickstart(tmp_path / "q", wandb="off", progress=False, echo=printed.append)
    # --resume on a finished run re-evaluates without meta-training again.
    qs.quickstart(tmp_path / "q", resume=True, wandb="off", progress=False,
                  echo=printed.append)
