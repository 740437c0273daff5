"""The ``metarl`` command. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields

from metarl.configs import PER_ENV_FIELDS, PPOConfig, flag_of

SKIP_FIELDS = {"env_id"}


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`PPOConfig` field; unset flags keep the per-environment default."""
    group = parser.add_argument_group("inner-loop configuration (defaults per environment)")
    hints = typing.get_type_hints(PPOConfig)
    for f in fields(PPOConfig):
        if f.name in SKIP_FIELDS or f.name in skip:
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        help_ = f.metadata.get("help", "")
        if f.name in PER_ENV_FIELDS:
            group.add_argument(flag_of(f.name), dest=f.name, default=None, action="append",
                               metavar="[ENV=]VALUE",
                               help=help_ + "; ENV=VALUE for one of several environments "
                               "(repeatable)")
        elif base is bool:
            group.add_argument(flag_of(f.name), dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_)
        else:
            group.add_argument(flag_of(f.name), dest=f.name, default=None, type=base,
                               metavar=base.__name__.upper(), help=help_)


def config_overrides(ns: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The configuration flags given; per-environment ones as a value or ``{env: value}``."""
    from metarl.configs import parse_env_values

    out = {f.name: getattr(ns, f.name) for f in fields(PPOConfig)
           if f.name not in SKIP_FIELDS and f.name not in skip
           and getattr(ns, f.name, None) is not None}
    for name in PER_ENV_FIELDS:
        if name in out:
            out[name] = parse_env_values(out[name], flag_of(name))
    return out


def _parse_count(text: str):
    return text  # parsed by metarl.train.parse_seeds, which explains bad input


def _grid_flags(p: argparse.ArgumentParser, d) -> None:
    """The drift family's grid flags (a :class:`~metarl.families.drift.DriftGrid`, ``d``'s
    values as the defaults shown), and ``--data KEY=VALUE`` for any family's options."""
    g = p.add_argument_group(
        "synthetic data: the drift family's grid (log r = k * step; A from its range by "
        "step), or any family's options with --data")
    g.add_argument("--log-ratio-range", nargs=2, type=float, default=None,
                   metavar=("MIN", "MAX"), help=f"drift (default {d.log_ratio_min:g} "
                                                f"{d.log_ratio_max:g})")
    g.add_argument("--log-ratio-step", type=float, default=None,
                   help=f"drift (default {d.log_ratio_step:g})")
    g.add_argument("--adv-range", nargs=2, type=float, default=None, metavar=("MIN", "MAX"),
                   help=f"drift (default {d.adv_min:g} {d.adv_max:g})")
    g.add_argument("--adv-step", type=float, default=None,
                   help=f"drift (default {d.adv_step:g})")
    g.add_argument("--data", action="append", default=None, metavar="KEY=VALUE",
                   help="one option of the teacher family's data; repeat the flag for "
                        "several (--data unroll=20 --data val_batches=2). An optimiser "
                        "teacher: batches_per_epoch, val_batches, unroll (distill) or "
                        "points (symbolic); a drift teacher: the grid's fields "
                        "(log_ratio_step=0.0625 ...)")


def _grid(ns, teacher: str, method: str):
    """The data options of the command line: None (the family's default) when no data flag
    is given; else the family's default with the given fields replaced."""
    import dataclasses

    from metarl.artifact import default_data

    drift = {"log_ratio_range": ("log_ratio_min", "log_ratio_max"),
             "log_ratio_step": ("log_ratio_step",), "adv_range": ("adv_min", "adv_max"),
             "adv_step": ("adv_step",)}
    given: dict = {}
    set_by: dict = {}  # option -> the drift flag that set it, for messages
    for flag, keys in drift.items():
        value = getattr(ns, flag)
        if value is not None:
            given.update(zip(keys, value if isinstance(value, (list, tuple)) else [value]))
            set_by.update(dict.fromkeys(keys, flag_of(flag)))
    for item in ns.data or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--data takes KEY=VALUE pairs, got {item!r}")
        given[key.strip().replace("-", "_")] = value.strip()
    if not given:
        return None
    base = default_data(teacher, method)
    if base is None:
        return None  # the teacher cannot be read, or has no such method: the run says why
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(given) - set(known))
    options = ", ".join(f"{k}={getattr(base, k)!r}" for k in known)
    flags = sorted({set_by[k] for k in unknown if k in set_by})
    if flags:
        raise ValueError(f"{' and '.join(flags)} set the drift family's grid, and the "
                         f"{method} data of {teacher} is a {type(base).__name__}; set its "
                         f"options with --data KEY=VALUE ({options})")
    if unknown:
        raise ValueError(f"{type(base).__name__} (the {method} data of {teacher}) has no "
                         f"option {', '.join(unknown)}; its options are {options}")
    typed = {}
    for k, v in given.items():
        kind = type(getattr(base, k))
        try:
            typed[k] = kind(v)
        except ValueError:
            raise ValueError(f"--data {k}: expected {kind.__name__}, got {v!r}") from None
    return dataclasses.replace(base, **typed)


