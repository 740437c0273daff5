"""LLM proposal of optimisers (``metarl propose open|open-ff|no-features``).

The warm starts, run through the sandbox, step like metarl's handcrafted Adam and SGD; the
sandboxed member gets the inputs its signature documents; and whole proposal runs against
a real local OpenAI-compatible server (:class:`ScriptedLLMServer`) score good, invalid and
hostile proposals, with every fitness computed in the parent.
"""

import json
import os

import pytest
import torch

from metarl import rng
from metarl.artifact import code_artifact, load
from metarl.cli import main
from metarl.configs import config_for
from metarl.families.base import FAILED_FITNESS
from metarl.families.optim import AdamUpdate, AgentLayout, SGDUpdate, StepContext
from metarl.families.optim.learned import _S_NOISE
from metarl.families.optim.proposal import (
    PROPOSALS,
    SIGNATURES,
    SandboxedOptimizer,
    code_member,
)
from metarl.inner.ppo import train
from metarl.meta.propose import ProposeConfig, propose, resolve_proposal
from metarl.nets import ActorCritic
from metarl.sandbox import ProposalError, Sandbox
from metarl.testing.llm_server import ScriptedLLMServer, answer

# Small enough to be quick. Measured over seeds 0 and 1 (mean final return 15.6, 122, 45.6,
# 79.0; the fitness is (R - 22.29) / (475 - 22.29)): the SGD warm start -0.015, the signed
# momentum 10 * lr * sign(m_0_9) 0.220 (OPEN-FF's signature); the Adam warm start 0.051,
# lr * sign(m_0_9) 0.125 (OPEN's).
INNER = dict(total_timesteps=2048, num_envs=4, num_steps=32, num_minibatches=2,
             backend="torch")
SEEDS = [0, 1]


def head(member: str) -> str:
    """The ``def`` line of a member's signature (as the warm start writes it)."""
    code = PROPOSALS.for_algorithm(member).warm_start_code
    return code[:code.index("):\n") + 3]


def layout():
    return AgentLayout.for_actor_critic(ActorCritic(4, 2, True, 64, 2, "tanh"))


def built(member: str, code: str | None = None) -> SandboxedOptimizer:
    prop = PROPOSALS.for_algorithm(member)
    return prop.build(prop.warm_start_code if code is None else code)


# -- the warm starts against the handcrafted members ---------------------------------------


