"""Artifacts: a learned algorithm on disk, with where it came from.

Every meta-learning method writes one, every evaluation reads one. An artifact holds

- ``family``: the slot it fills (``drift`` today; ``optim`` and ``lpg`` later),
- ``representation``: how the algorithm is written down. ``{"kind": "network", "member":
  "lpo", "params": Tensor[n], ...}`` for a network; ``{"kind": "handcrafted", "member":
  "ppo-clip"}`` for a handcrafted member, ``{"kind": "symbolic", "member": "symbolic",
  "tree": [...], "inputs": [...]}`` for a formula (:mod:`metarl.algorithms.expression`;
  a tree of allowed operators, never evaluated text), ``{"kind": "code", "member": "code",
  "source": "...", "function": "drift"}`` for Python source proposed by a model (untrusted:
  :meth:`Artifact.build` runs it only in a sandboxed child process),
- ``provenance``: the method and its settings, meta-training environments, environment
  steps and wall time spent finding it, seed, metarl version, creation time.

Files are ``torch.save`` dictionaries read back with ``weights_only=True`` (no code runs on
load). Handcrafted members are addressable by name (``ppo-clip``, ``dpo``, ``lpo``)
wherever an artifact is accepted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarl import __version__
from metarl.algorithms.drift import DRIFTS, LPO, SYMBOLIC_INPUTS, Drift, SymbolicDrift, make_drift

FORMAT = "metarl-artifact"
FORMAT_VERSION = 1
HANDCRAFTED = {"ppo-clip": "drift", "dpo": "drift", "lpo": "drift"}
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

    def build(self) -> tuple[Drift, torch.Tensor]:
        """The family member and its meta-parameters ``[n]``, ready for the inner loop."""
        if self.family != "drift":
            raise ValueError(f"artifact family {self.family!r} is not supported by this "
                             f"version of metarl (supported: drift)")
        if self.kind == "symbolic":
            member = SymbolicDrift(self.representation["tree"])
            return member, member.flat_params()
        if self.kind == "code":
            # Untrusted source: it runs only in a sandboxed child; the caller closes it
            # (member.close()) when done, or it is closed when garbage-collected. An
            # evaluation can train for long: a week of wall time, a day of child CPU.
            from metarl.meta.sandbox import DriftSandbox, SandboxedDrift, SandboxLimits

            limits = SandboxLimits(wall_s=7 * 86400.0, cpu_s=86400)
            box = DriftSandbox(self.representation["source"], limits).start()
            member = SandboxedDrift(box)
            return member, member.flat_params()
        if self.kind == "network" and self.representation["member"] == "lpo":
            member = LPO(hidden=int(self.representation.get("hidden", 128)))
        else:
            member = make_drift(self.representation["member"])
        if self.kind == "handcrafted":
            return member, member.flat_params()
        if self.kind == "network":
            params = torch.as_tensor(self.representation["params"], dtype=torch.float32)
            if params.shape != (member.num_meta_params,):
                raise ValueError(
                    f"artifact {self.name!r}: {self.representation['member']} expects "
                    f"{member.num_meta_params} parameters, the file has {tuple(params.shape)}"
                )
            return member, params
        raise ValueError(f"artifact {self.name!r}: unknown representation {self.kind!r}")

    def describe(self) -> str:
        rep = self.representation
        lines = [f"artifact: {self.name}", f"family: {self.family}",
                 f"representation: {rep['kind']} ({rep.get('member', '')})"]
        if rep["kind"] == "network":
            p = torch.as_tensor(rep["params"])
            if "hidden" in rep:
                lines.append(f"hidden width: {rep['hidden']}")
            lines.append(f"parameters: {p.numel()} (norm {float(p.norm()):.4g}, "
                         f"max |w| {float(p.abs().max()) if p.numel() else 0:.4g})")
        if rep["kind"] == "symbolic":
            from metarl.algorithms.expression import size

            member = SymbolicDrift(rep["tree"])
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
    rep = {"kind": "network", "member": member,
           "params": params.detach().cpu().float().clone()}
    if hidden is not None:
        rep["hidden"] = int(hidden)
    return Artifact("drift", rep, _provenance(provenance), name or member)


def symbolic_artifact(tree, provenance: dict, name: str = "symbolic") -> Artifact:
    """A drift written as a formula over ``SYMBOLIC_INPUTS`` (checked before it is kept)."""
    from metarl.algorithms.expression import check_tree

    check_tree(tree, SYMBOLIC_INPUTS)
    return Artifact("drift", {"kind": "symbolic", "member": "symbolic", "tree": tree,
                              "inputs": list(SYMBOLIC_INPUTS)}, _provenance(provenance), name)


def code_artifact(source: str, function: str, provenance: dict, name: str = "code") -> Artifact:
    """A drift written as Python source (an LLM proposal). Loading it runs nothing."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("a code artifact needs non-empty Python source")
    return Artifact("drift", {"kind": "code", "member": "code", "source": source,
                              "function": function}, _provenance(provenance), name)


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
    if key in HANDCRAFTED and not Path(key).exists():
        return Artifact(HANDCRAFTED[key], {"kind": "handcrafted", "member": key},
                        {"method": "handcrafted"}, key)
    path = Path(key)
    if not path.exists():
        raise FileNotFoundError(
            f"no artifact at {key!r}; give an artifact file (.pt) or a handcrafted name: "
            f"{', '.join(HANDCRAFTED)}"
        )
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
    if rep["kind"] == "symbolic":
        from metarl.algorithms.expression import ExpressionError, check_tree

        if list(rep.get("inputs") or SYMBOLIC_INPUTS) != list(SYMBOLIC_INPUTS):
            raise ValueError(f"{key}: a symbolic drift's inputs must be "
                             f"{list(SYMBOLIC_INPUTS)}, the file has {rep.get('inputs')}")
        try:
            check_tree(rep.get("tree"), SYMBOLIC_INPUTS)
        except ExpressionError as e:
            raise ValueError(f"{key} is a damaged symbolic artifact: {e}") from None
    elif rep["kind"] == "code":
        if not isinstance(rep.get("source"), str) or not rep["source"].strip():
            raise ValueError(f"{key} is a damaged code artifact (no Python source)")
    elif rep.get("member") not in DRIFTS:
        raise ValueError(f"{key}: unknown member {rep.get('member')!r}; known: "
                         f"{', '.join(DRIFTS)}")
    if rep["kind"] == "network" and not isinstance(rep.get("params"), torch.Tensor):
        raise ValueError(f"{key} is a damaged metarl artifact (a network without params)")
    return Artifact(d["family"], rep, d.get("provenance", {}), d.get("name") or path.stem)
