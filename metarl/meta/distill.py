"""Black-box distillation: imitate a learned network with another network, no env samples.

``metarl distill ART [--hidden N]`` trains a student of the family's learned architecture
(LPO at any width) to imitate the teacher on synthetic inputs (:mod:`metarl.meta.families`).
For LPO the student matches the gradient of the actor loss ``-(r A - drift)`` with respect
to the ratio ``r`` (mean squared error) on the paper's grid, with Adam and the learning rate
annealed linearly from 1e-4 to 1e-5 over the run (ALGORITHMS.md, Distillation). A share of
the grid points (``holdout``, 5%) is kept out of training and reported as ``val_grad_mse``.

Training is a Lightning ``LightningModule`` run by a Lightning ``Trainer``: its checkpoint
(``checkpoints/last.ckpt``, written at every epoch end, atomically) gives ``--resume``; its
W&B logger (offline unless told otherwise) and progress bar are used as they are. The batch
order of each epoch is a pure function of the seed and the epoch number, so a resumed run
ends with the same numbers as an uninterrupted one. Every epoch also appends one line to
``metrics.jsonl``; the student becomes ``student.pt``, an artifact whose provenance names
the teacher and the zero environment steps spent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metarl import artifact as art_mod
from metarl.algorithms.drift import LPO
from metarl.logging import RunDir, keep_metrics, refuse_other_run, write_json_atomic
from metarl.meta.families import DriftGrid, drift_and_grad, teacher_module


@dataclass
class DistillConfig:
    teacher: str
    hidden: int | None = None  # None: the teacher's width (LPO: 128)
    grid: DriftGrid = field(default_factory=DriftGrid)
    epochs: int = 20
    batch_size: int = 4096
    lr_start: float = 1e-4
    lr_end: float = 1e-5
    holdout: float = 0.05
    init_scale: float = 1.0
    clip_eps: float = 0.2
    seed: int = 0
    wandb: str = "offline"

    def differences(self, saved: dict) -> list[str]:
        now = json.loads(json.dumps(asdict(self)))
        keys = [k for k in now if k != "wandb"]
        return [f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in keys
                if saved.get(k) != now[k]]


def check_distill_config(cfg: DistillConfig) -> None:
    for name in ("hidden", "epochs", "batch_size"):
        if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.lr_end <= cfg.lr_start:
        raise ValueError(f"need 0 < lr_end <= lr_start, got lr_start={cfg.lr_start}, "
                         f"lr_end={cfg.lr_end}")
    if not 0 < cfg.holdout < 1:
        raise ValueError(f"holdout is the share of grid points kept out of training, "
                         f"between 0 and 1 exclusive; got {cfg.holdout}")
    if cfg.wandb not in ("offline", "online", "off"):
        raise ValueError(f"wandb must be offline, online or off, got {cfg.wandb!r}")
    cfg.grid.check()


def load_teacher(name: str):
    """The teacher artifact and its module with weights loaded; only networks qualify."""
    artifact = art_mod.load(name)
    if artifact.family != "drift":
        raise ValueError(f"distillation supports the drift family; {name} is "
                         f"{artifact.family!r}")
    if artifact.kind != "network":
        what = {"handcrafted": "a handcrafted member", "symbolic": "a formula"}.get(
            artifact.kind, f"a {artifact.kind} artifact")
        raise ValueError(
            f"{name} is {what}, not a network: there are no weights to imitate. Black-box "
            f"distillation takes a learned network (e.g. best.pt from `metarl meta-train`); "
            f"to write a handcrafted member or a network as a formula use "
            f"`metarl symbolic {name}`")
    drift, params = artifact.build()
    return artifact, teacher_module(drift, params)


# --------------------------------------------------------------------------- data


class GridData(torch.utils.data.Dataset):
    """Indexed by a tensor of point indices; returns ``(ratio, advantage, target_grad)``."""

    def __init__(self, ratio, adv, grad):
        self.ratio, self.adv, self.grad = ratio, adv, grad

    def __len__(self):
        return self.ratio.numel()

    def __getitem__(self, idx):
        return self.ratio[idx], self.adv[idx], self.grad[idx]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices in an order fixed by ``(seed, epoch)``; Lightning calls
    ``set_epoch`` before every epoch, so a resumed epoch sees the same batches."""

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int, shuffle: bool):
        self.indices, self.batch_size, self.seed, self.shuffle = indices, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return (self.indices.numel() + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        idx = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = idx[torch.randperm(idx.numel(), generator=g)]
        yield from idx.split(self.batch_size)


def make_data(cfg: DistillConfig, teacher):
    ratio, adv = cfg.grid.tensors()
    _, grad = drift_and_grad(teacher, ratio, adv, cfg.clip_eps)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(ratio.numel(), generator=g)
    n_val = max(1, int(round(cfg.holdout * ratio.numel())))
    return GridData(ratio, adv, grad), perm[n_val:].sort().values, perm[:n_val].sort().values


# --------------------------------------------------------------------------- module


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        raise ImportError("metarl distill needs Lightning: pip install lightning") from None
    return pl


def grad_mse(student, batch, clip_eps: float, create_graph: bool = False) -> torch.Tensor:
    """MSE between the student's and the teacher's ``d actor_loss / d r``.

    ``actor_loss = -(r A - drift)``, so its gradient is ``drift'(r) - A``; ``batch`` holds
    the teacher's ``drift'(r)``."""
    ratio, adv, target = batch
    ratio = ratio.detach().requires_grad_(True)
    with torch.enable_grad():
        actor = -(ratio * adv - student(ratio, adv, clip_eps))
        (g,) = torch.autograd.grad(actor.sum(), ratio, create_graph=create_graph)
    return torch.mean((g - (target - adv)) ** 2)


def make_module(cfg: DistillConfig, total_steps: int):
    pl = _lightning()

    class DriftDistiller(pl.LightningModule):
        """A student LPO that matches the teacher's actor-loss gradient in the ratio."""

        def __init__(self):
            super().__init__()
            self.student = LPO(hidden=cfg.hidden)
            g = torch.Generator().manual_seed(cfg.seed + 1)
            with torch.no_grad():  # LPO starts at zero, where its gradients vanish too
                for lin in (self.student.l1, self.student.l2):
                    bound = cfg.init_scale / lin.in_features ** 0.5
                    lin.weight.uniform_(-bound, bound, generator=g)
            self.train_sum = 0.0
            self.train_count = 0

        def grad_mse(self, batch):
            return grad_mse(self.student, batch, cfg.clip_eps, create_graph=self.training)

        def training_step(self, batch, batch_idx):
            loss = self.grad_mse(batch)
            self.train_sum += float(loss.detach()) * batch[0].numel()
            self.train_count += batch[0].numel()
            self.log("train_grad_mse", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            loss = self.grad_mse(batch)
            self.log("val_grad_mse", loss, prog_bar=True, reduce_fx="mean",
                     batch_size=batch[0].numel())
            return loss

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.student.parameters(), lr=cfg.lr_start)
            ratio = cfg.lr_end / cfg.lr_start
            span = max(total_steps - 1, 1)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: 1.0 + (ratio - 1.0) * min(step, span) / span)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return DriftDistiller()


