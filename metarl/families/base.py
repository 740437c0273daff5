"""The family interface: what every meta-learning method may know about a slot.

A *family* is one slot of the RL pipeline (``drift``: PPO's policy objective; ``optim``:
the agent optimiser) with one call signature over plain tensors. Its *members* are the
algorithms that fill the slot, handcrafted (PPO clip, DPO, Adam, SGD) or learned (LPO,
OPEN, ...), all :class:`Member` modules whose meta-parameters are one flat vector.

The methods (``evolve``, ``distill``, ``symbolic``, ``propose``), the artifact format,
``evaluate``, ``train`` and the CLI use only this interface, so a new family is one new
folder under ``metarl/families/`` and no method changes. A :class:`Family` provides:

- ``members``: name -> constructor, which of them are ``learned``, and how a learned
  member's meta-parameters start for evolution (:meth:`Family.initial_params`);
- ``score``: fitness of a population of members, trained by the inner loop in this
  family's slot with every other slot on its handcrafted default (PPO clip, Adam);
- ``distillation``, ``symbolic`` and ``proposal``: what those methods need (synthetic
  data and targets; symbolic inputs and constraints; the LLM's signature, prompt and
  validation), or ``None`` with the reason in ``refusals``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: the fitness of a member whose training failed (NaN, or invalid proposed code): the
#: paper's -10000, far below any reference-normalised or raw return here
FAILED_FITNESS = -10_000.0


class Member(nn.Module):
    """Base class of every family member: an ``nn.Module`` whose parameters (the
    meta-parameters, empty for handcrafted members) are addressed as one flat vector."""

    #: the name the member is addressed by (``ppo-clip``, ``lpo``, ``adam``, ``open-ff``)
    name: str = "member"
    #: the family (slot) this member fills
    family: str = ""
    #: whether its computation can be traced by ``torch.compile`` (``PPOConfig.compile``);
    #: members that call out of the process (a sandboxed proposal) say False
    compilable: bool = True

    def compile_key(self):
        """Members with equal keys compute the same function of (meta-parameters,
        inputs), so a compiled function built with one serves the others
        (:mod:`metarl.inner.compiled`). By default a member is only equal to itself;
        members whose computation is fixed by their class and shapes say so."""
        return self

    @property
    def num_meta_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flat_params(self) -> torch.Tensor:
        """This member's parameters as one vector ``[n_params]`` (empty if handcrafted)."""
        ps = [p.detach().reshape(-1) for p in self.parameters()]
        return torch.cat(ps) if ps else torch.zeros(0)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., n_params]`` -> ``{name: [..., *shape]}`` (views)."""
        out, i = {}, 0
        lead = flat.shape[:-1]
        for name, p in self.named_parameters():
            out[name] = flat[..., i:i + p.numel()].reshape(*lead, *p.shape)
            i += p.numel()
        return out

    def initial_params(self, seed: int = 0) -> torch.Tensor:
        """The meta-parameters ``[n]`` evolution starts from: by default this module's own
        (zeros for LPO, which is PPO; empty for handcrafted members). Members whose start
        is random override it with a seeded draw."""
        return self.flat_params()

    def check_config(self, config) -> None:
        """Refuse an inner-loop configuration this member cannot train with, before any
        work starts (a ``ValueError`` saying what to change). Most members accept any."""

    def load_flat(self, flat: torch.Tensor) -> Member:
        """Copy a flat vector ``[n_params]`` into this module's parameters."""
        with torch.no_grad():
            for name, t in self.unflatten(flat).items():
                self.get_parameter(name).copy_(t)
        return self


