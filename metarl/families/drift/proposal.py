"""The drift family's side of LLM proposal: what the model is asked for, how its code is
called in the sandbox, and what it must pass before training.

- :data:`PROPOSAL` (a :class:`DriftProposal`): the signature
  ``drift(ratio, advantage, clip_eps)``, a docstring that describes every input, the
  constraints, a worked example of an answer and the warm start (PPO's clip written as a
  drift); registered as the drift family's ``methods["proposal"]``.
- :class:`DriftSandbox`: a :class:`~metarl.sandbox.Sandbox` with the drift signature;
  :meth:`DriftSandbox.drift` gives ``(drift, d drift / d ratio)`` as numpy arrays.
- :class:`SandboxedDrift`: a :class:`~metarl.families.drift.members.Drift` backed by a
  started sandbox, for the inner loop; :func:`sandboxed_drift` starts one from source.
- :func:`validate_drift`: the checks a proposal must pass before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarl.families.drift.members import Drift
from metarl.sandbox import ProposalError, Sandbox, SandboxLimits

__all__ = ["DRIFT_PARAMS", "PROPOSAL", "DriftProposal", "DriftSandbox", "SandboxedDrift",
           "call_drift", "sandboxed_drift", "validate_drift"]

#: the drift signature's parameters, in order: two float32 tensors and one float constant
DRIFT_PARAMS = ("ratio", "advantage", "clip_eps")

# -- the sandbox with the drift signature --------------------------------------------------


def call_drift(sandbox: Sandbox, ratio, advantage, clip_eps: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """``drift(ratio, advantage, clip_eps)`` and its derivative in ``ratio``, computed by the
    proposal in ``sandbox``. ``ratio`` and ``advantage``: arrays or tensors of one shape
    (any), sent as float32. Returns two float32 arrays of that shape. Raises
    :class:`ProposalError`."""
    res = sandbox.call({"ratio": ratio, "advantage": advantage},
                       {"clip_eps": float(clip_eps)}, grad=("ratio",))
    return res.output, res.grads["ratio"]


class DriftSandbox(Sandbox):
    """A :class:`~metarl.sandbox.Sandbox` whose proposal must define
    ``drift(ratio, advantage, clip_eps)``::

        with DriftSandbox(code, limits) as box:
            drift, grad = box.drift(ratio, advantage, 0.2)
    """

    def __init__(self, code: str, limits: SandboxLimits | None = None):
        super().__init__(code, "drift", DRIFT_PARAMS, limits)

    def drift(self, ratio, advantage, clip_eps: float) -> tuple[np.ndarray, np.ndarray]:
        """See :func:`call_drift`."""
        return call_drift(self, ratio, advantage, clip_eps)


# -- the drift member ----------------------------------------------------------------------


class _SandboxFunction(torch.autograd.Function):
    """drift from the child in forward; grad_output * (d drift / d ratio) in backward."""

    @staticmethod
    def forward(ctx, ratio, advantage, clip_eps, sandbox):
        if ctx.needs_input_grad[1]:
            raise RuntimeError("SandboxedDrift gives no gradient in the advantage; detach it")
        drift, grad = call_drift(sandbox, ratio, advantage, clip_eps)
        out = torch.from_numpy(drift).to(device=ratio.device, dtype=ratio.dtype)
        ctx.save_for_backward(torch.from_numpy(grad).to(device=ratio.device,
                                                        dtype=ratio.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None


class SandboxedDrift(Drift):
    """A drift whose values come from a started sandbox with the drift signature (a
    :class:`DriftSandbox`).

    It has no parameters, so the inner loop calls it on the whole population's
    ``[P, B]`` tensors at once (one request to the child per minibatch). The gradient in
    ``ratio`` is the child's elementwise derivative; :func:`validate_drift` checks that the
    proposal is elementwise. Raises :class:`ProposalError` from a failing proposal.
    """

    compilable = False  # every call goes to the sandbox's child process

    name = "code"

    def __init__(self, sandbox: Sandbox):
        super().__init__()
        if not isinstance(sandbox, Sandbox) or sandbox.params != DRIFT_PARAMS:
            raise TypeError(f"SandboxedDrift needs a DriftSandbox (a Sandbox with parameters "
                            f"{DRIFT_PARAMS}), got {sandbox!r}")
        if not sandbox.running:
            raise ValueError("SandboxedDrift needs a started sandbox: call sandbox.start() or "
                             "use it as a context manager first")
        self.sandbox = sandbox

    def close(self) -> None:
        """Stop the sandboxed child (also done when the sandbox is garbage-collected)."""
        self.sandbox.close()

    def forward(self, ratio, advantage, clip_eps=0.2):
        return _SandboxFunction.apply(ratio, advantage, float(clip_eps), self.sandbox)


def sandboxed_drift(source: str, limits: SandboxLimits | None = None) -> SandboxedDrift:
    """A :class:`SandboxedDrift` running ``source`` in a freshly started sandbox (not
    validated). Raises :class:`ProposalError` if the source does not load. Close it with
    ``member.close()`` when done (it is also closed when garbage-collected)."""
    return SandboxedDrift(DriftSandbox(source, limits).start())


# -- validation ----------------------------------------------------------------------------


def validate_drift(fn, seed: int = 0) -> None:
    """Check a proposed drift before any training; raises :class:`ProposalError`.

    ``fn(ratio, advantage, clip_eps) -> (drift, grad)`` with numpy arrays, for example
    :meth:`DriftSandbox.drift`. The checks, in order:

    1. random inputs of shape (10,) (ratio ~ N(1, 0.1^2) clipped above 0.01, advantage ~
       N(0, 1), clip_eps 0.2) give drift and grad of shape (10,) ("shape");
    2. no NaN or infinity there nor on the grid below ("nan");
    3. on the grid ratio in exp(linspace(-2, 2, 41)) x advantage in linspace(-8, 8, 33),
       drift >= -1e-6 ("constraint": non-negative);
    4. at ratio = 1, |drift| <= 1e-5 ("constraint": zero at r = 1) and |d drift / d ratio|
       <= 1e-4 ("constraint": flat at r = 1);
    5. each value depends only on its own ratio and advantage: the grid evaluated in two
       halves gives the same numbers ("constraint": elementwise).
    """
    rng = np.random.default_rng(seed)
    eps = 0.2
    ratio = np.clip(rng.normal(1.0, 0.1, 10), 0.0101, None).astype(np.float32)
    adv = rng.normal(0.0, 1.0, 10).astype(np.float32)
    drift, grad = _checked_call(fn, ratio, adv, eps, "random inputs")

    log_r = np.linspace(-2.0, 2.0, 41)
    log_r[20] = 0.0
    r_grid, a_grid = np.meshgrid(np.exp(log_r).astype(np.float32),
                                 np.linspace(-8.0, 8.0, 33).astype(np.float32), indexing="ij")
    r_flat, a_flat = r_grid.reshape(-1), a_grid.reshape(-1)
    drift, grad = _checked_call(fn, r_flat, a_flat, eps, "the grid")
    bad = drift < -1e-6
    if bad.any():
        i = int(np.argmin(drift))
        raise ProposalError(
            "constraint",
            f"non-negative: drift must be >= 0 everywhere, but it is negative at "
            f"{int(bad.sum())} of {drift.size} grid points (ratio in [0.14, 7.4], advantage "
            f"in [-8, 8], clip_eps 0.2); the lowest is drift({r_flat[i]:.4g}, "
            f"{a_flat[i]:.4g}) = {drift[i]:.4g}. Wrap it in relu() or square it.",
        )

    ones = np.ones(33, np.float32)
    a_line = np.linspace(-8.0, 8.0, 33).astype(np.float32)
    d1, g1 = _checked_call(fn, ones, a_line, eps, "ratio = 1")
    i = int(np.argmax(np.abs(d1)))
    if abs(d1[i]) > 1e-5:
        raise ProposalError(
            "constraint",
            f"zero at r = 1: drift must be 0 when ratio == 1, but drift(1, {a_line[i]:.4g}) "
            f"= {d1[i]:.4g}",
        )
    i = int(np.argmax(np.abs(g1)))
    if abs(g1[i]) > 1e-4:
        raise ProposalError(
            "constraint",
            f"flat at r = 1: the derivative of drift in ratio must be 0 at ratio == 1, but at "
            f"advantage {a_line[i]:.4g} it is {g1[i]:.4g}",
        )

    half = r_flat.size // 2
    d_lo, _ = _checked_call(fn, r_flat[:half], a_flat[:half], eps, "half of the grid")
    d_hi, _ = _checked_call(fn, r_flat[half:], a_flat[half:], eps, "half of the grid")
    parts = np.concatenate([d_lo, d_hi])
    tol = 1e-5 + 1e-5 * np.abs(drift)
    if (np.abs(parts - drift) > tol).any():
        i = int(np.argmax(np.abs(parts - drift) - tol))
        raise ProposalError(
            "constraint",
            f"elementwise: each drift value must depend only on its own ratio and advantage, "
            f"but drift({r_flat[i]:.4g}, {a_flat[i]:.4g}) changed from {drift[i]:.6g} to "
            f"{parts[i]:.6g} when the batch changed (no means, sums or sorting over the batch)",
        )


def _checked_call(fn, ratio, adv, eps, what):
    out = fn(ratio, adv, eps)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ProposalError("shape", f"on {what}, the drift evaluation did not give "
                                     f"(drift, grad)")
    drift, grad = (np.asarray(x, dtype=np.float64) for x in out)
    for name, x in (("drift", drift), ("its derivative in ratio", grad)):
        if x.shape != ratio.shape:
            raise ProposalError("shape", f"on {what} of shape {ratio.shape}, {name} has shape "
                                         f"{x.shape}; it must have the shape of ratio")
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.argmax(bad))
            raise ProposalError(
                "nan",
                f"{name} is NaN or infinite at {int(bad.sum())} of {x.size} points of {what}, "
                f"e.g. ratio={ratio.reshape(-1)[i]:.4g}, advantage={adv.reshape(-1)[i]:.4g} "
                f"(guard log/division/exp against small or large values)",
            )
    return drift, grad


# -- what the model is asked for -----------------------------------------------------------


@dataclass(frozen=True)
class DriftProposal:
    """What :mod:`metarl.meta.propose` needs from the drift family: the prompt's content
    (``slot``, ``function``, ``signature``, ``docstring``, ``constraints``, ``example``, the
    warm start) and :meth:`build`, which turns proposed source into a validated member."""

    slot: str
    function: str
    signature: str
    docstring: str
    constraints: str
    example: dict
    warm_start_name: str
    warm_start_code: str

    def build(self, code: str, limits: SandboxLimits | None = None) -> SandboxedDrift:
        """Load ``code`` in a sandbox, check it with :func:`validate_drift` and return the
        member, for the inner loop; the caller closes it (``member.close()``). Raises
        :class:`ProposalError` (the sandbox is then closed)."""
        member = sandboxed_drift(code, limits)
        try:
            validate_drift(member.sandbox.drift)
        except BaseException:
            member.close()
            raise
        return member


PROPOSAL = DriftProposal(
    slot="drift",
    function="drift",
    signature="def drift(ratio: torch.Tensor, advantage: torch.Tensor, "
              "clip_eps: float) -> torch.Tensor:",
    docstring="""The drift of Mirror Learning, which PPO's clipped objective is an instance of.

    The policy is trained to maximise mean(ratio * advantage - drift), so the drift is a
    penalty on moving the policy.

    ratio: pi_new(a|s) / pi_old(a|s) for each sample, a positive float32 tensor (any
        shape; typically between 0.1 and 10, most samples near 1).
    advantage: the GAE advantage of each sample, normalised per minibatch to mean 0 and
        standard deviation 1; same shape as ratio.
    clip_eps: PPO's clip range epsilon, a float (0.2).
    returns: the drift of each sample, same shape as ratio.
    """,
    constraints="""- The result has the shape of `ratio` and is computed elementwise (no reductions
  over the batch), with no NaN or infinity for any positive ratio and any advantage.
- The drift is non-negative everywhere: drift >= 0.
- At ratio == 1 the drift is 0 and its derivative with respect to ratio is 0.
- It must be differentiable with torch autograd (no .item(), numpy or in-place tricks).
- The agent learning rate is set per environment (tuned for PPO) and annealed linearly
  to 0; each environment's fitness is the final return on a scale where a random policy
  scores 0 and PPO scores 1.""",
    example={"thought": "A squared penalty on the log-ratio, stronger where the advantage "
                        "pushes the policy further, keeps the update small and is flat at 1.",
             "name": "weighted_log_ratio_penalty",
             "code": "def drift(ratio, advantage, clip_eps):\n"
                     "    log_r = torch.log(ratio)\n"
                     "    return 0.5 * advantage.abs() * log_r ** 2\n"},
    warm_start_name="PPO's clipped objective written as a drift",
    warm_start_code="def drift(ratio, advantage, clip_eps):\n"
                    "    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)\n"
                    "    return torch.relu((ratio - clipped) * advantage)\n",
)
