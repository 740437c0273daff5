"""Run untrusted source code of one function (an LLM's proposal) in a sandboxed child process.

A language model proposes the source of a function that fills one slot of the RL pipeline
(a family's signature). That code runs only in a child process; this process keeps the
environments, the agents, the returns and the fitness, and asks the child for nothing but
the function's outputs on named float32 tensors it sends, and the gradients of their sum
in the inputs it names. Nothing here knows a family: the families say what signature they
ask for, how they call it and what they check (e.g. :mod:`metarl.families.drift.proposal`).

Public API:

- :class:`SandboxLimits`: the child's limits (wall and CPU time, memory, processes, output,
  open files).
- :class:`ProposalError`: the proposal failed; ``reason`` is a short category (one of
  :data:`REASONS`) and ``message`` a text meant to be shown to the model that wrote the
  code.
- :class:`SandboxError`: the sandbox itself failed (not the proposal's fault).
- :class:`Sandbox`: one proposal in one child process. ``Sandbox(code, function, params,
  limits)``; ``call(inputs, constants, grad, outputs) -> CallResult`` (``outputs``,
  ``grads``).

docs/sandbox.md says what the isolation does and what it does not protect against.

Modules: :mod:`~metarl.sandbox.core` (the parent's side of one sandbox),
:mod:`~metarl.sandbox.transport` (its call results, shared region and pipes),
:mod:`~metarl.sandbox.forkserver` (the parent's side of the fork server),
``child.py`` (the fork server and the workers; it imports nothing from metarl),
``isolation.py`` (how a worker isolates itself) and ``audit.py`` (the workers' audit
hook), both loaded by ``child.py`` by path.
"""

from metarl.sandbox.base import REASONS, ProposalError, SandboxError, SandboxLimits
from metarl.sandbox.core import CallResult, Sandbox

__all__ = ["Sandbox", "CallResult", "SandboxLimits", "ProposalError", "SandboxError",
           "REASONS"]
