"""Black-box distillation: imitate a learned network with another network, no env samples.

``metarl distill ART [--hidden N]`` trains a student network of the teacher's family to
imitate the teacher on synthetic inputs. Everything family-specific comes from the teacher
artifact's family, ``family.method("distillation")`` (for the drift family
:class:`~metarl.families.drift.distillation.DriftDistillation`): which teachers qualify,
the synthetic data and its options (``grid``), the target and the loss, the student and
its initialisation, and the not-imitating reference. A family without distillation is
refused with its reason before any work.

For the drift family the student is an LPO of any width that matches the gradient of the
actor loss ``-(r A - drift)`` with respect to the ratio ``r`` (mean squared error) on the
grid of Lu et al. 2022. The optimiser is Adam with the learning rate annealed linearly from
1e-4 to 1e-5 over the run, the settings of Goldie et al. 2025 ("How Should We Meta-Learn
Reinforcement Learning Algorithms?"). A share of the points (``holdout``, 5%) is kept out
of training and reported as ``val_<loss>`` (``val_grad_mse``).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from metarl import artifact as art_mod
from metarl import rng
from metarl.families import get_family
from metarl.logging import RunDir, keep_metrics, refuse_other_run, write_json_atomic

METHOD = "distillation"
_S_STREAM = 0xD15  # random stream of the synthetic batches


@dataclass
class DistillConfig:
    teacher: str
    hidden: int | None = None  # None: the teacher's width (LPO: 128, the optimisers: 16)
    #: the family's synthetic-data options (drift: a ``DriftGrid``; optim: a
    #: ``SyntheticOptions``); None: the family's default, filled in here when the teacher
    #: can be read, else when the run starts
    grid: Any = None
    epochs: int = 20
    #: None: the family's (drift 4096 grid points, optim 2048 fresh synthetic parameters)
    batch_size: int | None = None
    #: the student's member; None: the family's default for the teacher (its own member;
    #: recurrent OPEN may also be distilled into ``open-ff``)
    student: str | None = None
    lr_start: float = 1e-4
    lr_end: float = 1e-5
    holdout: float = 0.05
    init_scale: float = 1.0
    seed: int = 0
    wandb: str = "offline"

    def __post_init__(self):
        if self.grid is None:
            self.grid = art_mod.default_data(self.teacher, METHOD)

    def differences(self, saved: dict) -> list[str]:
        now = json.loads(json.dumps(asdict(self)))
        # a field the saved configuration lacks is newer than the run: it had the default
        keys = [k for k in now if k != "wandb" and k in saved]
        return [f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in keys
                if saved.get(k) != now[k]]


def check_distill_config(cfg: DistillConfig) -> None:
    """Refuse bad settings (``ValueError``); the data options are checked by the family."""
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


def _fill(cfg: DistillConfig, method, teacher) -> DistillConfig:
    """``cfg`` with the family's defaults in place of None (data, width, batch size,
    student), and the data and the student checked by the family (``ValueError``)."""
    if cfg.grid is None:
        cfg = dataclasses.replace(cfg, grid=method.default_data())
    method.check_data(cfg.grid)
    students = method.students(teacher)
    if cfg.student is None:
        cfg = dataclasses.replace(cfg, student=students[0])
    elif cfg.student not in students:
        raise ValueError(f"a {teacher.name} teacher can be distilled into "
                         f"{' or '.join(students)}, not {cfg.student!r}")
    if cfg.hidden is None:  # the same width as the teacher
        cfg = dataclasses.replace(cfg, hidden=method.teacher_width(teacher))
    if cfg.batch_size is None:
        cfg = dataclasses.replace(cfg, batch_size=method.default_batch_size)
    return cfg


def load_teacher(name: str):
    """``(artifact, method, teacher)``: the teacher artifact, its family's distillation
    object and the teacher module with its weights loaded. A family without distillation,
    or a teacher it does not take (e.g. one without weights), is refused (``ValueError``)."""
    artifact = art_mod.load(name)
    method = get_family(artifact.family).method(METHOD)
    method.check_teacher(artifact, name)
    member, params = artifact.build()
    return artifact, method, method.teacher(member, params)


# --------------------------------------------------------------------------- data


class PointData(torch.utils.data.Dataset):
    """Synthetic points: tensors with one row per point (the inputs, then the target).
    Indexed by a tensor of point indices; returns the tuple of those rows."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self):
        return self.tensors[0].shape[0]

    def __getitem__(self, idx):
        return tuple(t[idx] for t in self.tensors)


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


