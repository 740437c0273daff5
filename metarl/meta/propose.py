"""LLM proposal: a language model writes new algorithm code, in context of its earlier
proposals and their fitness (DiscoPOP's loop, Lu et al. 2024, as Goldie et al. 2025 ran it
for LPO: one growing chat, one proposal per generation, 30 generations).

``metarl propose lpo --model o3-mini [--base-url URL] --envs CartPole-v1 --generations 30``

The algorithm named (``lpo``) says which family's slot the code fills
(:func:`metarl.families.family_of`); the loop uses only that family's proposal interface,
``family.method("proposal")`` (for the drift family:
:data:`metarl.families.drift.proposal.PROPOSAL`). A family without one is refused before
any work, with the family's reason.

One growing chat. The system prompt is generated from the family's proposal (its signature,
a docstring describing every input, its constraints and a worked example). The first user
message shows the warm start (the handcrafted member's source) and its measured fitness.
Each answer must be a JSON object with ``thought``, ``name`` and ``code``. Each generation:

1. the model is asked (network errors, timeouts, rate limits and 5xx answers are retried
   with exponential backoff and do not cost a generation; when the retries run out the run
   stops with a message, saved, and ``--resume`` continues it);
2. a malformed answer is fed back as an error and counts as a generation;
3. the code is loaded in a sandboxed child process (:mod:`metarl.sandbox`) and validated by
   the family (``proposal.build``: one function of the family's signature; random inputs of
   the stated shapes; right shape; no NaN; the family's constraints), then the PPO inner
   loop trains agents with it in the family's slot on the meta-training environments with
   the fixed seeds, **in this process**, asking the child only for the function's values
   and gradients. Fitness is computed here from the raw returns: the mean over
   environments of the mean final return, normalised so that a random policy scores 0 and
   the environment's PPO reference return 1 (:func:`metarl.configs.normalized_return`). A
   proposal cannot report or alter its own score;
4. failures score ``FAILED_FITNESS`` (-10000, the paper's) and the model reads
   ``Code not valid. Error: ...``; successes read ``Fitness: X``.

After every generation the conversation, the archive of (name, thought, code, fitness,
error) and the best proposal are saved atomically (``state.json``, ``archive.json``,
``conversation.json``, ``best.pt``); ``--resume`` continues the same conversation. The API
key is read from the environment variable named by ``api_key_env`` (``OPENAI_API_KEY``) and
is never written anywhere.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from metarl import artifact as art_mod
from metarl.configs import normalized_return, require_references
from metarl.families import FAMILIES, Family, Member, family_of
from metarl.families.base import FAILED_FITNESS
from metarl.inner.ppo import prepare_configs, train
from metarl.logging import (
    RunDir,
    keep_metrics,
    refuse_other_run,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from metarl.sandbox import SandboxLimits



# --------------------------------------------------------------------------- families


class Proposal(Protocol):
    """What the loop needs from a family to ask for, check and score its code: the value of
    ``family.method("proposal")`` (e.g. :data:`metarl.families.drift.proposal.PROPOSAL`)."""

    slot: str  # what the function is, in a word ("drift")
    function: str  # the function's name in the signature ("drift")
    signature: str  # its ``def`` line, with type annotations
    docstring: str  # every input and the output, in words
    constraints: str  # what a valid function satisfies, as a Markdown list
    example: dict  # a worked answer: {"thought", "name", "code"}
    warm_start_name: str  # the handcrafted member whose source starts the chat
    warm_start_code: str

    def build(self, code: str, limits: SandboxLimits) -> Member:
        """A member of the family running ``code`` in a sandbox, validated, ready for the
        inner loop; closed with ``member.close()``. Raises ``ProposalError``."""


def system_prompt(p: Proposal) -> str:
    """The chat's system message, generated from the family's proposal."""
    example = json.dumps(p.example, indent=2)
    return (
        f"You are a reinforcement-learning researcher searching for a better {p.slot} "
        f"function. Each function you write replaces the {p.slot} of an RL algorithm, "
        f"and agents are trained with it; you are told the fitness of each proposal and "
        f"use it to write better ones.\n\n"
        f"Write one Python function with exactly this signature, using torch "
        f"(already imported as `torch`; `math` is available too):\n\n"
        f"```python\n{p.signature}\n    \"\"\"{p.docstring}\"\"\"\n```\n\n"
        f"Constraints:\n{p.constraints}\n\n"
        f"Answer with one JSON object and nothing else, with keys \"thought\" (your "
        f"reasoning, briefly), \"name\" (a short snake_case name) and \"code\" (the "
        f"complete Python source defining exactly one function). For example:\n\n"
        f"{example}\n")


def first_message(p: Proposal, fitness: float) -> str:
    """The first user message: the warm start's source and its measured fitness."""
    return (f"Here is the starting point, {p.warm_start_name}:\n\n```python\n"
            f"{p.warm_start_code}```\n\n{fitness_text(fitness)}\n\n"
            f"Propose a new {p.slot} function that reaches a higher fitness.")


