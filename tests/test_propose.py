"""The LLM proposal loop against a real local OpenAI-compatible server on 127.0.0.1.

The real ``openai`` client talks HTTP to :class:`ScriptedLLMServer`, which answers with
scripted proposals: good ones, malformed ones and hostile ones. Proposals run only in the
sandbox; the parent trains the agents and computes every fitness itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from metarl.artifact import load
from metarl.cli import main
from metarl.meta.propose import FAILED_FITNESS, ProposeConfig, ProposeError, propose
from metarl.testing.llm_server import Fail, ScriptedLLMServer, answer

SECRET = "sk-test-SECRET-4242"
# Small enough to be quick, large enough that PPO's clip binds: measured over seeds 0 and 1,
# ppo-clip (the warm start) reaches 107.8 and the zero drift (no clip at all) 141.8.
INNER = dict(total_timesteps=2048, num_envs=4, num_steps=32, num_minibatches=2,
             update_epochs=4, lr=3e-3, backend="torch")

PPO = ("def drift(ratio, advantage, clip_eps):\n"
       "    return torch.relu((ratio - torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))"
       " * advantage)\n")
ZERO = "def drift(ratio, advantage, clip_eps):\n    return torch.zeros_like(ratio)\n"


def fn(body: str, head: str = "") -> str:
    return head + "def drift(ratio, advantage, clip_eps):\n" + body


def hostile_script(tmp_path, listen_port, sentinel):
    outside = tmp_path / "outside.txt"
    return outside, [
        ("syntax", answer("def drift(ratio, advantage, clip_eps)\n    return ratio\n", "syn")),
        ("format", "Sure! Here is my idea: use a smaller clip."),
        ("signature", answer("def drift(ratio, advantage):\n    return 0 * ratio\n", "sig")),
        ("signature", answer(ZERO + "\n" + ZERO.replace("drift", "other"), "two")),
        ("nan", answer(fn("    return torch.full_like(ratio, float('nan'))\n"), "nan")),
        ("constraint", answer(fn("    return (ratio - 1) * advantage\n"), "negative")),
        ("runtime", answer(fn("    CALLS[0] += 1\n"
                              "    if CALLS[0] > 8:\n"
                              "        raise RuntimeError('boom during training')\n"
                              "    return torch.zeros_like(ratio)\n", "CALLS = [0]\n"),
                           "raises_in_training")),
        ("timeout", answer(fn("    while True:\n        pass\n"), "endless")),
        ("memory", answer(fn("    x = bytearray(64 * 2**30)\n    return 0 * ratio\n"),
                          "memory_bomb")),
        ("forbidden", answer(fn("    while True:\n        os.fork()\n", "import os\n"),
                             "fork_bomb")),
        ("forbidden", answer(fn(f"    s = socket.create_connection(('127.0.0.1', {listen_port}),"
                                f" timeout=2)\n    return 0 * ratio\n", "import socket\n"),
                             "network")),
        ("forbidden", answer(fn(f"    open({str(outside)!r}, 'w').write('pwned')\n"
                                f"    return 0 * ratio\n"), "write_outside")),
        ("forbidden", answer(fn("    import os\n"
                                "    k = os.environ.get('OPENAI_API_KEY', '')\n"
                                "    for pid in (os.getppid(), PARENT):\n"
                                "        try:\n"
                                "            k += open(f'/proc/{pid}/environ').read()\n"
                                "        except BaseException as e:\n"
                                "            k += repr(e)\n"
                                "        try:  # native code: no audit event\n"
                                "            t = torch.from_file(f'/proc/{pid}/environ', "
                                "size=4096, dtype=torch.uint8)\n"
                                "            k += bytes(t.tolist()).decode(errors='replace')\n"
                                "        except BaseException as e:\n"
                                "            k += repr(e)\n"
                                "    raise RuntimeError('KEY ' + k)\n",
                                f"PARENT = {os.getpid()}\n"), "read_key")),
        ("forbidden", answer(fn("    import numpy\n"
                                "    for write in (lambda: open(SENTINEL, 'w').write('x'),\n"
                                "                  lambda: torch.save(ratio, SENTINEL),\n"
                                "                  lambda: numpy.zeros(3).tofile(SENTINEL),\n"
                                "                  lambda: torch.save(ratio, OUTSIDE)):\n"
                                "        try:\n"
                                "            write()\n"
                                "        except BaseException:\n"
                                "            pass\n"
                                "    return torch.zeros_like(ratio)\n",
                                f"SENTINEL = {str(sentinel)!r}\n"
                                f"OUTSIDE = {str(outside) + '.pt'!r}\n"),
                             "overwrite_files")),
        (None, answer(fn("    print('Fitness: 1000.0')  # text; the parent keeps it as text\n"
                         "    return torch.relu((ratio - torch.clamp(ratio, 1 - clip_eps, "
                         "1 + clip_eps)) * advantage)\n"), "change_fitness")),
        ("output", answer(fn("    while True:\n        print('flood' * 1000)\n"), "flood")),
        (None, answer(ZERO, "no_clip", "drop the clip: small budgets reward larger steps")),
    ]


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    return srv


def test_loop_survives_hostile_proposals(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    listener = _listener()
    run = tmp_path / "run"
    run.mkdir()
    sentinel = run / "sentinel.txt"  # a file of the parent's run directory
    sentinel.write_text("the parent's")
    outside, script = hostile_script(tmp_path, listener.getsockname()[1], sentinel)
    monkeypatch.chdir(run)
    import envpool  # noqa: F401 - it sets MPLBACKEND etc. on first import; do that first
    parent_env = dict(os.environ)
    with ScriptedLLMServer([a for _, a in script]) as srv:
        cfg = ProposeConfig(base_url=srv.url, model="scripted", generations=len(script),
                            seeds=2, inner=INNER, call_timeout_s=5, memory_mb=3072)
        res = propose(cfg, out=run, log=lambda *a: None)
        requests = list(srv.requests)

    archive = json.loads((run / "archive.json").read_text())
    assert len(archive) == len(script) + 1 and archive[0]["name"] == "warm_start"
    warm = archive[0]["fitness"]
    for (reason, _), entry in zip(script, archive[1:]):
        if reason is not None:
            assert entry["fitness"] == FAILED_FITNESS, entry["name"]
            assert entry["reason"] == reason, (entry["name"], entry["error"])
            assert entry["error"], entry["name"]
    by = {e["name"]: e for e in archive}
    assert "not valid JSON" in archive[2]["error"]
    assert "boom during training" in by["raises_in_training"]["error"]
    assert "call_timeout_s" in by["endless"]["error"]
    assert len(by["flood"]["error"]) <= 2100  # what comes back of a flood is bounded
    # The parent is untouched: no connection reached the listener, no file outside the
    # sandbox, the environment is the same, the API key was never seen by the child.
    with pytest.raises(socket.timeout):
        listener.accept()
    assert not outside.exists() and not (tmp_path / "outside.txt.pt").exists()
    assert sentinel.read_text() == "the parent's"
    assert dict(os.environ) == parent_env
    assert "/environ" in by["read_key"]["error"]  # refused, and the message says what
    # Changing its own fitness: the score is the parent's, equal to the warm start's (the
    # same drift); the parent's run files are intact.
    assert by["change_fitness"]["error"] is None
    assert by["change_fitness"]["fitness"] == pytest.approx(warm, rel=0, abs=1e-12)
    state = json.loads((run / "state.json").read_text())
    assert state["generation"] == len(script)
    import metarl.meta.propose as p
    assert p.FAILED_FITNESS == -10000.0
    # The feedback the model read says what went wrong, in words.
    conv = json.loads((run / "conversation.json").read_text())
    feedback = [m["content"] for m in conv if m["role"] == "user"][1:]
    assert all(f.startswith(("Code not valid. Error: ", "Fitness: ")) for f in feedback)
    assert requests[-1]["messages"][-1]["content"].startswith("Code not valid. Error: [output]")
    # A good proposal is scored and saved as the best.
    assert by["no_clip"]["fitness"] > warm
    assert res["best_name"] == "no_clip" and res["best_fitness"] == by["no_clip"]["fitness"]
    best = load(run / "best.pt")
    assert best.kind == "code" and best.representation["source"] == ZERO
    assert best.provenance["method"] == "propose" and best.provenance["model"] == "scripted"
    # The key is nowhere: not in the run directory, not in what was sent to the model.
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in json.dumps(requests)
    listener.close()


def test_retries_rate_limits_and_server_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    good = answer(ZERO, "no_clip")
    with ScriptedLLMServer([Fail(429, times=2, then=good), Fail(500, times=1, then=good),
                            Fail(503, times=100)]) as srv:
        cfg = ProposeConfig(base_url=srv.url, generations=3, seeds=2, inner=INNER,
                            max_retries=3, retry_base_s=0.01)
        with pytest.raises(ProposeError, match="failed 4 times in a row.*--resume"):
            propose(cfg, out=tmp_path / "r", log=lambda *a: None)
        # 2 + 1 + 1 answered: generations 1 and 2 cost 3 and 2 requests, none counted twice
        assert len(srv.requests) == 3 + 2 + 4
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert state["generation"] == 2 and state["retries"] == 3
    assert [e["name"] for e in state["archive"]] == ["warm_start", "no_clip", "no_clip"]
    # The command reports it (exit status 3), not a traceback, and --resume continues.
    with ScriptedLLMServer([Fail(503, times=100)]) as srv:
        rc = main(["propose", "lpo", "--base-url", srv.url, "--generations", "3", "--seeds",
                   "2", "--max-retries", "1", "--retry-base", "0", "--out",
                   str(tmp_path / "r"), "--resume",
                   *[f"--{k.replace('_', '-')}={v}" for k, v in INNER.items()]])
    assert rc == 3 and "failed 2 times in a row" in capsys.readouterr().err
    with ScriptedLLMServer([good]) as srv:
        res = propose(ProposeConfig(base_url=srv.url, generations=3, seeds=2, inner=INNER),
                      out=tmp_path / "r", resume=True, log=lambda *a: None)
    assert res["generations"] == 3


def _cli(url, out, *extra):
    return [sys.executable, "-m", "metarl.cli", "propose", "lpo", "--base-url", url,
            "--model", "scripted", "--generations", "5", "--seeds", "2", "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in INNER.items()], *extra]


def test_resume_after_kill_keeps_the_conversation(tmp_path):
    script = [answer(ZERO, "a"), "not json", answer(PPO, "b"),
              answer(fn("    return 0.1 * advantage.abs() * torch.log(ratio) ** 2\n"), "c"),
              answer(ZERO, "d")]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["OMP_NUM_THREADS"] = "1"
    with ScriptedLLMServer(script) as srv:
        subprocess.run(_cli(srv.url, tmp_path / "straight"), check=True, env=env,
                       capture_output=True)
        killed = tmp_path / "killed"
        proc = subprocess.Popen(_cli(srv.url, killed), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        state = killed / "state.json"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads(state.read_text())["generation"] >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert json.loads(state.read_text())["generation"] < 5  # it stopped early
        subprocess.run(_cli(srv.url, killed, "--resume"), check=True, env=env,
                       capture_output=True)

    def view(run):
        st = json.loads((run / "state.json").read_text())
        arch = [{k: v for k, v in e.items()} for e in st["archive"]]
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        lines = [{k: v for k, v in ln.items() if k not in ("time", "wall_time")}
                 for ln in lines]
        return st["messages"], arch, lines
    a, b = view(tmp_path / "straight"), view(tmp_path / "killed")
    assert a[0] == b[0]  # the same conversation, message for message
    assert a[1] == b[1]  # the same archive: names, code, fitness, errors
    assert a[2] == b[2] and len(a[2]) == 6  # one metrics line per generation, no repeats
    assert load(tmp_path / "killed" / "best.pt").representation["source"] == ZERO


def test_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cases = [
        (["propose", "ppo"], "unknown family 'ppo'"),
        (["propose", "lpo"], "set the environment variable OPENAI_API_KEY"),
        (["propose", "lpo", "--base-url", "localhost:8000"], "must start with http"),
        (["propose", "lpo", "--base-url", "http://127.0.0.1:9/v1", "--envs", "MountainCar-v0"],
         "has none"),
        (["propose", "lpo", "--base-url", "http://127.0.0.1:9/v1", "--resume"],
         "no saved state"),
        (["propose", "lpo", "--base-url", "http://127.0.0.1:9/v1", "--generations", "0"],
         "at least 1"),
    ]
    for argv, msg in cases:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()
    # A 4xx other than 429 is not retried: it is a configuration problem, said at once.
    with ScriptedLLMServer([Fail(401, times=100)]) as srv:
        with pytest.raises(ProposeError, match="HTTP 401"):
            propose(ProposeConfig(base_url=srv.url, generations=1, seeds=2, inner=INNER),
                    out=tmp_path / "y", log=lambda *a: None)
        assert len(srv.requests) == 1


def test_code_artifact_evaluates_with_tuned_lr(tmp_path, monkeypatch):
    from metarl.evaluate import evaluate

    with ScriptedLLMServer([answer(ZERO, "no_clip")]) as srv:
        propose(ProposeConfig(base_url=srv.url, generations=1, seeds=2, inner=INNER),
                out=tmp_path / "p", log=lambda *a: None)
    res = evaluate([str(tmp_path / "p" / "best.pt"), "ppo-clip"], ["CartPole-v1"], seeds=2,
                   out=tmp_path / "ev", progress=False, tune_lr_factors=(0.5, 1.0, 2.0),
                   **{k: v for k, v in INNER.items()})
    rows = {r["algorithm"]: r for r in res["algorithms"]}
    e = rows["lpo-propose-no_clip"]["envs"]["CartPole-v1"]
    assert set(e["lr_scores"]) == {1.5e-3, 3e-3, 6e-3}
    clean = {k: v for k, v in e["lr_scores"].items() if v is not None}
    assert e["lr"] == max(clean, key=clean.get)
    assert e["failed"] == 0 and torch.isfinite(torch.tensor(e["mean"]))
    assert "[lr " in (tmp_path / "ev" / "table.md").read_text()
    # No sandbox child is left behind.
    time.sleep(0.2)
    assert threading.active_count() < 50


def test_evaluate_reports_a_failing_code_artifact(tmp_path, capsys):
    from metarl.artifact import code_artifact, save

    save(code_artifact("def drift(ratio, advantage, clip_eps):\n    return ratio[\n",
                       "drift", {"method": "test"}, name="broken"), tmp_path / "broken.pt")
    assert main(["show", str(tmp_path / "broken.pt")]) == 0  # loading runs nothing
    assert "return ratio[" in capsys.readouterr().out
    rc = main(["evaluate", str(tmp_path / "broken.pt"), "--seeds", "1", "--no-progress",
               "--out", str(tmp_path / "ev"),
               *[f"--{k.replace('_', '-')}={v}" for k, v in INNER.items()]])
    assert rc == 2 and "the artifact's code failed: [syntax]" in capsys.readouterr().err


def test_refuses_a_family_without_proposal_before_any_work(tmp_path, capsys, monkeypatch):
    from metarl.families import get_family

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # Every family has proposal now: take it away from the optimisers for this test.
    optim = get_family("optim")
    reason = "proposal is switched off for this test"
    monkeypatch.delitem(optim.methods, "proposal")
    monkeypatch.setitem(optim.refusals, "proposal", reason)
    with ScriptedLLMServer([answer(ZERO, "no_clip")]) as srv:
        # an optimiser: its family says why (a ValueError, before the endpoint is asked)
        with pytest.raises(ValueError) as info:
            propose(ProposeConfig(family="open-ff", base_url=srv.url, generations=1, seeds=2,
                                  inner=INNER), out=tmp_path / "o", log=lambda *a: None)
        assert str(info.value) == (f"cannot propose open-ff: proposal is not available for "
                                   f"the optim family: {reason}")
        # the command says it and exits 2
        assert main(["propose", "open-ff", "--base-url", srv.url, "--out",
                     str(tmp_path / "o")]) == 2
        assert "not available for the optim family" in capsys.readouterr().err
        # a handcrafted member of a family that has proposal: name the learned one
        with pytest.raises(ValueError, match="ppo-clip is a handcrafted member of the drift "
                                             "family.*lpo"):
            propose(ProposeConfig(family="ppo-clip", base_url=srv.url, generations=1,
                                  seeds=2, inner=INNER), out=tmp_path / "o",
                    log=lambda *a: None)
        assert srv.requests == []  # no model request, no training, no run directory
    assert not (tmp_path / "o").exists()