def _names() -> str:
    from metarl.families import all_members

    return ", ".join(all_members())


def build_parser() -> argparse.ArgumentParser:
    from metarl import __version__
    from metarl.families import learned_names
    from metarl.families.drift import SYMBOLIC_GRID, DriftGrid

    parser = argparse.ArgumentParser(
        prog="metarl", description="Meta-learn reinforcement-learning algorithms.")
    parser.add_argument("--version", action="version", version=f"metarl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train PPO with an algorithm in its slot (a drift "
                       "function or an optimiser) on environments x seeds",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algorithm", default="ppo-clip",
                   help=f"a member name ({_names()}) or an artifact file; it fills its "
                        f"family's slot, the other slot keeps its default (PPO clip, Adam)")
    p.add_argument("--envs", nargs="+", default=["CartPole-v1"], help="environment ids")
    p.add_argument("--seeds", default="8", type=_parse_count,
                   help="number of seeds (8 -> 0..7) or a comma-separated list (0,3,7)")
    p.add_argument("--out", default=None, help="run directory (default: runs/train-...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(p)

    p = sub.add_parser("meta-train", help="meta-learn an algorithm with an evolution strategy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("algorithm", help="the learned algorithm to meta-train: "
                   + ", ".join(learned_names()))
    p.add_argument("--es", dest="strategy", default="openai-es",
                   help="evolution strategy: openai-es or cma-es")
    p.add_argument("--envs", nargs="*", default=["CartPole-v1"],
                   help="meta-training environment ids (fitness is reference-normalised and "
                        "averaged over several)")
    p.add_argument("--generations", type=int, default=800, help="the paper ran 800")
    p.add_argument("--popsize", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=8,
                   help="evaluate the strategy's mean every this many generations")
    p.add_argument("--eval-seeds", type=int, default=8, help="seeds per evaluation")
    p.add_argument("--sigma", type=float, default=None,
                   help="initial noise scale (default: the strategy's, 0.03)")
    p.add_argument("--meta-lr", dest="meta_lr", type=float, default=None,
                   help="openai-es learning rate (default 0.03)")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "off"],
                   help="Weights & Biases logging (offline needs no account)")
    p.add_argument("--init", default=None,
                   help="start the strategy's mean from this artifact, or 'zeros' (default: "
                        "the family's start: zero LPO weights, which is PPO; PyTorch's "
                        "default initialisation, seeded by --seed, for the optimisers)")
    p.add_argument("--same-seed", action="store_true",
                   help="every generation reuses one inner seed (default: a new seed per "
                        "generation, as in the paper)")
    p.add_argument("--out", default=None, help="run directory (default: runs/meta-train-...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(p)

    p = sub.add_parser("evaluate", help="train algorithms on environments x seeds; compare",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("algorithms", nargs="+",
                   help=f"artifact files or member names ({_names()}); each fills its "
                        f"family's slot, the other slot keeps its default")
    p.add_argument("--envs", nargs="*", default=["CartPole-v1"], help="environment ids")
    p.add_argument("--seeds", default="8",
                   help="a count (the first seeds no algorithm was selected on) or a "
                        "comma-separated list (used as given)")
    p.add_argument("--meta-train-envs", nargs="*", default=None,
                   help="the in-distribution environments (default: from the artifacts)")
    p.add_argument("--tune-lr", action="store_true",
                   help="first tune the agent learning rate per algorithm and environment "
                        "(x0.25 .. x4 of the default, on separate seeds), as the paper allows "
                        "for LLM proposals")
    p.add_argument("--out", default=None, help="run directory (default: runs/evaluate-...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_config_flags(p)

    p = sub.add_parser("distill", help="black-box distillation of a learned network into a "
                       "network of the same or another width (no environment samples)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("teacher", help="a network artifact (e.g. best.pt of meta-train)")
    p.add_argument("--hidden", type=int, default=None,
                   help="student width (default: the teacher's, 128 for the paper's LPO)")
    p.add_argument("--student", default=None,
                   help="the student's member (default: the teacher's own; a recurrent "
                        "open teacher may also be distilled into open-ff)")
    p.add_argument("--epochs", type=int, default=20,
                   help="passes over the grid (drift) or of batches_per_epoch fresh "
                        "batches (optim)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the family's (drift 4096 grid points, optim 2048 "
                        "synthetic parameters)")
    p.add_argument("--lr-start", type=float, default=1e-4, help="Adam learning rate at start")
    p.add_argument("--lr-end", type=float, default=1e-5,
                   help="learning rate at the end (linear anneal, per step)")
    p.add_argument("--holdout", type=float, default=0.05,
                   help="share of grid points kept out of training (val_grad_mse)")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="student init: uniform(+-scale/sqrt(fan_in))")
    p.add_argument("--seed", type=int, default=0)
    _grid_flags(p, DriftGrid())
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "off"])
    p.add_argument("--out", default=None, help="run directory (default: runs/distill-...)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's Lightning checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("symbolic", help="symbolic distillation of a drift or an optimiser "
                       "into formulas",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("teacher", help="an artifact file or a handcrafted name (ppo-clip, dpo); "
                   "an open-ff or no-features network")
    p.add_argument("--backend", default="gplearn", choices=["gplearn", "pysr"],
                   help="gplearn is pure Python; pysr needs a Julia installation")
    p.add_argument("--at-one", default="reject", choices=["reject", "repair"],
                   help="a formula not 0 at r = 1: never choose it (reject, the paper's), "
                        "or subtract its value at r = 1 (repair)")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest formula, in nodes (default: the family's, drift 40, "
                        "optim 60)")
    p.add_argument("--max-depth", type=int, default=None,
                   help="deepest formula (default: the family's, drift 8, optim 9)")
    p.add_argument("--population", type=int, default=1000)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--parsimony", type=float, default=0.001,
                   help="penalty per node during the search")
    p.add_argument("--seed", type=int, default=0)
    _grid_flags(p, SYMBOLIC_GRID)
    p.add_argument("--evaluate", nargs="*", default=None, metavar="ENV",
                   help="then evaluate the teacher and both chosen formulas on these "
                        "environments (in <out>/evaluate)")
    p.add_argument("--seeds", default="8", help="seeds for --evaluate")
    p.add_argument("--out", default=None, help="run directory (default: runs/symbolic-...)")
    add_config_flags(p, skip=("backend",))  # for --evaluate (--backend is the regressor's)

    p = sub.add_parser("propose", help="an LLM proposes algorithm code, scored in a sandbox",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("family", help="the learned algorithm whose slot the proposed code fills: "
                   "lpo (drift functions), open (optimisers with a memory, from Adam), "
                   "open-ff or no-features (optimisers, from SGD)")
    p.add_argument("--model", default="o3-mini", help="model name the endpoint serves")
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM) or "
                        "http://127.0.0.1:11434/v1 (Ollama); default: OpenAI's")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="the environment variable holding the API key (never a flag)")
    p.add_argument("--envs", nargs="*", default=["CartPole-v1"],
                   help="meta-training environments (fitness: mean normalised return)")
    p.add_argument("--generations", type=int, default=30, help="proposals (the paper: 30)")
    p.add_argument("--seeds", type=int, default=8,
                   help="fixed seeds 0..N-1 per proposal (evaluate then leaves them out)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries of a failing request (network, 429, 5xx), with backoff")
    p.add_argument("--retry-base", type=float, default=2.0,
                   help="first backoff in seconds, doubled on each retry")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--call-timeout", type=float, default=60.0,
                   help="sandbox: seconds for one evaluation of the proposed function")
    p.add_argument("--memory-mb", type=int, default=4096, help="sandbox: address-space limit")
    p.add_argument("--cpu-s", type=int, default=21600,
                   help="sandbox: CPU seconds of one proposal's child (validation and training)")
    p.add_argument("--wall-s", type=float, default=21600.0,
                   help="sandbox: wall seconds of one proposal's child")
    p.add_argument("--out", default=None, help="run directory (default: runs/propose-...)")
    p.add_argument("--resume", action="store_true", help="continue the run's conversation")
    add_config_flags(p)

    p = sub.add_parser("quickstart", help="short LPO meta-training, then its evaluation "
                       "against ppo-clip and dpo (about ten minutes on 2 cores)")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "off"])
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    p = sub.add_parser("show", help="print an artifact: family, representation, provenance")
    p.add_argument("artifact", help="an artifact file or a handcrafted name")

    p = sub.add_parser("envs", help="list the environment ids and their backends")
    p.add_argument("filter", nargs="?", default="", help="only ids containing this text")
    return parser


