"""The drift family's synthetic data: inputs on which a teacher is imitated.

Distillation spends no environment samples: the student sees the teacher only on synthetic
inputs. For the drift family (LPO) these are the paper's grid over the probability ratio and
the advantage: ``A`` in ``[-8, 8)`` with step 1/64 and ``r = exp(k/256)`` for ``k`` in
``[-512, 512)``, about a million points (the grid of Lu et al. 2022's LPO distillation, which
Goldie et al. 2025 reuse). Symbolic regression uses a coarser grid over the same ranges.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from metarl.families.drift.members import Drift


@dataclass
class DriftGrid:
    """A grid over ``(log r, A)``: ``log r = k * log_ratio_step`` for integer ``k`` with
    ``log_ratio_min <= log r < log_ratio_max``, ``A = adv_min + j * adv_step < adv_max``."""

    log_ratio_min: float = -2.0
    log_ratio_max: float = 2.0
    log_ratio_step: float = 1 / 256
    adv_min: float = -8.0
    adv_max: float = 8.0
    adv_step: float = 1 / 64

    def check(self) -> None:
        values = asdict(self)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"grid values must be finite numbers; {', '.join(bad)} "
                             f"{'is' if len(bad) == 1 else 'are'} not: {values}")
        if not (self.log_ratio_min < self.log_ratio_max and self.adv_min < self.adv_max):
            raise ValueError(f"empty grid: need log_ratio_min < log_ratio_max and "
                             f"adv_min < adv_max, got {asdict(self)}")
        if self.log_ratio_step <= 0 or self.adv_step <= 0:
            raise ValueError(f"grid steps must be positive, got {asdict(self)}")
        n = self.shape[0] * self.shape[1]
        if n > 50_000_000:
            raise ValueError(f"the grid has {n:,} points; more than 50M does not fit "
                             f"comfortably in memory, use larger steps")

    @property
    def shape(self) -> tuple[int, int]:
        k0 = math.ceil(self.log_ratio_min / self.log_ratio_step - 1e-9)
        k1 = math.ceil(self.log_ratio_max / self.log_ratio_step - 1e-9)
        na = math.ceil((self.adv_max - self.adv_min) / self.adv_step - 1e-9)
        return k1 - k0, na

    def tensors(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ratio [N], advantage [N])``, ratio-major."""
        self.check()
        k0 = math.ceil(self.log_ratio_min / self.log_ratio_step - 1e-9)
        nr, na = self.shape
        log_r = (torch.arange(nr, dtype=torch.float64) + k0) * self.log_ratio_step
        adv = self.adv_min + torch.arange(na, dtype=torch.float64) * self.adv_step
        r, a = torch.meshgrid(torch.exp(log_r), adv, indexing="ij")
        return r.reshape(-1).to(dtype), a.reshape(-1).to(dtype)


def check_grid(grid, what: str) -> None:
    """Refuse (``ValueError``) data options that are not a valid :class:`DriftGrid`;
    ``what`` names the method whose data it is, for the message."""
    if not isinstance(grid, DriftGrid):
        raise ValueError(f"the drift family's {what} data is a DriftGrid, got "
                         f"{type(grid).__name__}")
    grid.check()


#: symbolic regression's default: the same ranges, 64 x 64 points (its cost grows with them)
SYMBOLIC_GRID = DriftGrid(log_ratio_step=1 / 16, adv_step=1 / 4)


def teacher_module(drift: Drift, params: torch.Tensor) -> Drift:
    """``drift`` with ``params`` loaded (a no-op for members without parameters)."""
    if drift.num_meta_params:
        drift.load_flat(params)
    return drift.eval().requires_grad_(False)


def drift_and_grad(drift: Drift, ratio: torch.Tensor, advantage: torch.Tensor,
                   clip_eps: float = 0.2, chunk: int = 262_144):
    """The drift and ``d drift / d ratio`` on the points, computed in chunks."""
    values, grads = [], []
    for i in range(0, ratio.numel(), chunk):
        r = ratio[i:i + chunk].clone().requires_grad_(True)
        with torch.enable_grad():
            d = drift(r, advantage[i:i + chunk], clip_eps)
            (g,) = torch.autograd.grad(d.sum(), r)
        values.append(d.detach())
        grads.append(g.detach())
    return torch.cat(values), torch.cat(grads)