@pytest.mark.parametrize("member", ["open", "open-ff", "no-features"])
def test_warm_start_steps_like_the_handcrafted_member(member):
    cfg = config_for("CartPole-v1")
    ref = (AdamUpdate(cfg.lr, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps) if member == "open"
           else SGDUpdate(cfg.sgd_lr))
    lay, P = layout(), 3
    D = lay.numel
    gen = torch.Generator().manual_seed(0)
    box = built(member)
    try:
        opt = box.population(torch.zeros(P, 0), lay, cfg, rng.seed_keys(range(P)))
        start = torch.randn(P, D, generator=gen) * 0.3
        a, b = start.clone(), start.clone()
        ref_state, box_state = ref.init(start), opt.init(start)
        for i in range(6):
            g = torch.randn(P, D, generator=gen) * 0.01
            ctx = StepContext(i // 2, 3, i % 2, 2, 0, 1)
            # Neither update reads p, so each one is read exactly off a step from zero.
            u_ref, u_box = torch.zeros(P, D), torch.zeros(P, D)
            ref.step(u_ref, g, {k: (v.clone() if torch.is_tensor(v) else v)
                                for k, v in ref_state.items()}, ctx)
            opt.step(u_box, g, {"momenta": box_state["momenta"].clone(),
                                **{k: v for k, v in box_state.items() if k != "momenta"}},
                     ctx)
            # each step on the same inputs, elementwise, to float32 precision (the warm
            # starts are written with the members' own operations: here they agree to
            # the bit, which this does not require)
            torch.testing.assert_close(u_box, u_ref, rtol=1e-6, atol=0)
            ref.step(a, g, ref_state, ctx)
            opt.step(b, g, box_state, ctx)
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
        if member == "open":  # the recurrent slot holds Adam's second moment
            torch.testing.assert_close(box_state["var"], ref_state["v"], rtol=1e-6, atol=0)
            assert box_state["step"] == int(ref_state["count"]) == 6
        assert float((a - start).abs().max()) > 1e-6  # the steps moved the parameters
    finally:
        box.close()


def test_the_sandboxed_member_gets_the_documented_inputs():
    """A proposal that returns one input as the update shows what the stepper sends."""
    cfg = config_for("CartPole-v1", anneal_lr=True)
    lay, P = layout(), 2
    D = lay.numel
    keys = rng.seed_keys([3, 4])
    g = torch.randn(P, D, generator=torch.Generator().manual_seed(1))
    ctx = StepContext(2, 4, 1, 3, 1, 2, {"critic.0": torch.rand(P, 64) + 0.1})
    noise = rng.normal(rng.fold(keys, _S_NOISE, 2, 1, 1), (D,))
    expected = {
        "layer_proportion": lay.layer_proportion.expand(P, D),
        "dormancy": lay.dormancy(ctx.activations, P),
        "eps": noise * lay.actor_mask,  # zero on the critic: the noise acts on the policy
        "m_0_99": 0.01 * g,  # the momenta, from zero, already updated with this step's g
        "g": g,
        "lr + 0 * p": torch.full((P, D), cfg.sgd_lr * 0.5),  # annealed: 1 - 2 / 4
        "training_proportion + batch_proportion + 0 * p": torch.full((P, D), 2 / 3 + 1 / 2),
    }
    for expr, want in expected.items():
        box = built("open-ff", head("open-ff") + f"    return {expr}\n")
        try:
            opt = box.population(torch.zeros(P, 0), lay, cfg, keys)
            assert opt.needs_activations  # dormancy is read: the loop records activations
            params = torch.zeros(P, D)
            opt.step(params, g, opt.init(params), ctx)
            torch.testing.assert_close(-params, want, rtol=1e-6, atol=1e-7, msg=expr)
        finally:
            box.close()
    # OPEN's signature: var comes back at the next step; step counts minibatch updates.
    box = built("open", head("open") + "    return step + 0 * p, var + lr\n")
    try:
        opt = box.population(torch.zeros(P, 0), lay, cfg, keys)
        params = torch.zeros(P, D)
        state = opt.init(params)
        for i in range(3):
            opt.step(params, g, state, StepContext(0, 4, 0, 3, i, 2, None))
        assert torch.equal(-params, torch.full((P, D), 6.0))  # 1 + 2 + 3
        torch.testing.assert_close(state["var"], torch.full((P, D), 3 * cfg.lr))
    finally:
        box.close()
    box = built("no-features", head("no-features") + "    return m_0_1\n")
    assert not box.population(torch.zeros(P, 0), lay, cfg, keys).needs_activations
    assert "eps" not in box.spec.params and "dormancy" not in box.spec.params
    box.close()


# -- whole proposal runs -------------------------------------------------------------------


def hostile(member: str, outside, parent: int) -> list:
    """Proposals the sandbox must refuse (reason ``forbidden``) without stopping the loop."""
    h = head(member)
    ret = "    return lr * g" + (", var\n" if member == "open" else "\n")
    return [
        answer("import os\n" + h + "    os.fork()\n" + ret, "fork"),
        answer("import socket\n" + h + "    socket.create_connection(('127.0.0.1', 9))\n"
               + ret, "socket"),
        answer(h + f"    open({str(outside)!r}, 'w').write('pwned')\n" + ret, "write_outside"),
        answer(h + f"    open('/proc/{parent}/environ').read()\n" + ret, "read_key"),
    ]


def run_loop(tmp_path, member, script):
    with ScriptedLLMServer(script) as srv:
        cfg = ProposeConfig(family=member, base_url=srv.url, model="scripted",
                            generations=len(script), seeds=len(SEEDS), inner=INNER)
        res = propose(cfg, out=tmp_path / "run", log=lambda *a: None)
    archive = json.loads((tmp_path / "run" / "archive.json").read_text())
    return res, archive, {e["name"]: e for e in archive}


def in_process_fitness(algorithm: str) -> float:
    cfg = config_for("CartPole-v1", **INNER)
    res = train(cfg, algorithm, None, SEEDS)
    return (float(res.final_return.mean()) - cfg.random_return) / (475.0 - cfg.random_return)


def test_propose_open_ff(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    h = head("open-ff")
    outside = tmp_path / "outside.txt"
    good = h + "    return 10 * lr * torch.sign(m_0_9)\n"
    script = [
        answer("def open_ff_update(p, g\n    return g\n", "syntax"),
        answer("def open_ff_update(p, g):\n    return 1e-3 * g\n", "two_params"),
        answer(h + "    return g * float('nan')\n", "nan"),
        answer(h + "    return lr * (g - g.mean())\n", "centred"),
        answer(h + "    return lr * g + lr * torch.randn_like(g)\n", "own_noise"),
        answer("CALLS = [0]\n\n" + h + "    CALLS[0] += 1\n"
               "    return lr * g / (CALLS[0] < 9)\n", "nan_in_training"),
        *hostile("open-ff", outside, os.getpid()),
        answer(good, "signed_momentum", "a sign step of 10 lr moves every parameter"),
    ]
    res, archive, by = run_loop(tmp_path, "open-ff", script)
    reasons = {"syntax": "syntax", "two_params": "signature", "nan": "nan",
               "centred": "constraint", "own_noise": "constraint", "nan_in_training": "nan",
               "fork": "forbidden", "socket": "forbidden", "write_outside": "forbidden",
               "read_key": "forbidden"}
    for name, reason in reasons.items():
        assert by[name]["fitness"] == FAILED_FITNESS, name
        assert by[name]["reason"] == reason, (name, by[name]["error"])
    assert "elementwise" in by["centred"]["error"]
    assert "deterministic" in by["own_noise"]["error"]
    assert "of training" in by["nan_in_training"]["error"]
    assert "/environ" in by["read_key"]["error"] and not outside.exists()
    # The warm start is SGD: its fitness, computed here through the sandbox, is that of
    # metarl's sgd member trained in this process.
    warm = archive[0]
    assert warm["name"] == "warm_start" and warm["error"] is None
    assert warm["fitness"] == pytest.approx(in_process_fitness("sgd"), rel=1e-9)
    assert by["signed_momentum"]["error"] is None
    assert by["signed_momentum"]["fitness"] > warm["fitness"] + 0.1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == {**results, "best_name": "signed_momentum", "valid": 1,
                       "proposals": len(script)}
    assert results["failures"] == {"constraint": 2, "forbidden": 4, "nan": 2,
                                   "signature": 1, "syntax": 1}
    # best.pt: the code and the signature it was written for; it rebuilds that member,
    # which trains to the fitness the loop measured.
    best = load(tmp_path / "run" / "best.pt")
    assert best.family == "optim" and best.kind == "code" and best.provenance["algorithm"] \
        == "open-ff"
    assert best.representation["source"] == good
    assert best.representation["function"] == "open_ff_update"
    member, params = best.build()
    try:
        assert isinstance(member, SandboxedOptimizer) and member.spec is SIGNATURES["open-ff"]
        assert member.lr_field == "sgd_lr" and params.numel() == 0
        rerun = train(config_for("CartPole-v1", **INNER), member, params, SEEDS)
    finally:
        member.close()
    assert rerun.final_return.tolist() == \
        by["signed_momentum"]["per_env"]["CartPole-v1"]["final_return"]


def test_propose_open_and_evaluate_the_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    h = head("open")
    good = h + "    return lr * torch.sign(m_0_9), var\n"
    script = [
        answer(h + "    return lr * g\n", "no_var"),
        answer(h + "    return lr * g, var + g.mean()\n", "var_mean"),
        answer(h + "    return lr * g / torch.sqrt(var), var\n", "zero_var"),
        *hostile("open", tmp_path / "outside.txt", os.getpid())[:2],
        answer(good, "signed_momentum"),
    ]
    res, archive, by = run_loop(tmp_path, "open", script)
    for name, reason in {"no_var": "shape", "var_mean": "constraint", "zero_var": "nan",
                         "fork": "forbidden", "socket": "forbidden"}.items():
        assert by[name]["reason"] == reason, (name, by[name]["error"])
        assert by[name]["fitness"] == FAILED_FITNESS
    assert "the new var" in by["var_mean"]["error"]
    # The warm start is Adam, with var as its second moment: the fitness of metarl's adam.
    assert archive[0]["fitness"] == pytest.approx(in_process_fitness("adam"), rel=1e-9)
    assert by["signed_momentum"]["fitness"] > archive[0]["fitness"] + 0.03
    assert res["best_name"] == "signed_momentum"
    best = tmp_path / "run" / "best.pt"
    assert load(best).representation["function"] == "open_update"
    # metarl evaluate rebuilds the sandboxed member from best.pt (on seeds other than the
    # ones it was selected on): the returns of the proposal's code built here.
    rc = main(["evaluate", str(best), "--seeds", "2", "--no-progress", "--out",
               str(tmp_path / "ev"), *[f"--{k.replace('_', '-')}={v}"
                                       for k, v in INNER.items()]])
    assert rc == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    # the proposals were selected on seeds 0..len(SEEDS)-1: the count 2 takes the next two
    assert ev["seeds"] == [len(SEEDS), len(SEEDS) + 1]
    assert "on which open-propose-signed_momentum was selected" in ev["seed_note"]
    row = next(r for r in ev["algorithms"] if r["algorithm"] == "open-propose-signed_momentum")
    cell = row["envs"]["CartPole-v1"]
    assert cell["lr_name"] == "lr" and cell["lr"] == 1e-3  # Adam's rate: --tune-lr tunes it
    box = built("open", good)
    try:
        here = train(config_for("CartPole-v1", **INNER), box, None, ev["seeds"])
    finally:
        box.close()
    assert cell["final_return"] == here.final_return.tolist()


# -- bad input -----------------------------------------------------------------------------


def test_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # a handcrafted optimiser: name the learned one whose signature the code fills
    with ScriptedLLMServer([answer("x", "never")]) as srv:
        for name in ("adam", "sgd"):
            with pytest.raises(ValueError, match=f"{name} is a handcrafted member of the optim "
                                                 f"family; propose writes the code of a "
                                                 f"learned one .*open, open-ff, no-features"):
                propose(ProposeConfig(family=name, base_url=srv.url, generations=1,
                                      inner=INNER), out=tmp_path / "o", log=lambda *a: None)
        assert main(["propose", "adam", "--base-url", srv.url, "--out",
                     str(tmp_path / "o")]) == 2
        assert "adam is a handcrafted member" in capsys.readouterr().err
        assert srv.requests == []
    assert not (tmp_path / "o").exists()
    assert resolve_proposal("no-features")[1].spec is SIGNATURES["no-features"]
    with pytest.raises(ValueError, match="no optimiser signature for 'adam'.*open, open-ff"):
        PROPOSALS.for_algorithm("adam")
    # an artifact's function names its signature; an unknown one is refused, saying which
    with pytest.raises(ValueError, match="one of open_update \\(open\\), open_ff_update "
                                         "\\(open-ff\\), no_features_update.*'drift'"):
        code_member(code_artifact("def drift(r, a, e):\n    return r\n", "drift", {},
                                  family="optim").representation)
    # a sandbox of another signature, or one not started
    with Sandbox("def f(x):\n    return x\n", "f", ("x",)) as other:
        with pytest.raises(TypeError, match="parameters of open_ff_update"):
            SandboxedOptimizer(other, SIGNATURES["open-ff"])
    spec = SIGNATURES["open-ff"]
    with pytest.raises(ValueError, match="started sandbox"):
        SandboxedOptimizer(Sandbox(head("open-ff") + "    return g\n", spec.function,
                                   spec.params), spec)
    # a configuration the signature cannot train with, said before any training
    box = built("open-ff")
    try:
        with pytest.raises(ValueError, match="reads sgd_lr, which CartPole-v1 does not set; "
                                             "pass --sgd-lr"):
            train(config_for("CartPole-v1", **INNER).replace(sgd_lr=None), box, None, SEEDS)
        with pytest.raises(ValueError, match="reads dormancy.*drop --no-fused"):
            train(config_for("CartPole-v1", **INNER, fused=False), box, None, SEEDS)
    finally:
        box.close()
    with pytest.raises(ProposalError, match=r"\[signature\]"):
        built("no-features", head("open-ff") + "    return g\n")