def cmd_train(ns) -> int:
    from metarl.train import run_train

    run_train(ns.algorithm, ns.envs, ns.seeds, out=ns.out, progress=not ns.no_progress,
              **config_overrides(ns))
    return 0


def cmd_meta_train(ns) -> int:
    from metarl.meta.evolve import EvolveConfig, meta_train

    cfg = EvolveConfig(algorithm=ns.algorithm, strategy=ns.strategy, envs=list(ns.envs),
                       generations=ns.generations, popsize=ns.popsize, seed=ns.seed,
                       eval_every=ns.eval_every, eval_seeds=ns.eval_seeds, sigma=ns.sigma,
                       lr=ns.meta_lr, inner=config_overrides(ns), wandb=ns.wandb,
                       init=ns.init, new_seed_each_generation=not ns.same_seed)
    meta_train(cfg, out=ns.out, resume=ns.resume, progress=not ns.no_progress)
    return 0


def cmd_evaluate(ns) -> int:
    from metarl.evaluate import LR_FACTORS, evaluate

    evaluate(ns.algorithms, list(ns.envs), ns.seeds, meta_train_envs=ns.meta_train_envs,
             out=ns.out, progress=not ns.no_progress,
             tune_lr_factors=LR_FACTORS if ns.tune_lr else None, **config_overrides(ns))
    return 0


