"""Artifacts: a learned algorithm on disk, with where it came from.

Every meta-learning method writes one, every evaluation reads one. An artifact holds

- ``family``: the slot it fills (``drift``: PPO's objective; ``optim``: the agent
  optimiser; see :mod:`metarl.families`),
- ``representation``: how the algorithm is written down. ``{"kind": "network", "member":
  "lpo", "params": Tensor[n], ...}`` for a network (``open``, ``open-ff``, ``no-features``
  for the optimisers); ``{"kind": "handcrafted", "member":
  "ppo-clip"}`` for a handcrafted member, ``{"kind": "symbolic", "member": "symbolic",
  "tree": [...], "inputs": [...]}`` for a formula (:mod:`metarl.expression`;
  a tree of allowed operators, never evaluated text), ``{"kind": "code", "member": "code",
  "source": "...", "function": "drift"}`` for Python source proposed by a model (untrusted:
  :meth:`Artifact.build` runs it only in a sandboxed child process),
- ``provenance``: the method and its settings, meta-training environments, environment
  steps and wall time spent finding it, seed, metarl version, creation time.

Files are ``torch.save`` dictionaries read back with ``weights_only=True`` (no code runs on
load). Every member of every family is addressable by name (``ppo-clip``, ``dpo``,
``lpo``, ``adam``, ``sgd``, ``open``, ``open-ff``, ``no-features``) wherever an artifact is
accepted; a learned member by name has its family's initial meta-parameters (zeros for
LPO, which is PPO; the seed-0 default initialisation for the optimisers). Each family
turns a representation into its member (:attr:`metarl.families.base.Family.builders`), so
this module knows no family by name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarl import __version__
from metarl.families import all_members, get_family
from metarl.families.base import Member

FORMAT = "metarl-artifact"
FORMAT_VERSION = 1
KINDS = ("network", "handcrafted", "symbolic", "code")


@dataclass
class Artifact:
    family: str
    representation: dict
    provenance: dict = field(default_factory=dict)
    name: str = ""

    @property
    def kind(self) -> str:
        return self.representation["kind"]

    def build(self) -> tuple[Member, torch.Tensor]:
        """The family member and its meta-parameters ``[n]``, ready for the inner loop.

        A ``code`` artifact's member runs its source in a sandboxed child process; close
        it (``member.close()``) when done, or it is closed when garbage-collected."""
        family = get_family(self.family)
        builder = family.builders.get(self.kind)
        if builder is None:
            raise ValueError(f"artifact {self.name!r}: the {family.name} family has no "
                             f"{self.kind} representation (it has "
                             f"{', '.join(family.builders)})")
        member = builder(self.representation)
        if self.kind == "handcrafted":
            return member, family.initial_params(self.representation["member"], 0)
        if self.kind == "network":
            params = torch.as_tensor(self.representation["params"], dtype=torch.float32)
            if params.shape != (member.num_meta_params,):
                raise ValueError(
                    f"artifact {self.name!r}: {self.representation['member']} expects "
                    f"{member.num_meta_params} parameters, the file has {tuple(params.shape)}"
                )
            return member, params
        return member, member.flat_params()

    def check_config(self, config) -> None:
        """Refuse a configuration the algorithm cannot train with (e.g. ``sgd`` without a
        learning rate for the environment) without building it (no sandbox starts)."""
        family = get_family(self.family)
        name = self.representation.get("member")
        if name in family.members and self.kind in ("network", "handcrafted"):
            options = {"hidden": int(self.representation["hidden"])} \
                if "hidden" in self.representation else {}
            family.make(name, **options).check_config(config)

    def describe(self) -> str:
        rep = self.representation
        lines = [f"artifact: {self.name}", f"family: {self.family}",
                 f"representation: {rep['kind']} ({rep.get('member', '')})"]
        if rep["kind"] == "handcrafted" and get_family(self.family).is_learned(rep["member"]):
            lines.append(f"(a learned member by name: its family's initial meta-parameters, "
                         f"{get_family(self.family).init_doc})")
        if rep["kind"] == "network":
            p = torch.as_tensor(rep["params"])
            if "hidden" in rep:
                lines.append(f"hidden width: {rep['hidden']}")
            lines.append(f"parameters: {p.numel()} (norm {float(p.norm()):.4g}, "
                         f"max |w| {float(p.abs().max()) if p.numel() else 0:.4g})")
        if rep["kind"] == "symbolic":
            from metarl.expression import size

            member = get_family(self.family).builders["symbolic"](rep)
            lines += [f"size: {size(rep['tree'])} nodes", f"formula: {member.formula()}",
                      "python source:", *("    " + ln for ln in member.source().splitlines())]
        if rep["kind"] == "code":
            lines += ["python source (untrusted; runs only in the sandbox):",
                      *("    " + ln for ln in rep["source"].rstrip().splitlines())]
        if self.provenance:
            lines.append("provenance:")
            for k, v in self.provenance.items():
                lines.append(f"  {k}: {v}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": self.family,
                "name": self.name, "representation": self.representation,
                "provenance": self.provenance}


def _provenance(provenance: dict) -> dict:
    return {"metarl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance}


def network_artifact(member: str, params: torch.Tensor, provenance: dict,
                     name: str = "", hidden: int | None = None) -> Artifact:
    """A learned network (``lpo``, ``open``, ``open-ff``, ``no-features``): its family is
    the member's."""
    family = all_members().get(member)
    if family is None:
        raise ValueError(f"unknown member {member!r} for a network artifact; known: "
                         f"{', '.join(all_members())}")
    rep = {"kind": "network", "member": member,
           "params": params.detach().cpu().float().clone()}
    if hidden is not None:
        rep["hidden"] = int(hidden)
    return Artifact(family.name, rep, _provenance(provenance), name or member)