@dataclass
class Family:
    """One slot of the RL pipeline and everything the methods need to know about it."""

    name: str
    #: what the slot is, in the paper's words
    slot: str
    #: member name -> constructor (keyword arguments: the member's options, e.g. ``hidden``)
    members: dict[str, Callable[..., Member]]
    #: the names of the learned members (the others are handcrafted)
    learned: tuple[str, ...]
    #: the handcrafted member that fills this slot while another family's is learned
    default: str
    #: how a learned member's meta-parameters start for evolution, in words (for docs/CLI)
    init_doc: str = ""
    #: method -> object the method uses (``distillation``, ``symbolic``, ``proposal``)
    methods: dict[str, Any] = field(default_factory=dict)
    #: method -> why this family does not support it
    refusals: dict[str, str] = field(default_factory=dict)
    #: the member an artifact of a representation kind becomes: kind -> builder. Every
    #: family has ``network`` (the member by name, at the artifact's ``hidden`` width if
    #: given) and ``handcrafted`` (the member by name); others (``symbolic``, ``code``) are
    #: the family's own.
    builders: dict[str, Callable[..., Member]] = field(default_factory=dict)

    def __post_init__(self):
        self.builders = {"network": self._network, "handcrafted": self._by_name,
                         **self.builders}

    def _by_name(self, rep: dict) -> Member:
        return self.make(rep["member"])

    def _network(self, rep: dict) -> Member:
        options = {"hidden": int(rep["hidden"])} if "hidden" in rep else {}
        return self.make(rep["member"], **options)

    # -- members ----------------------------------------------------------------------------

    def make(self, name: str, **options) -> Member:
        """A member by name, with its options (``hidden=...``)."""
        if name not in self.members:
            raise ValueError(unknown_member_message(name, self))
        return self.members[name](**options)

    def is_learned(self, name: str) -> bool:
        return name in self.learned

    def initial_params(self, name: str, seed: int = 0) -> torch.Tensor:
        """The meta-parameters ``[n]`` evolution starts from (see ``init_doc``)."""
        return self.make(name).initial_params(seed)

    # -- methods ----------------------------------------------------------------------------

    def method(self, method: str):
        """What ``method`` needs from this family, or a ``ValueError`` with the reason."""
        if method in self.methods:
            return self.methods[method]
        reason = self.refusals.get(method, "not built for this family yet")
        raise ValueError(f"{method} is not available for the {self.name} family: {reason}")

    def score(self, configs: dict, member: Member, meta_params: torch.Tensor,
              seeds) -> tuple[torch.Tensor, dict]:
        """Fitness ``[P]`` of a population of this family's members.

        Each member trains in this family's slot (every other slot on its handcrafted
        default) on every environment of ``configs`` (env id -> inner configuration).
        Fitness is the final return; over several environments, each is normalised
        (:func:`metarl.configs.normalized_return`: random policy 0, the environment's PPO
        reference return 1, so higher is better for negative returns too) and the results
        are averaged. Failed members have NaN fitness. ``info`` holds the per-environment
        raw and normalised returns and the environment steps spent.
        """
        from metarl.configs import normalized_return
        from metarl.inner.ppo import train

        per_env, raw, steps = {}, {}, 0
        for env_id, c in configs.items():
            res = train(c, member, meta_params, seeds)
            steps += res.env_steps
            raw[env_id] = r = res.final_return.double()
            if len(configs) > 1:
                r = normalized_return(r, c)
            per_env[env_id] = r
        fitness = torch.stack(list(per_env.values())).mean(dim=0)
        return fitness, {"per_env": per_env, "raw": raw, "env_steps": steps}


def unknown_member_message(name: str, family: Family | None = None) -> str:
    """A clear message for an unknown algorithm name, with the closest known names."""
    from metarl.families import FAMILIES

    pool = family.members if family is not None else {
        n: f for fam in FAMILIES.values() for n, f in fam.members.items()}
    close = difflib.get_close_matches(name, pool, n=3)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f"the {family.name} family" if family is not None else "any family"
    known = "; ".join(f"{fam.name}: {', '.join(fam.members)}" for fam in FAMILIES.values()
                      if family is None or fam is family)
    return (f"unknown algorithm {name!r} in {where} (known: {known}), and no artifact file "
            f"of that name.{hint}")
