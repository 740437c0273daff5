"""Meta-training by evolution: ``metarl meta-train``.

Each generation: ask the strategy for a population of meta-parameters, train one agent per
member on every meta-training environment with the vectorised inner loop (all members
share the generation's seed), score each member as the paper does, tell the strategy.
Every ``eval_every`` generations the strategy's mean is evaluated on fixed seeds and the
best so far is kept as an artifact. After every generation a checkpoint is written
atomically; ``resume=True`` continues from it and ends with the same numbers as a run
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarl import __version__, rng
from metarl.artifact import network_artifact, save
from metarl.configs import PPOConfig, require_references
from metarl.families import family_of, learned_names
from metarl.families.base import FAILED_FITNESS
from metarl.inner.ppo import prepare_configs
from metarl.logging import RunDir, refuse_other_run, write_json_atomic
from metarl.meta.es import STRATEGIES, make_strategy


@dataclass
class EvolveConfig:
    """Configuration of a meta-training run. Every field is a ``metarl meta-train`` flag."""

    algorithm: str = "lpo"
    strategy: str = "openai-es"
    envs: list[str] = field(default_factory=lambda: ["CartPole-v1"])
    generations: int = 800  # the paper's
    popsize: int = 64
    seed: int = 0
    eval_every: int = 8
    eval_seeds: int = 8
    sigma: float | None = None  # strategy default when None
    lr: float | None = None  # openai-es meta learning rate; strategy default when None
    inner: dict = field(default_factory=dict)  # PPOConfig overrides for every environment
    # True: each generation draws a new inner seed (the paper). False: every generation
    # reuses generation 0's seed, which makes fitness comparable across generations (for
    # tests, and for studying over-fitting to one seed).
    new_seed_each_generation: bool = True
    # Where the strategy's mean starts: None is the family's choice for the member (zero
    # LPO weights, that is PPO, as in the paper; PyTorch's default initialisation seeded
    # by ``seed`` for the learned optimisers), "zeros", or an artifact file to continue from.
    init: str | None = None
    wandb: str = "offline"  # offline | online | off

    def differences(self, saved: dict) -> list[str]:
        """Fields that differ from a checkpoint's configuration (``wandb`` may change;
        a field the checkpoint predates counts as its default)."""
        now = json.loads(json.dumps(dataclasses.asdict(self)))
        defaults = json.loads(json.dumps(dataclasses.asdict(EvolveConfig())))
        return [k for k in now if k != "wandb" and saved.get(k, defaults[k]) != now[k]]


def check_evolve_config(cfg: EvolveConfig, resume: bool = False) -> dict[str, PPOConfig]:
    """Refuse bad input before any work starts; return the inner config per environment."""
    family = family_of(cfg.algorithm)  # an unknown name fails here, with the known ones
    if not family.is_learned(cfg.algorithm):
        raise ValueError(
            f"cannot meta-train {cfg.algorithm!r}: it is a handcrafted member of the "
            f"{family.name} family and has nothing to learn; learned algorithms are "
            f"{', '.join(learned_names())}"
        )
    if cfg.strategy not in STRATEGIES:
        make_strategy(cfg.strategy, 1, 2, maximize=True)  # raises the helpful error
    if not cfg.envs:
        raise ValueError("--envs is empty: name at least one meta-training environment")
    if len(set(cfg.envs)) != len(cfg.envs):
        raise ValueError(f"--envs names an environment twice: {cfg.envs}")
    for name in ("generations", "popsize", "eval_every", "eval_seeds"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cfg.wandb not in ("offline", "online", "off"):
        raise ValueError(f"--wandb must be offline, online or off, got {cfg.wandb!r}")
    configs = prepare_configs(cfg.envs, **cfg.inner)
    if len(cfg.envs) > 1:
        require_references(configs, "fitness over several environments is normalised by "
                                    "each one's PPO reference return")
    strategy_settings(cfg)  # may raise for a bad popsize
    if cfg.init is not None and not resume:
        initial_params(cfg)  # an unreadable or mismatched artifact fails now
    return configs


def initial_params(cfg: EvolveConfig) -> torch.Tensor:
    """The strategy's initial mean ``[n]``: the family's choice for the member (``init``
    None), zeros (``"zeros"``) or an artifact's parameters."""
    family = family_of(cfg.algorithm)
    if cfg.init is None:
        return family.initial_params(cfg.algorithm, cfg.seed)
    n = family.make(cfg.algorithm).num_meta_params
    if cfg.init == "zeros":
        return torch.zeros(n)
    from metarl.artifact import load

    try:
        art = load(cfg.init)
    except (OSError, ValueError) as e:
        raise ValueError(f"--init {cfg.init}: {e}") from None
    member = art.representation.get("member")
    if art.family != family.name or member != cfg.algorithm or art.kind != "network":
        raise ValueError(f"--init {cfg.init}: it holds a {art.kind} {member} of the "
                         f"{art.family} family; meta-training {cfg.algorithm} starts from "
                         f"a network artifact of {cfg.algorithm} (or 'zeros')")
    params = torch.as_tensor(art.representation["params"], dtype=torch.float32).reshape(-1)
    if params.numel() != n:
        width = art.representation.get("hidden")
        raise ValueError(
            f"--init {cfg.init}: it holds a {member} with {params.numel()} parameters"
            f"{f' (width {width})' if width else ''}, but meta-train evolves the default "
            f"{cfg.algorithm} with {n}; give an artifact of the default width (distil it "
            f"back with `metarl distill ART --hidden ...`) or start without --init")
    return params


