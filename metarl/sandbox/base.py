"""The sandbox's limits and errors (see :mod:`metarl.sandbox`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["REASONS", "ProposalError", "SandboxError", "SandboxLimits"]

_MESSAGE_CHARS = 2000  # an error message's length, at most

#: The categories of :attr:`ProposalError.reason`. ``nan``, ``shape`` and ``constraint``
#: are also what a family's validation of a proposal raises.
REASONS = ("syntax", "signature", "runtime", "timeout", "memory", "cpu", "output", "died",
           "nan", "shape", "constraint", "forbidden", "protocol")


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed child may use.

    - ``wall_s``: the child's whole life, in seconds (enforced by the parent).
    - ``call_timeout_s``: one request (one evaluation of the proposed function).
    - ``start_timeout_s``: loading the proposal: compiling it and running its top-level
      code. The child's own set-up before that (fork, isolation) is bounded by
      ``max(start_timeout_s, 30)`` and the fork server's one-time start (importing torch)
      by ``max(start_timeout_s, 60)``.
    - ``cpu_s``: CPU seconds (``RLIMIT_CPU``; SIGXCPU at the limit, SIGKILL 5 s later).
    - ``memory_mb``: address space (``RLIMIT_AS``), including the ~1.1 GB that torch maps.
    - ``nproc``: processes and threads of the sandbox's user (``RLIMIT_NPROC``).
    - ``output_bytes``: stdout plus stderr; more and the child is killed.
    - ``open_files``: file descriptors (``RLIMIT_NOFILE``).
    """

    wall_s: float = 1800.0
    call_timeout_s: float = 60.0
    start_timeout_s: float = 60.0
    cpu_s: int = 1800
    memory_mb: int = 4096
    nproc: int = 64
    output_bytes: int = 1_000_000
    open_files: int = 256

    def __post_init__(self):
        for name in ("wall_s", "call_timeout_s", "start_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"SandboxLimits.{name} must be a positive number of seconds, "
                                 f"got {v!r}")
        minimum = {"cpu_s": 1, "memory_mb": 512, "nproc": 1, "output_bytes": 1024,
                   "open_files": 16}
        for name, low in minimum.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"SandboxLimits.{name} must be an integer >= {low}, "
                                 f"got {v!r}")


class ProposalError(Exception):
    """The proposed code failed: it does not compile, has the wrong signature or output
    shape, raised, ran out of time or memory, did something forbidden, or broke one of its
    family's constraints.

    ``reason`` is one of :data:`REASONS`; ``message`` says what happened in words meant for
    the model that wrote the code (with the end of the child's traceback when there is one);
    ``output`` is the end of what the child printed (at most a few KB).
    """

    def __init__(self, reason: str, message: str, output: str = ""):
        if reason not in REASONS:
            reason = "runtime"
        message = _clip(str(message), _MESSAGE_CHARS)
        super().__init__(message)
        self.reason, self.message, self.output = reason, message, output

    def __str__(self):
        return f"[{self.reason}] {self.message}"


class SandboxError(RuntimeError):
    """The sandbox machinery failed (the fork server did not start, a pipe broke while no
    proposal code could have run): not something the proposal can be blamed for."""


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: its first line, then as much of its end."""
    if len(text) <= limit:
        return text
    head = text.split("\n", 1)[0][: limit // 4]
    return head + "\n[...]\n" + text[-(limit - len(head) - 7):]