class StreamData(torch.utils.data.Dataset):
    """Synthetic batches drawn afresh: item ``(epoch, index)`` is the batch the family's
    ``method.batch`` draws with a generator seeded by ``(seed, split, epoch, index)``, so
    every batch is a pure function of its key (a resumed run sees the same batches)."""

    def __init__(self, method, teacher, options, batch_size: int, seed: int, split: int):
        self.method, self.teacher, self.options = method, teacher, options
        self.batch_size, self.seed, self.split = batch_size, seed, split

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.split, epoch, index))
        return self.method.batch(self.teacher, self.options, self.batch_size, g)


def batch_seed(seed: int, split: int, epoch: int, index: int) -> int:
    """The generator seed of one synthetic batch: a 32-bit hash of ``(seed, split, epoch,
    index)`` (:mod:`metarl.rng`), distinct for every batch of a run and valid for any
    seed."""
    key = rng.fold(rng.seed_keys([seed]), _S_STREAM, split, epoch, index)
    return int(key[0])


class StreamBatches(torch.utils.data.Sampler):
    """The keys ``(epoch, 0..n-1)`` of one epoch's batches; ``fixed`` keeps epoch 0 (the
    held-out batches, the same at every validation)."""

    def __init__(self, n: int, fixed: bool = False):
        self.n, self.fixed, self.epoch = n, fixed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        epoch = 0 if self.fixed else self.epoch
        return iter([(epoch, i) for i in range(self.n)])


def make_loaders(cfg: DistillConfig, method, teacher):
    """``(train_loader, val_loader, train_points, val_points)``.

    A family whose ``data_kind`` is ``"points"`` (drift) gives a finite point set: the
    family's inputs and the teacher's targets on every point, a held-out share drawn with
    the seed, batches of each epoch in an order fixed by ``(seed, epoch)``. A ``"stream"``
    family (optim) draws every batch afresh (``method.batch``): ``grid.batches_per_epoch``
    per epoch and ``grid.val_batches`` held-out ones from a separate stream."""
    loader = torch.utils.data.DataLoader
    if method.data_kind == "stream":
        opts = cfg.grid
        per_batch = method.points_per_batch(teacher, cfg.batch_size)
        train = StreamData(method, teacher, opts, cfg.batch_size, cfg.seed, split=0)
        val = StreamData(method, teacher, opts, cfg.batch_size, cfg.seed, split=1)
        return (loader(train, batch_size=None, sampler=StreamBatches(opts.batches_per_epoch)),
                loader(val, batch_size=None, sampler=StreamBatches(opts.val_batches, True)),
                opts.batches_per_epoch * per_batch, opts.val_batches * per_batch)
    inputs = method.inputs(cfg.grid)
    target = method.targets(teacher, inputs)
    n = inputs[0].shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(cfg.holdout * n)))
    train_idx, val_idx = perm[n_val:].sort().values, perm[:n_val].sort().values
    data = PointData(*inputs, target)
    return (loader(data, batch_size=None,
                   sampler=EpochBatches(train_idx, cfg.batch_size, cfg.seed, True)),
            loader(data, batch_size=None, sampler=EpochBatches(val_idx, 65536, cfg.seed, False)),
            int(train_idx.numel()), int(val_idx.numel()))


# --------------------------------------------------------------------------- module


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        raise ImportError("metarl distill needs Lightning: pip install lightning") from None
    return pl