def strategy_settings(cfg: EvolveConfig) -> dict:
    settings = {}
    if cfg.sigma is not None:
        settings["sigma"] = cfg.sigma
    if cfg.lr is not None:
        if cfg.strategy != "openai-es":
            raise ValueError(f"--meta-lr applies to openai-es only, not {cfg.strategy}")
        settings["lr"] = cfg.lr
    num_dims = family_of(cfg.algorithm).make(cfg.algorithm).num_meta_params
    make_strategy(cfg.strategy, num_dims, cfg.popsize, maximize=True, seed=cfg.seed, **settings)
    return settings


#: the seeds the mean is evaluated on (and best.pt chosen on): ``EVAL_SEED_BASE + i``, far
#: from the seeds ``metarl evaluate`` uses by default
EVAL_SEED_BASE = 100_000


def generation_seed(seed: int, generation: int) -> int:
    """The inner-loop seed every member of a generation shares."""
    k = rng.fold(rng.seed_keys([seed]), 0x6E, generation)
    return int(k[0]) & 0x7FFFFFFF


class Checkpoint:
    """The checkpoint file of a run directory, written atomically."""

    def __init__(self, run_path: Path):
        self.path = run_path / "checkpoint.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, payload: dict) -> None:
        tmp = self.path.with_name(".checkpoint.pt.tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read(self) -> dict:
        return torch.load(self.path, map_location="cpu", weights_only=False)


def meta_train(cfg: EvolveConfig, out: str | Path | None = None, resume: bool = False,
               progress: bool = True, echo=print, fail_members=None) -> dict:
    """Run (or resume) meta-training; returns the headline results.

    ``fail_members`` is a test hook: a function ``(generation) -> list of member indices``
    whose inner loops get NaN meta-parameters (the strategy is still told the candidates it
    asked for), to exercise failure containment.
    """
    configs = check_evolve_config(cfg, resume)
    run_path = Path(out) if out else RunDir.default_path("meta-train", cfg.algorithm)
    ckpt = Checkpoint(run_path)
    if resume and not ckpt.exists():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {ckpt.path}; run without --resume to start, or "
            f"point --out at the directory of the run to continue"
        )
    if not resume and ckpt.exists():
        raise ValueError(f"{run_path} already holds a run; add --resume to continue it or "
                         f"choose another --out")
    if not resume:
        refuse_other_run(run_path)  # another command's run, or one killed before generation 0
    payload = ckpt.read() if resume else None
    if payload is not None and cfg.differences(payload["config"]):
        diff = ", ".join(f"{k}: {payload['config'].get(k)!r} -> {getattr(cfg, k)!r}"
                         for k in cfg.differences(payload["config"]))
        raise ValueError(
            f"--resume: the checkpoint in {run_path} was written with a different "
            f"configuration ({diff}); rerun with the same flags or choose a new --out"
        )

    family = family_of(cfg.algorithm)
    member = family.make(cfg.algorithm)
    settings = strategy_settings(cfg)
    strategy = make_strategy(cfg.strategy, member.num_meta_params, cfg.popsize, maximize=True,
                             seed=cfg.seed, **settings)
    metrics_file = run_path / "metrics.jsonl"
    if payload is None:
        state = strategy.init(initial_params(cfg))
        start, best, env_steps, wall = 0, None, 0, 0.0
        history = []
        if metrics_file.exists():
            metrics_file.unlink()
    else:
        state = strategy.load_state(payload["strategy_state"])
        start, best = payload["generation"], payload["best"]
        env_steps, wall, history = payload["env_steps"], payload["wall_time"], payload["history"]
        # Drop what a killed generation logged after the last checkpoint.
        with open(metrics_file, "r+") as f:
            f.truncate(payload["metrics_bytes"])

    run = RunDir(run_path)
    run.write_config({"command": "meta-train", "version": __version__,
                      "evolve": dataclasses.asdict(cfg),
                      "strategy": strategy.settings(),
                      "inner": {e: c.to_dict() for e, c in configs.items()}})
    logger = _wandb(cfg, run_path, payload)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.generations, initial=start, unit="gen",
                   desc=f"{cfg.strategy} on {cfg.algorithm}")
    eval_seeds = [EVAL_SEED_BASE + i for i in range(cfg.eval_seeds)]
    try:
        for gen in range(start, cfg.generations):
            t0 = time.perf_counter()
            candidates, state = strategy.ask(state)
            trained = candidates
            if fail_members is not None:  # test hook: these members' inner loops blow up
                trained = candidates.clone()
                trained[fail_members(gen)] = float("nan")
            t_inner = time.perf_counter()
            seed = generation_seed(cfg.seed, gen if cfg.new_seed_each_generation else 0)
            fitness, info = family.score(configs, member, trained, [seed])
            t_inner = time.perf_counter() - t_inner
            env_steps += info["env_steps"]
            failed = ~torch.isfinite(fitness)
            if failed.any():
                idx = failed.nonzero().flatten().tolist()
                warnings.warn(f"generation {gen}: members {idx} failed (NaN); they get fitness "
                              f"{FAILED_FITNESS}", RuntimeWarning, stacklevel=2)
                fitness = torch.where(failed, torch.full_like(fitness, FAILED_FITNESS), fitness)
            state = strategy.tell(state, candidates, fitness)
            ok = fitness[~failed]
            row = {"generation": gen, "fitness_mean": float(ok.mean()) if ok.numel() else None,
                   "fitness_max": float(fitness.max()),
                   "fitness_min": float(ok.min()) if ok.numel() else None,
                   "failed": int(failed.sum()), "env_steps": env_steps,
                   **strategy.extras(state),
                   # per member: fitness, and each environment's raw final return
                   "member_fitness": [float(f) for f in fitness],
                   "member_returns": {e: [float(v) if math.isfinite(v) else None
                                          for v in r.tolist()]
                                      for e, r in info["raw"].items()}}
            if (gen + 1) % cfg.eval_every == 0 or gen + 1 == cfg.generations:
                mean = strategy.mean(state)
                t_eval = time.perf_counter()
                efit, einfo = family.score(configs, member,
                                           mean.unsqueeze(0).expand(len(eval_seeds), -1),
                                           eval_seeds)
                t_inner += time.perf_counter() - t_eval
                env_steps += einfo["env_steps"]
                row["env_steps"] = env_steps
                row["eval_fitness"] = float(efit.nanmean())
                row["eval_returns"] = {e: float(v.nanmean()) for e, v in einfo["raw"].items()}
                better = math.isfinite(row["eval_fitness"]) and (
                    best is None or not math.isfinite(best["eval_fitness"])
                    or row["eval_fitness"] > best["eval_fitness"])
                if best is None or better:
                    best = {"generation": gen, "eval_fitness": row["eval_fitness"],
                            "params": mean.clone()}
            wall += time.perf_counter() - t0
            row["wall_time"] = wall
            row["inner_share"] = t_inner / max(time.perf_counter() - t0, 1e-9)
            history.append({k: v for k, v in row.items() if k not in (
                "wall_time", "inner_share", "member_fitness", "member_returns")})
            run.log(**row)
            run.sync()  # metrics on disk before the checkpoint that points past them
            if logger is not None:
                logger.log({k: v for k, v in row.items() if not isinstance(v, dict)}, step=gen)
            if best is not None and best["generation"] == gen:
                _save_best(run_path, cfg, strategy, best, env_steps, wall)
            ckpt.write({
                "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                "generation": gen + 1, "strategy_state": strategy.state_dict(state),
                "best": best, "env_steps": env_steps, "wall_time": wall, "history": history,
                "metrics_bytes": metrics_file.stat().st_size, "version": __version__,
                "wandb_id": getattr(logger, "id", None) or (payload or {}).get("wandb_id"),
            })
            if bar is not None:
                bar.update(1)
                bar.set_postfix(fitness=f"{row['fitness_mean']:.3g}" if ok.numel() else "nan",
                                best=f"{best['eval_fitness']:.3g}" if best else "-")
    finally:
        if bar is not None:
            bar.close()
        run.close()
        if logger is not None:
            logger.finish()

    final = _save_final(run_path, cfg, strategy, state, env_steps, wall)
    results = {
        "algorithm": cfg.algorithm, "strategy": cfg.strategy, "envs": cfg.envs,
        "generations": cfg.generations, "popsize": cfg.popsize,
        "best_generation": best["generation"], "best_eval_fitness": best["eval_fitness"],
        "first_fitness_mean": history[0]["fitness_mean"],
        "last_fitness_mean": history[-1]["fitness_mean"],
        "env_steps": env_steps, "wall_time": wall,
        "best_artifact": str(run_path / "best.pt"), "final_artifact": str(final),
    }
    write_json_atomic(run_path / "results.json", results)
    (run_path / "summary.md").write_text(_summary(cfg, results, history))
    echo(f"best artifact: {run_path / 'best.pt'} (generation {best['generation']}, "
         f"evaluation fitness {best['eval_fitness']:.4g})")
    return results