def proposable() -> list[str]:
    """The algorithm names ``propose`` takes: the learned members of the families that
    support LLM proposal."""
    return [n for fam in FAMILIES.values() if "proposal" in fam.methods for n in fam.learned]


def resolve_proposal(name: str) -> tuple[Family, Proposal]:
    """The family whose slot ``name`` fills, and its proposal interface; a ``ValueError``
    that says why for an unknown name, a handcrafted member, or a family without one."""
    known = proposable()
    try:
        family = family_of(name)
    except ValueError:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown family {name!r} for proposal: name the learned algorithm "
                         f"whose slot the code fills ({', '.join(known)}).{hint}") from None
    try:
        proposal = family.method("proposal")
    except ValueError as e:  # the family's refusal, with its reason
        raise ValueError(f"cannot propose {name}: {e}") from None
    if not family.is_learned(name):
        raise ValueError(f"{name} is a handcrafted member of the {family.name} family; "
                         f"propose writes the code of a learned one ({', '.join(known)})")
    if hasattr(proposal, "for_algorithm"):  # a family whose signature differs by member
        proposal = proposal.for_algorithm(name)
    return family, proposal


def fitness_text(fitness: float) -> str:
    return f"Fitness: {fitness:.4f}"


# --------------------------------------------------------------------------- config


@dataclass
class ProposeConfig:
    #: the learned algorithm whose family's slot the code fills (``lpo``: drift functions)
    family: str = "lpo"
    model: str = "o3-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    envs: list = field(default_factory=lambda: ["CartPole-v1"])
    generations: int = 30
    seeds: int = 8
    inner: dict = field(default_factory=dict)
    temperature: float | None = None
    request_timeout_s: float = 300.0
    max_retries: int = 6
    retry_base_s: float = 2.0
    call_timeout_s: float = 60.0
    memory_mb: int = 4096
    cpu_s: int = 21600
    wall_s: float = 21600.0

    def limits(self):
        """The sandbox limits of one proposal's child."""
        from metarl.sandbox import SandboxLimits

        return SandboxLimits(call_timeout_s=self.call_timeout_s, memory_mb=self.memory_mb,
                             cpu_s=self.cpu_s, wall_s=self.wall_s)

    def differences(self, saved: dict) -> list[str]:
        now = json.loads(json.dumps(asdict(self)))
        keys = ("family", "model", "envs", "seeds", "inner")  # the endpoint may move
        return [f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in keys
                if saved.get(k) != now[k]]


class ProposeError(RuntimeError):
    """The loop cannot go on (the model endpoint keeps failing, a bad configuration)."""


def check_propose_config(cfg: ProposeConfig):
    """The inner configurations per environment; a ``ValueError`` before any work for a
    bad configuration, the family's refusal included."""
    resolve_proposal(cfg.family)
    if cfg.generations < 1 or cfg.seeds < 1:
        raise ValueError(f"generations and seeds must be at least 1, got "
                         f"{cfg.generations} and {cfg.seeds}")
    if cfg.max_retries < 0 or cfg.retry_base_s < 0:
        raise ValueError("max_retries and retry_base_s must be >= 0")
    if cfg.base_url is not None and not re.match(r"^https?://", cfg.base_url):
        raise ValueError(f"--base-url must start with http:// or https://, got "
                         f"{cfg.base_url!r} (for example http://127.0.0.1:8000/v1)")
    if not cfg.model:
        raise ValueError("--model is empty; give the model name the endpoint serves")
    configs = prepare_configs(list(cfg.envs), **cfg.inner)
    require_references(configs, "fitness is the final return normalised by the "
                                "environment's PPO reference return")
    cfg.limits()  # checks the sandbox settings
    return configs


# --------------------------------------------------------------------------- the client