def cmd_distill(ns) -> int:
    from metarl.meta.distill import DistillConfig, distill

    cfg = DistillConfig(teacher=ns.teacher, hidden=ns.hidden, student=ns.student,
                        grid=_grid(ns, ns.teacher, "distillation"), epochs=ns.epochs,
                        batch_size=ns.batch_size, lr_start=ns.lr_start, lr_end=ns.lr_end,
                        holdout=ns.holdout, init_scale=ns.init_scale, seed=ns.seed,
                        wandb=ns.wandb)
    distill(cfg, out=ns.out, resume=ns.resume, progress=not ns.no_progress)
    return 0


def cmd_symbolic(ns) -> int:
    from metarl.meta.symbolic import SymbolicConfig, symbolic_distill

    cfg = SymbolicConfig(teacher=ns.teacher, backend=ns.backend, at_one=ns.at_one,
                         grid=_grid(ns, ns.teacher, "symbolic"), max_size=ns.max_size,
                         max_depth=ns.max_depth,
                         population=ns.population, generations=ns.generations,
                         parsimony=ns.parsimony, seed=ns.seed)
    results = symbolic_distill(cfg, out=ns.out)
    if ns.evaluate is not None:
        from pathlib import Path

        from metarl.evaluate import evaluate

        arts = results["artifacts"]
        envs = ns.evaluate or ["CartPole-v1"]
        evaluate([ns.teacher, arts["lowest-loss"], arts["best-score"]], envs, ns.seeds,
                 out=Path(results["run_dir"]) / "evaluate",
                 **config_overrides(ns, skip=("backend",)))
    return 0


def cmd_propose(ns) -> int:
    from metarl.meta.propose import ProposeConfig, ProposeError, propose

    cfg = ProposeConfig(family=ns.family, model=ns.model, base_url=ns.base_url,
                        api_key_env=ns.api_key_env, envs=list(ns.envs),
                        generations=ns.generations, seeds=ns.seeds, inner=config_overrides(ns),
                        temperature=ns.temperature, request_timeout_s=ns.request_timeout,
                        max_retries=ns.max_retries, retry_base_s=ns.retry_base,
                        call_timeout_s=ns.call_timeout, memory_mb=ns.memory_mb,
                        cpu_s=ns.cpu_s, wall_s=ns.wall_s)
    try:
        propose(cfg, out=ns.out, resume=ns.resume)
    except ProposeError as e:
        print(f"metarl propose: {e}", file=sys.stderr)
        return 3
    return 0


def cmd_quickstart(ns) -> int:
    from metarl.quickstart import quickstart

    quickstart(ns.out, resume=ns.resume, wandb=ns.wandb, progress=not ns.no_progress)
    return 0


def cmd_show(ns) -> int:
    from metarl.artifact import load

    print(load(ns.artifact).describe())
    return 0


def cmd_envs(ns) -> int:
    from metarl.envs import list_envs

    ids = {k: v for k, v in list_envs().items() if ns.filter.lower() in k.lower()}
    width = max((len(k) for k in ids), default=10)
    for env_id, backends in ids.items():
        print(f"{env_id:<{width}}  {', '.join(backends)}")
    print(f"\n{len(ids)} ids. backend 'auto' uses the first backend listed.", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    handler = {"train": cmd_train, "meta-train": cmd_meta_train, "evaluate": cmd_evaluate,
               "distill": cmd_distill, "symbolic": cmd_symbolic, "propose": cmd_propose,
               "quickstart": cmd_quickstart, "show": cmd_show, "envs": cmd_envs}[ns.command]
    try:
        return handler(ns)
    except (ValueError, OSError, TypeError, ImportError) as e:
        print(f"metarl {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a code artifact's proposal failing, or its sandbox
        from metarl.sandbox import ProposalError, SandboxError

        if isinstance(e, ProposalError):
            print(f"metarl {ns.command}: the artifact's code failed: {e}", file=sys.stderr)
            return 2
        if isinstance(e, SandboxError):
            print(f"metarl {ns.command}: sandbox error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