def _provenance(cfg, strategy, env_steps, wall, generation):
    return {"method": "evolve", "strategy": strategy.settings(),
            "meta_train_envs": list(cfg.envs), "generation": generation,
            "generations": cfg.generations, "env_steps": int(env_steps),
            "wall_time": round(wall, 3), "seed": cfg.seed, "inner": dict(cfg.inner),
            "init": cfg.init or f"default: {family_of(cfg.algorithm).init_doc}"}


def _save_best(run_path, cfg, strategy, best, env_steps, wall):
    art = network_artifact(cfg.algorithm, best["params"],
                           _provenance(cfg, strategy, env_steps, wall, best["generation"]),
                           name=f"{cfg.algorithm}-{cfg.strategy}-best")
    art.provenance["eval_fitness"] = best["eval_fitness"]
    # best.pt is the mean with the best evaluation fitness, measured on these seeds
    art.provenance["selection_seeds"] = [EVAL_SEED_BASE + i for i in range(cfg.eval_seeds)]
    save(art, run_path / "best.pt")


def _save_final(run_path, cfg, strategy, state, env_steps, wall):
    art = network_artifact(cfg.algorithm, strategy.mean(state),
                           _provenance(cfg, strategy, env_steps, wall, cfg.generations - 1),
                           name=f"{cfg.algorithm}-{cfg.strategy}-final")
    return save(art, run_path / "final.pt")