class ChatClient:
    """The ``openai`` client, with retries and backoff of our own (so they are counted and
    reported) for network errors, timeouts, rate limits and 5xx answers."""

    def __init__(self, cfg: ProposeConfig, log=print, sleep=time.sleep):
        try:
            import openai
        except ImportError:
            raise ImportError("metarl propose needs the openai package: "
                              "pip install 'metarl[llm]'") from None
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if cfg.base_url is None:
                raise ValueError(
                    f"no API key: set the environment variable {cfg.api_key_env} (the key is "
                    f"read from the environment only), or point --base-url at a server "
                    f"that needs none (vLLM, Ollama)")
            key = "none"  # local OpenAI-compatible servers accept any key
        self.openai, self.cfg, self.log, self.sleep = openai, cfg, log, sleep
        self.client = openai.OpenAI(api_key=key, base_url=cfg.base_url, max_retries=0,
                                    timeout=cfg.request_timeout_s)
        self.retries = 0

    def preflight(self) -> None:
        """Fail fast on an endpoint that cannot be reached or refuses the key (GET /models;
        a server without that route is fine)."""
        o = self.openai
        try:
            self.client.models.list()
        except (o.APIConnectionError, o.APITimeoutError) as e:
            raise ProposeError(f"cannot reach the model endpoint "
                               f"{self.cfg.base_url or 'https://api.openai.com/v1'}: "
                               f"{_short(e)}") from None
        except o.APIStatusError as e:
            if e.status_code in (401, 403):
                raise ProposeError(f"the model endpoint refused the API key (HTTP "
                                   f"{e.status_code}); set {self.cfg.api_key_env}") from None

    def complete(self, messages: list[dict]) -> str:
        o = self.openai
        retryable = (o.APIConnectionError, o.APITimeoutError, o.RateLimitError,
                     o.InternalServerError)
        kwargs = {} if self.cfg.temperature is None else {"temperature": self.cfg.temperature}
        last = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                out = self.client.chat.completions.create(model=self.cfg.model,
                                                          messages=messages, **kwargs)
                return out.choices[0].message.content or ""
            except retryable as e:
                last = e
            except o.APIStatusError as e:
                if e.status_code in (408, 409) or e.status_code >= 500:
                    last = e
                else:
                    raise ProposeError(f"the model endpoint refused the request "
                                       f"(HTTP {e.status_code}): {_short(e)}") from None
            if attempt < self.cfg.max_retries:
                wait = self.cfg.retry_base_s * 2 ** attempt
                self.retries += 1
                self.log(f"model endpoint: {_short(last)}; retry {attempt + 1}/"
                         f"{self.cfg.max_retries} in {wait:.1f} s")
                self.sleep(wait)
        raise ProposeError(f"the model endpoint failed {self.cfg.max_retries + 1} times "
                           f"in a row, last: {_short(last)}. The run is saved; continue it "
                           f"with --resume")


def _short(e) -> str:
    status = getattr(e, "status_code", None)
    return f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + \
        (f": {str(e)[:200]}" if str(e) else "")


# --------------------------------------------------------------------------- parsing


def parse_answer(text: str) -> dict:
    """``{"thought", "name", "code"}`` from the model's answer; ValueError says what is wrong.

    A JSON object, optionally inside a fenced code block, is accepted."""
    s = text.strip()
    m = re.search(r"```(?:json)?\s*(\{.*\})\s*```", s, flags=re.S)
    if m:
        s = m.group(1)
    elif not s.startswith("{") and "{" in s:
        s = s[s.index("{"):s.rindex("}") + 1] if "}" in s else s
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"the answer is not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}); answer with one JSON object with keys thought, name "
                         f"and code") from None
    if not isinstance(obj, dict):
        raise ValueError("the answer must be a JSON object with keys thought, name and code")
    missing = [k for k in ("thought", "name", "code") if not isinstance(obj.get(k), str)]
    if missing:
        raise ValueError(f"the JSON object lacks string values for: {', '.join(missing)}")
    if not obj["code"].strip():
        raise ValueError("the code is empty")
    return {k: obj[k] for k in ("thought", "name", "code")}


# --------------------------------------------------------------------------- scoring