def make_module(cfg: DistillConfig, method, total_steps: int, loss_name: str):
    pl = _lightning()

    class Distiller(pl.LightningModule):
        """A student of the teacher's family, trained on the family's distillation loss."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(cfg.seed + 1)
            self.student = method.student(cfg.student, cfg.hidden, cfg.init_scale, g)
            self.train_sum = 0.0
            self.train_count = 0

        def loss(self, batch):
            return method.loss(self.student, batch, create_graph=self.training)

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            n = batch[0].shape[0]
            self.train_sum += float(loss.detach()) * n
            self.train_count += n
            self.log(f"train_{loss_name}", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log(f"val_{loss_name}", loss, prog_bar=True, reduce_fx="mean",
                     batch_size=batch[0].shape[0])
            return loss

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.student.parameters(), lr=cfg.lr_start)
            ratio = cfg.lr_end / cfg.lr_start
            span = max(total_steps - 1, 1)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: 1.0 + (ratio - 1.0) * min(step, span) / span)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Distiller()


def _callbacks(loss_name: str, run: RunDir, ckpt_dir: Path, clock):
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
            run.log(**{"epoch": trainer.current_epoch, "step": trainer.global_step,
                        f"train_{loss_name}": module.train_sum / max(module.train_count, 1),
                        f"val_{loss_name}": float(m[f"val_{loss_name}"]),
                        "lr": trainer.optimizers[0].param_groups[0]["lr"],
                        "wall_time": clock()})
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
    teacher_art, method, teacher = load_teacher(cfg.teacher)
    cfg = _fill(cfg, method, teacher)
    loss_name, loss_label = method.loss_name_for(teacher)
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
    loader, val_loader, train_points, val_points = make_loaders(cfg, method, teacher)
    total_steps = len(loader) * cfg.epochs
    module = make_module(cfg, method, total_steps, loss_name)
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
        callbacks=_callbacks(loss_name, run, ckpt_dir, lambda: prior + time.time() - t0),
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
    train_key, val_key = f"train_{loss_name}", f"val_{loss_name}"
    ref_key = f"{val_key}_of_{method.reference_name}"
    student = module.student
    params = student.flat_params()
    reference = method.reference(cfg.student, cfg.hidden)  # the score of not imitating
    ref_loss = _mean_over(val_loader, lambda b: method.loss(reference, b))
    prov = {"method": "distill", "teacher": teacher_art.name,
            "teacher_provenance": teacher_art.provenance, "env_steps": 0,
            "meta_train_envs": teacher_art.provenance.get("meta_train_envs", []),
            "wall_time": round(wall, 1), "seed": cfg.seed,
            "settings": {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items()
                         if k != "teacher"},
            val_key: final.get(val_key)}
    kind = "" if student.name == teacher.name else f"-{student.name}"
    name = f"{teacher_art.name}-distill{kind}-h{cfg.hidden}"
    path = art_mod.save(art_mod.network_artifact(student.name, params, prov,
                                                 name=name, hidden=cfg.hidden),
                        run_path / "student.pt")
    results = {"teacher": teacher_art.name, "hidden": cfg.hidden,
               "student_params": int(params.numel()), "epochs": cfg.epochs,
               "steps": trainer.global_step, "train_points": train_points,
               "val_points": val_points, "student": student.name,
               train_key: final.get(train_key), val_key: final.get(val_key),
               ref_key: ref_loss, "env_steps": 0, "wall_time_s": wall,
               "artifact": str(path)}
    run.write_results(results)
    run.write_summary(
        f"# Distillation of {teacher_art.name} into {student.name} width {cfg.hidden}\n\n"
        f"{cfg.epochs} epochs, {trainer.global_step} steps, {wall:.1f} s, 0 environment "
        f"steps.\n\n| | {loss_label} |\n|---|---:|\n"
        f"| student, train points | {results[train_key]:.4g} |\n"
        f"| student, held-out points | {results[val_key]:.4g} |\n"
        f"| {method.reference_label}, held-out | {ref_loss:.4g} |\n\nartifact: `{path}`\n")
    run.close()
    write_json_atomic(run_path / "teacher.json", {"name": teacher_art.name,
                                                  "provenance": teacher_art.provenance})
    log(f"student width {cfg.hidden}: held-out {loss_label} {results[val_key]:.4g} "
        f"({method.reference_short}'s: {ref_loss:.4g}); artifact {path}")
    return results


def _mean_over(loader, fn) -> float:
    total, count = 0.0, 0
    for batch in loader:
        total += float(fn(batch).detach()) * batch[0].shape[0]
        count += batch[0].shape[0]
    return total / max(count, 1)