def _callbacks(cfg, run: RunDir, ckpt_dir: Path, clock):
    pl = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    class AtomicCheckpoint(ModelCheckpoint):
        """Lightning's checkpoint, written to a temporary file and renamed into place, so a
        kill while it is being written leaves the previous checkpoint intact."""

        def _save_checkpoint(self, trainer, filepath):
            tmp = f"{filepath}.tmp"
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, filepath)
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath

    class EpochLog(pl.Callback):
        """One metrics.jsonl line per epoch, made durable before that epoch's checkpoint."""

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            run.log(epoch=trainer.current_epoch, step=trainer.global_step,
                    train_grad_mse=module.train_sum / max(module.train_count, 1),
                    val_grad_mse=float(m["val_grad_mse"]),
                    lr=trainer.optimizers[0].param_groups[0]["lr"], wall_time=clock())
            run.sync()
            module.train_sum, module.train_count = 0.0, 0

    ckpt = AtomicCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                            every_n_epochs=1, save_on_train_epoch_end=False,
                            enable_version_counter=False)
    return [ckpt, EpochLog()]


def _prior_wall_time(path: Path) -> float:
    """Wall time of the sessions before this one: the last metrics line's running total."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return float(json.loads(lines[-1]).get("wall_time", 0.0)) if lines else 0.0


def distill(cfg: DistillConfig, out: str | Path | None = None, resume: bool = False,
            progress: bool = True, log=print) -> dict:
    """Train a student network to imitate ``cfg.teacher``; return the results."""
    check_distill_config(cfg)
    teacher_art, teacher = load_teacher(cfg.teacher)
    if cfg.hidden is None:  # the same width as the teacher
        cfg = dataclasses.replace(cfg, hidden=int(teacher.hidden))
    pl = _lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no start-up banner
    run_path = Path(out) if out else RunDir.default_path("distill", teacher_art.name)
    ckpt_dir = run_path / "checkpoints"
    ckpt_path = ckpt_dir / "last.ckpt"
    if resume:
        if not ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}; start the run "
                             f"without --resume")
        saved = json.loads((run_path / "config.json").read_text())
        diffs = cfg.differences(saved)
        if diffs:
            raise ValueError("--resume with a different configuration: " + "; ".join(diffs))
        done = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"]) + 1
        keep_metrics(run_path / "metrics.jsonl", "epoch", done)
    elif ckpt_path.exists():
        raise ValueError(f"{run_path} already holds a distillation run; add --resume to "
                         f"continue it or choose another --out")
    else:
        refuse_other_run(run_path)
    prior = _prior_wall_time(run_path / "metrics.jsonl") if resume else 0.0
    run = RunDir(run_path, append=resume)
    if not resume:
        run.write_config(asdict(cfg))

    t0 = time.time()
    data, train_idx, val_idx = make_data(cfg, teacher)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=EpochBatches(train_idx, cfg.batch_size, cfg.seed, True))
    val_loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=EpochBatches(val_idx, 65536, cfg.seed, False))
    total_steps = len(loader) * cfg.epochs
    module = make_module(cfg, total_steps)
    logger = False
    if cfg.wandb != "off" and importlib.util.find_spec("wandb") is None:
        warnings.warn("wandb is not installed: logging to metrics.jsonl only (pip install "
                      "wandb, or pass --wandb off)", stacklevel=2)
    elif cfg.wandb != "off":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        logger = WandbLogger(project="metarl", save_dir=str(run_path), mode=cfg.wandb,
                             name=run_path.name, id=f"distill-{run_path.name}",
                             resume="allow", config=json.loads(json.dumps(asdict(cfg))))
    trainer = pl.Trainer(
        max_epochs=cfg.epochs, accelerator="auto", devices=1, logger=logger,
        callbacks=_callbacks(cfg, run, ckpt_dir, lambda: prior + time.time() - t0),
        enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False,
        deterministic=True, log_every_n_steps=max(1, min(50, len(loader))),
        default_root_dir=str(run_path))
    with warnings.catch_warnings():
        # Lightning's advice for multi-process data loading does not apply to an in-memory
        # grid; its pytree deprecation notice is about Lightning's own code.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # resume
        trainer.fit(module, loader, val_loader,
                    ckpt_path=str(ckpt_path) if resume else None)
    wall = prior + time.time() - t0  # every session of the run

    lines = [json.loads(ln) for ln in (run_path / "metrics.jsonl").read_text().splitlines()
             if ln.strip()]
    final = lines[-1] if lines else {}
    student = module.student
    params = student.flat_params()
    zero = LPO(hidden=cfg.hidden)  # a zero network is PPO: the score of not imitating
    zero_mse = _mean_over(val_loader, lambda b: grad_mse(zero, b, cfg.clip_eps))
    prov = {"method": "distill", "teacher": teacher_art.name,
            "teacher_provenance": teacher_art.provenance, "env_steps": 0,
            "meta_train_envs": teacher_art.provenance.get("meta_train_envs", []),
            "wall_time": round(wall, 1), "seed": cfg.seed,
            "settings": {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items()
                         if k != "teacher"},
            "val_grad_mse": final.get("val_grad_mse")}
    name = f"{teacher_art.name}-distill-h{cfg.hidden}"
    path = art_mod.save(art_mod.network_artifact("lpo", params, prov, name=name,
                                                 hidden=cfg.hidden), run_path / "student.pt")
    results = {"teacher": teacher_art.name, "hidden": cfg.hidden,
               "student_params": int(params.numel()), "epochs": cfg.epochs,
               "steps": trainer.global_step, "train_points": int(train_idx.numel()),
               "val_points": int(val_idx.numel()),
               "train_grad_mse": final.get("train_grad_mse"),
               "val_grad_mse": final.get("val_grad_mse"),
               "val_grad_mse_of_ppo": zero_mse, "env_steps": 0, "wall_time_s": wall,
               "artifact": str(path)}
    run.write_results(results)
    run.write_summary(
        f"# Distillation of {teacher_art.name} into LPO width {cfg.hidden}\n\n"
        f"{cfg.epochs} epochs, {trainer.global_step} steps, {wall:.1f} s, 0 environment "
        f"steps.\n\n| | grad MSE |\n|---|---:|\n"
        f"| student, train points | {results['train_grad_mse']:.4g} |\n"
        f"| student, held-out points | {results['val_grad_mse']:.4g} |\n"
        f"| PPO (zero network), held-out | {zero_mse:.4g} |\n\nartifact: `{path}`\n")
    run.close()
    write_json_atomic(run_path / "teacher.json", {"name": teacher_art.name,
                                                  "provenance": teacher_art.provenance})
    log(f"student width {cfg.hidden}: held-out grad MSE {results['val_grad_mse']:.4g} "
        f"(PPO's: {zero_mse:.4g}); artifact {path}")
    return results


def _mean_over(loader, fn) -> float:
    total, count = 0.0, 0
    for batch in loader:
        total += float(fn(batch)) * batch[0].numel()
        count += batch[0].numel()
    return total / max(count, 1)