def score_code(code: str, configs: dict, seeds: list[int], cfg: ProposeConfig,
               proposal: Proposal | None = None) -> dict:
    """Validate and train one proposal; the fitness is computed here, from raw returns.

    ``proposal`` is the family's (by default that of ``cfg.family``). Returns
    ``{"fitness", "per_env", "env_steps", "error", "reason"}``; never raises for a bad
    proposal."""
    from metarl.sandbox import ProposalError

    if proposal is None:
        proposal = resolve_proposal(cfg.family)[1]
    per_env, env_steps = {}, 0
    member = None
    try:
        member = proposal.build(code, cfg.limits())
        for env_id, c in configs.items():
            res = train(c, member, None, seeds)
            env_steps += res.env_steps
            if bool(res.failed.any()):
                bad = [s for s, f in zip(seeds, res.failed.tolist()) if f]
                raise ProposalError("nan", f"training on {env_id} produced non-finite "
                                           f"losses or parameters for seeds {bad}")
            mean = float(res.final_return.mean())
            per_env[env_id] = {"mean_return": mean,
                               "normalized": normalized_return(mean, c),
                               "final_return": res.final_return.tolist()}
    except ProposalError as e:
        return {"fitness": FAILED_FITNESS, "per_env": per_env, "env_steps": env_steps,
                "error": str(e), "reason": e.reason}
    finally:
        if member is not None:
            member.close()
    fitness = sum(v["normalized"] for v in per_env.values()) / len(per_env)
    return {"fitness": fitness, "per_env": per_env, "env_steps": env_steps, "error": None,
            "reason": None}


# --------------------------------------------------------------------------- the loop


def propose(cfg: ProposeConfig, out: str | Path | None = None, resume: bool = False,
            log=print, client: ChatClient | None = None) -> dict:
    """Run the proposal loop; return the results (also in ``results.json``)."""
    configs = check_propose_config(cfg)
    family, proposal = resolve_proposal(cfg.family)
    seeds = list(range(cfg.seeds))
    run_path = Path(out) if out else RunDir.default_path("propose", cfg.family)
    state_path = run_path / "state.json"
    if resume:
        if not state_path.exists():
            raise ValueError(f"--resume: no saved state at {state_path}; start the run "
                             f"without --resume")
        state = json.loads(state_path.read_text())
        diffs = cfg.differences(state["config"])
        if diffs:
            raise ValueError("--resume with a different configuration: " + "; ".join(diffs))
        # a generation logged but not committed to state.json is redone: drop its line
        keep_metrics(run_path / "metrics.jsonl", "generation", state["generation"] + 1)
    elif state_path.exists():
        raise ValueError(f"{run_path} already holds a proposal run; add --resume to continue "
                         f"it or choose another --out")
    else:
        refuse_other_run(run_path)
    client = client or ChatClient(cfg, log=log)
    client.preflight()  # a wrong URL or key is said now, not after scoring the warm start
    run = RunDir(run_path, append=resume)
    public_cfg = json.loads(json.dumps(asdict(cfg)))
    run.write_config({**public_cfg, "api_key_set": bool(os.environ.get(cfg.api_key_env))})
    t_start = time.time()

    if not resume:
        log(f"scoring the warm start ({proposal.warm_start_name})")
        warm = score_code(proposal.warm_start_code, configs, seeds, cfg, proposal)
        if warm["error"]:
            raise ProposeError(f"the warm start failed: {warm['error']}")
        entry = {"generation": 0, "name": "warm_start", "thought": proposal.warm_start_name,
                 "code": proposal.warm_start_code, **warm}
        state = {"config": public_cfg, "generation": 0,
                 "messages": [{"role": "system", "content": system_prompt(proposal)},
                              {"role": "user", "content": first_message(
                                  proposal, warm["fitness"])}],
                 "archive": [entry], "best": 0, "env_steps": warm["env_steps"],
                 "wall_time": time.time() - t_start, "retries": 0}
        _save(run_path, state, family, proposal, cfg)
        run.log(**_metrics(entry, state))
        run.sync()
    wall0 = state["wall_time"] - time.time()

    try:
        while state["generation"] < cfg.generations:
            g = state["generation"] + 1
            reply = client.complete(state["messages"])
            messages = state["messages"] + [{"role": "assistant", "content": reply}]
            try:
                ans = parse_answer(reply)
            except ValueError as e:
                ans = {"name": "", "thought": "", "code": ""}
                result = {"fitness": FAILED_FITNESS, "per_env": {}, "env_steps": 0,
                          "error": f"[format] {e}", "reason": "format"}
            else:
                log(f"generation {g}: scoring {ans['name']!r}")
                result = score_code(ans["code"], configs, seeds, cfg, proposal)
            entry = {"generation": g, **ans, **result}
            feedback = (fitness_text(result["fitness"]) if result["error"] is None
                        else f"Code not valid. Error: {result['error']}")
            messages.append({"role": "user", "content": feedback + "\n\nPropose the next "
                             f"{proposal.slot} function, as a JSON object."})
            best = state["archive"][state["best"]]
            state = {**state, "generation": g, "messages": messages,
                     "archive": state["archive"] + [entry],
                     "env_steps": state["env_steps"] + result["env_steps"],
                     "wall_time": time.time() + wall0,
                     "retries": state["retries"] + client.retries}
            client.retries = 0
            if result["error"] is None and result["fitness"] > best["fitness"]:
                state["best"] = len(state["archive"]) - 1
            run.log(**_metrics(entry, state))
            run.sync()
            _save(run_path, state, family, proposal, cfg)
            log(f"generation {g}: {ans['name'] or '(malformed)'} -> "
                f"{feedback.splitlines()[0][:160]}")
    finally:
        run.close()
    return _finish(run_path, state, cfg)


