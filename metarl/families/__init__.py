"""Families: one per slot of the RL pipeline, each behind :class:`~metarl.families.base.Family`.

- ``drift``: PPO's policy objective (members ``ppo-clip``, ``dpo``, learned ``lpo``);
- ``optim``: the agent optimiser (members ``adam``, ``sgd``, learned ``open``,
  ``open-ff``, ``no-features``).

Every algorithm name is unique across families, so a name alone says which slot it fills:
:func:`family_of` finds it, :func:`make_member` builds it. Wherever an algorithm is
accepted, it fills its own family's slot and every other slot keeps its family's
handcrafted ``default`` (PPO clip, Adam).
"""

from __future__ import annotations

from metarl.families.base import Family, Member, unknown_member_message
from metarl.families.drift import FAMILY as DRIFT
from metarl.families.optim import FAMILY as OPTIM

FAMILIES: dict[str, Family] = {DRIFT.name: DRIFT, OPTIM.name: OPTIM}


def get_family(name: str) -> Family:
    """A family by name (``drift``, ``optim``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def all_members() -> dict[str, Family]:
    """Every algorithm name -> its family."""
    return {n: fam for fam in FAMILIES.values() for n in fam.members}


def family_of(name: str) -> Family:
    """The family whose slot the algorithm ``name`` fills."""
    names = all_members()
    if name not in names:
        raise ValueError(unknown_member_message(name))
    return names[name]


def make_member(name: str, **options) -> Member:
    """An algorithm by name, from whichever family has it."""
    return family_of(name).make(name, **options)


def learned_names() -> list[str]:
    return [n for fam in FAMILIES.values() for n in fam.learned]


__all__ = ["Family", "Member", "FAMILIES", "get_family", "family_of", "make_member",
           "all_members", "learned_names", "DRIFT", "OPTIM"]