def _summary(cfg, results, history) -> str:
    lines = [f"# metarl meta-train: {cfg.algorithm} with {cfg.strategy}", "",
             f"Environments {', '.join(cfg.envs)}; {cfg.generations} generations of "
             f"{cfg.popsize}; {results['env_steps']:,} environment steps; "
             f"{results['wall_time']:.0f} s.", "",
             "| generation | fitness mean | fitness max | evaluation |", "|---:|---:|---:|---:|"]
    for h in history:
        ev = h.get("eval_fitness")
        fm = h["fitness_mean"]
        lines.append(f"| {h['generation']} | {fm if fm is None else f'{fm:.4g}'} | "
                     f"{h['fitness_max']:.4g} | {'' if ev is None else f'{ev:.4g}'} |")
    lines += ["", f"Best: generation {results['best_generation']}, evaluation fitness "
              f"{results['best_eval_fitness']:.4g} (`best.pt`)."]
    return "\n".join(lines) + "\n"


def _wandb(cfg: EvolveConfig, run_path: Path, payload):
    if cfg.wandb == "off":
        return None
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed: logging to metrics.jsonl only "
                      "(pip install wandb, or pass --wandb off)", stacklevel=2)
        return None
    run_id = payload.get("wandb_id") if payload else None
    return wandb.init(project="metarl", dir=str(run_path), mode=cfg.wandb, id=run_id,
                      resume="allow" if run_id else None, config=dataclasses.asdict(cfg),
                      settings=wandb.Settings(silent=True))