def _metrics(entry, state) -> dict:
    best = state["archive"][state["best"]]
    return {"generation": entry["generation"], "name": entry["name"],
            "fitness": entry["fitness"], "error": entry["error"],
            "reason": entry.get("reason"), "best_fitness": best["fitness"],
            "best_name": best["name"], "env_steps": state["env_steps"],
            "wall_time": state["wall_time"]}


def _save(run_path: Path, state: dict, family: Family, proposal: Proposal,
          cfg: ProposeConfig) -> None:
    """Everything needed to continue, written atomically; state.json last (it is the
    commit point: resume reads it, the other files are views of it)."""
    write_json_atomic(run_path / "archive.json", state["archive"])
    write_json_atomic(run_path / "conversation.json", state["messages"])
    best = state["archive"][state["best"]]
    prov = {"method": "propose", "model": cfg.model, "base_url": cfg.base_url,
            "family": family.name, "algorithm": cfg.family,
            "meta_train_envs": list(cfg.envs), "seeds": cfg.seeds,
            # every proposal's fitness is measured on these seeds and the best one kept:
            # metarl evaluate leaves them out by default
            "selection_seeds": list(range(cfg.seeds)),
            "generation": best["generation"], "generations_run": state["generation"],
            "fitness": best["fitness"], "per_env": best["per_env"],
            "thought": best["thought"], "env_steps": state["env_steps"],
            "wall_time": round(state["wall_time"], 1)}
    art_mod.save(art_mod.code_artifact(best["code"], proposal.function, prov,
                                       name=f"{cfg.family}-propose-{best['name']}",
                                       family=family.name),
                 run_path / "best.pt")
    write_json_atomic(run_path / "state.json", state)


def _finish(run_path: Path, state: dict, cfg: ProposeConfig) -> dict:
    archive = state["archive"]
    best = archive[state["best"]]
    ok = [e for e in archive if e["error"] is None]
    results = {"generations": state["generation"], "proposals": len(archive) - 1,
               "valid": len(ok) - 1, "warm_start_fitness": archive[0]["fitness"],
               "best_fitness": best["fitness"], "best_name": best["name"],
               "best_generation": best["generation"], "env_steps": state["env_steps"],
               "wall_time": state["wall_time"], "retries": state["retries"],
               "failures": {r: sum(1 for e in archive if e.get("reason") == r)
                            for r in sorted({e.get("reason") for e in archive} - {None})},
               "best": str(run_path / "best.pt")}
    write_json_atomic(run_path / "results.json", results)
    lines = [f"# metarl propose {cfg.family} with {cfg.model}", "",
             f"{results['generations']} generations on {', '.join(cfg.envs)} with "
             f"{cfg.seeds} seeds; {results['valid']} valid proposals of "
             f"{results['proposals']}; {state['env_steps']:,} env steps; "
             f"{state['wall_time']:.0f} s.", "",
             "| gen | name | fitness | error |", "|---:|---|---:|---|"]
    for e in archive:
        err = (e["error"] or "").splitlines()[0][:100] if e["error"] else ""
        lines.append(f"| {e['generation']} | {e['name']} | {e['fitness']:.4f} | {err} |")
    lines += ["", f"best: **{best['name']}** (generation {best['generation']}, fitness "
                  f"{best['fitness']:.4f}), saved as best.pt", "", "```python",
              best["code"].rstrip(), "```", ""]
    write_text_atomic(run_path / "summary.md", "\n".join(lines))
    return results