def symbolic_artifact(tree, provenance: dict, name: str = "symbolic",
                      family: str = "drift", inputs=None) -> Artifact:
    """An algorithm written as a formula over the family's symbolic inputs (checked, by
    building its member, before it is kept)."""
    rep = {"kind": "symbolic", "member": "symbolic", "tree": tree}
    if inputs is not None:
        rep["inputs"] = list(inputs)
    fam = get_family(family)
    member = fam.builders["symbolic"](rep)
    rep["inputs"] = list(getattr(member, "inputs", inputs) or [])
    return Artifact(fam.name, rep, _provenance(provenance), name)


def code_artifact(source: str, function: str, provenance: dict, name: str = "code",
                  family: str = "drift") -> Artifact:
    """An algorithm written as Python source (an LLM proposal). Loading it runs nothing."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("a code artifact needs non-empty Python source")
    return Artifact(get_family(family).name,
                    {"kind": "code", "member": "code", "source": source,
                     "function": function}, _provenance(provenance), name)


def default_data(teacher: str, method: str):
    """The default synthetic-data options of ``method`` (``distillation``, ``symbolic``)
    for the family of the artifact ``teacher``, or None when it cannot be read or its
    family has no such method (the method's run then says why)."""
    try:
        return get_family(load(teacher).family).method(method).default_data()
    except (ValueError, OSError):
        return None


def save(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write ``artifact`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    d = artifact.to_dict()
    # Provenance holds plain values only, so that loading with weights_only=True works.
    d["provenance"] = json.loads(json.dumps(d["provenance"], default=str))
    torch.save(d, tmp)
    os.replace(tmp, path)
    return path


def load(path_or_name: str | os.PathLike) -> Artifact:
    """An artifact from a file, or a handcrafted member by name."""
    key = str(path_or_name)
    names = all_members()
    if key in names and not Path(key).exists():
        return Artifact(names[key].name, {"kind": "handcrafted", "member": key},
                        {"method": "handcrafted"}, key)
    path = Path(key)
    if not path.exists():
        from metarl.families.base import unknown_member_message

        raise FileNotFoundError(
            f"no artifact at {key!r}; give an artifact file (.pt) or a handcrafted name. "
            + unknown_member_message(key))
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{key} is not a metarl artifact (it could not be read: "
                         f"{type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{key} is not a metarl artifact (no '{FORMAT}' header)")
    missing = [k for k in ("family", "representation") if k not in d]
    if missing:
        raise ValueError(f"{key} is a damaged metarl artifact (missing {', '.join(missing)})")
    if int(d.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{key} was written by a newer metarl (artifact format {d['format_version']}, this "
            f"version reads up to {FORMAT_VERSION}); upgrade metarl to read it"
        )
    rep = d.get("representation")
    if not isinstance(rep, dict) or rep.get("kind") not in KINDS:
        raise ValueError(f"{key} is a damaged metarl artifact (its representation has no "
                         f"known kind: {', '.join(KINDS)})")
    try:
        family = get_family(d["family"])
    except ValueError as e:
        raise ValueError(f"{key}: {e} (written by another version of metarl?)") from None
    if rep["kind"] not in family.builders:
        raise ValueError(f"{key}: the {family.name} family has no {rep['kind']} "
                         f"representation (it has {', '.join(family.builders)})")
    if rep["kind"] == "symbolic":
        from metarl.expression import ExpressionError

        try:
            family.builders["symbolic"](rep)  # checks the inputs and the tree
        except ExpressionError as e:
            raise ValueError(f"{key} is a damaged symbolic artifact: {e}") from None
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    elif rep["kind"] == "code":
        if not isinstance(rep.get("source"), str) or not rep["source"].strip():
            raise ValueError(f"{key} is a damaged code artifact (no Python source)")
    elif rep.get("member") not in family.members:
        raise ValueError(f"{key}: unknown member {rep.get('member')!r} of the {family.name} "
                         f"family; known: {', '.join(family.members)}")
    if rep["kind"] == "network" and not isinstance(rep.get("params"), torch.Tensor):
        raise ValueError(f"{key} is a damaged metarl artifact (a network without params)")
    return Artifact(d["family"], rep, d.get("provenance", {}), d.get("name") or path.stem)
