"""The parent's side of the sandbox transport: what one call returns, the shared region
and the pipes (see :mod:`metarl.sandbox.core` for the protocol)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CallResult"]


@dataclass(frozen=True)
class CallResult:
    """What one :meth:`Sandbox.call` returns: ``outputs``, the function's output(s), and
    ``grads``, input name -> d sum(outputs) / d input; float32 arrays of the inputs' shape."""

    outputs: tuple[np.ndarray, ...]
    grads: dict[str, np.ndarray]

    @property
    def output(self) -> np.ndarray:
        """The output of a function with one output."""
        if len(self.outputs) != 1:
            raise ValueError(f"the call has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]


# -- one sandbox ---------------------------------------------------------------------------



def _grow_pipe(fd: int, size: int) -> None:
    """Ask for a pipe buffer of ``size`` bytes (fewer wake-ups per large message); the kernel
    caps it at /proc/sys/fs/pipe-max-size for users without CAP_SYS_RESOURCE. Keeps the
    default (64 KiB) where it refuses."""
    for ask in (size, 1 << 18):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, ask)
            return
        except (OSError, AttributeError):
            continue


def _shared_region(size: int) -> int | None:
    """A new ``memfd`` of ``size`` bytes, sealed so that neither side can shrink or grow it
    (or change the seals): a mapping of it then never faults. None where memfds or seals are
    not available (the values then go over the pipes)."""
    try:
        fd = os.memfd_create("metarl-sandbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (OSError, AttributeError):
        return None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except (OSError, AttributeError):
        os.close(fd)
        return None
    return fd


def _as_float32(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.dtype != np.float32:
        raise TypeError(f"{name} must be numeric")
    return arr
