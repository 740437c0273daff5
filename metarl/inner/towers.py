"""The actor-critic's forward and a hand-written backward, for a population on flat rows.

The minibatch step of the inner loop spends most of its time in the two towers (batched
matmuls and the activations' passes over ``[P, batch, hidden]``). Autograd through the
towers adds what a hand-written backward does not need: a graph per step, the views of the
flat ``[P, D]`` row scattered back and concatenated into a gradient row, transposed
copies before the activations' backward. :class:`Towers` runs the same forward as
:meth:`metarl.nets.ActorCritic.batched` (the same operations in the same order, so the
outputs are bit for bit the same) while keeping what the backward needs, and
:meth:`Towers.backward` writes the gradient of every layer straight into a flat
``[P, D]`` gradient row. Autograd still runs over everything above the towers: the loss
(the drift, which may be a learned network or a proposal's code, the value loss, the
entropy) is differentiated with respect to the towers' outputs and ``log_std`` only.

The gradients equal autograd's up to float rounding (a test compares them); every
operation is one per population, so a member trained alone gets the same numbers as in a
population (a test checks that too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metarl.nets import ActorCritic, FlatParams


@dataclass(frozen=True)
class _Layer:
    name: str          # "actor.0"
    w: slice           # the weight's entries in the flat row ([out, in], row major)
    b: slice           # the bias's entries
    out: int
    inp: int
    hidden: bool       # followed by the activation


class Towers:
    """Forward and backward of an :class:`~metarl.nets.ActorCritic` over flat rows."""

    def __init__(self, model: ActorCritic, layout: FlatParams):
        self.relu = not isinstance(model.actor[1], nn.Tanh)
        offsets, start = {}, 0
        for name, size in zip(layout.names, layout.sizes):
            offsets[name] = slice(start, start + size)
            start += size
        self.numel = layout.numel
        self._ws: dict = {}  # workspace of the minibatch step (see _buf)
        self.towers: dict[str, list[_Layer]] = {}
        for tower in ("actor", "critic"):
            seq = getattr(model, tower)
            idx = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
            self.towers[tower] = [
                _Layer(f"{tower}.{i}", offsets[f"{tower}.{i}.weight"],
                       offsets[f"{tower}.{i}.bias"], seq[i].out_features, seq[i].in_features,
                       j < len(idx) - 1)
                for j, i in enumerate(idx)
            ]

    # -- forward ------------------------------------------------------------------------

    def _weight(self, params: torch.Tensor, layer: _Layer) -> torch.Tensor:
        return params[:, layer.w].view(params.shape[0], layer.out, layer.inp)

    def _buf(self, key, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A workspace tensor for ``key``, reused from call to call while its shape holds:
        the minibatch step's activations and gradients (16 MB each for MinAtar at P = 64)
        would otherwise be fresh allocations, which cost page faults on every step."""
        buf = self._ws.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or \
                buf.device != like.device:
            buf = self._ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def tower(self, params: torch.Tensor, name: str, obs: torch.Tensor,
              saved: list | None = None, taps: dict | None = None,
              reuse: bool | str = False) -> torch.Tensor:
        """One tower's output ``[P, B, out]``; ``saved`` (a list) receives each layer's
        input for :meth:`backward`, ``taps`` each layer's mean absolute output over the
        batch (see :meth:`metarl.nets.ActorCritic.tower`). With ``reuse``, the hidden
        layers' outputs (and a width-one layer's products) are written into the workspace,
        valid until the next call with the same ``reuse`` (a string names a workspace of
        its own, such as the rollout's critic, so that calls of two shapes do not take
        turns reallocating one)."""
        h = obs
        P, B = obs.shape[0], obs.shape[1]
        for layer in self.towers[name]:
            if saved is not None:
                saved.append(h)
            w, b = self._weight(params, layer), params[:, layer.b]
            if layer.out == 1:
                # As metarl.nets.batched_linear: a multiply and a sum rounds the same for
                # every population size, where a width-one bmm does not.
                prod = (torch.mul(h, w, out=self._buf(("hw", reuse, layer.name), h.shape, h))
                        if reuse else h * w)
                h = prod.sum(-1, keepdim=True) + b.unsqueeze(1)
            elif reuse:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2),
                                  out=self._buf(("h", reuse, layer.name), (P, B, layer.out),
                                                h))
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer.hidden:
                h = torch.relu_(h) if self.relu else torch.tanh_(h)
            if taps is not None:
                taps[layer.name] = h.abs().mean(dim=1)
        if saved is not None:
            saved.append(h)
        return h

    def forward(self, params: torch.Tensor, obs: torch.Tensor, saved: dict | None = None,
                taps: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(policy_out [P, B, A], value [P, B])`` for ``params [P, D]`` and ``obs
        [P, B, obs_dim]``. Called under ``torch.no_grad()`` with ``saved`` a dict, it keeps
        the activations :meth:`backward` needs."""
        keep = {} if saved is None else saved
        reuse = saved is not None
        out = self.tower(params, "actor", obs, keep.setdefault("actor", []), taps, reuse)
        value = self.tower(params, "critic", obs, keep.setdefault("critic", []), taps, reuse)
        return out, value.squeeze(-1)

    def actor_weights(self, params: torch.Tensor, rows: int = 1
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The actor's layers laid out for acting (:meth:`act`) on ``rows`` observations
        per member: per layer ``(weight transposed and contiguous [P, in, out], bias
        repeated for every row [P, rows, out])`` (a width-one layer keeps its ``[P, 1,
        in]`` weight for the multiply-and-sum). Made once per rollout: a batched matmul
        over a few rows per member is several times faster with its right-hand side
        contiguous (its kernel rounds differently from the transposed view's, by float
        rounding only), and starts faster from a contiguous bias than from a broadcast one
        (the same numbers). :meth:`act` accepts any number of rows when ``rows`` is 1."""
        P = params.shape[0]
        out = []
        for layer in self.towers["actor"]:
            w = self._weight(params, layer)
            b = params[:, layer.b].reshape(P, 1, layer.out)
            out.append((w if layer.out == 1 else w.transpose(1, 2).contiguous(),
                        b.expand(P, rows, layer.out).contiguous() if rows > 1 else b))
        return out

    def act(self, weights: list[tuple[torch.Tensor, torch.Tensor]],
            obs: torch.Tensor) -> torch.Tensor:
        """The actor's output ``[P, N, A]`` from :meth:`actor_weights`: :meth:`tower`'s
        function, for acting."""
        h = obs
        for layer, (w, b) in zip(self.towers["actor"], weights):
            if layer.out == 1:
                h = (h * w).sum(-1, keepdim=True) + b
            else:
                h = torch.baddbmm(b, h, w)
            if layer.hidden:
                h = torch.relu_(h) if self.relu else torch.tanh_(h)
        return h

    # -- backward -----------------------------------------------------------------------

    def backward(self, params: torch.Tensor, saved: dict, g_out: torch.Tensor,
                 g_value: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Write the gradient of the loss with respect to every tower parameter into
        ``grads [P, D]`` (entries of other parameters, such as ``log_std``, are left as
        they are), given the loss's gradients ``g_out [P, B, A]`` and ``g_value [P, B]``
        with respect to the towers' outputs and the ``saved`` activations of
        :meth:`forward`."""
        P = params.shape[0]
        ops = torch.ops.aten
        for name, g in (("actor", g_out), ("critic", g_value.unsqueeze(-1))):
            acts = saved[name]
            layers = self.towers[name]
            own = False  # whether g is a workspace tensor (then updated in place)
            for j in range(len(layers) - 1, -1, -1):
                layer = layers[j]
                x, y = acts[j], acts[j + 1]
                if layer.hidden:
                    if self.relu:
                        g = (ops.threshold_backward.grad_input(g, y, 0.0, grad_input=g) if own
                             else ops.threshold_backward(g, y, 0.0))
                    else:
                        g = (ops.tanh_backward.grad_input(g, y, grad_input=g) if own
                             else ops.tanh_backward(g, y))
                gw = grads[:, layer.w].view(P, layer.out, layer.inp)
                if layer.out == 1:  # a multiply and a sum: the same rounding for every P
                    gx = torch.mul(g, x, out=self._buf(("gx", layer.name), x.shape, x))
                    torch.sum(gx, dim=1, keepdim=True, out=gw)
                else:
                    gw.copy_(torch.bmm(g.transpose(1, 2), x,
                                       out=self._buf(("gw", layer.name), gw.shape, x)))
                torch.sum(g, dim=1, out=grads[:, layer.b])
                if j:
                    w = self._weight(params, layer)
                    buf = self._buf(("g", layer.name), (*g.shape[:2], layer.inp), g)
                    g = torch.mul(g, w, out=buf) if layer.out == 1 else torch.bmm(g, w, out=buf)
                    own = True
        return grads

    def loss_and_grads(self, params: torch.Tensor, head, log_std_slice: slice | None,
                       grads: torch.Tensor, obs: torch.Tensor, *batch: torch.Tensor,
                       taps: dict | None = None) -> torch.Tensor:
        """The loss ``[P]`` of a minibatch, its gradient written into ``grads [P, D]``.

        ``head`` is the loss from the towers' outputs: a
        :class:`metarl.inner.compiled.LossHead`, whose ``loss_and_grads(out, value,
        log_std, *batch)`` gives the loss and its gradients with respect to ``out``,
        ``value`` and ``log_std`` (a continuous policy's parameter, read from its slice of
        ``params``), or any ``head(out, value, log_std, *batch) -> loss [P]``, which
        autograd differentiates. :meth:`backward` carries the gradient through the
        towers."""
        saved: dict = {}
        with torch.no_grad():
            out, value = self.forward(params, obs, saved, taps)
            log_std = params[:, log_std_slice] if log_std_slice is not None else None
            if hasattr(head, "loss_and_grads"):
                loss, g_out, g_value, g_log_std = head.loss_and_grads(out, value, log_std,
                                                                      *batch)
            else:
                loss, g_out, g_value, g_log_std = head_grads(head, out, value, log_std, batch)
            self.backward(params, saved, g_out, g_value, grads)
            if log_std_slice is not None:
                grads[:, log_std_slice] = g_log_std
        return loss


def head_grads(head, out: torch.Tensor, value: torch.Tensor, log_std: torch.Tensor | None,
               batch: tuple) -> tuple:
    """``(loss [P], d out, d value, d log_std or None)``: autograd of the summed loss
    ``head(out, value, log_std, *batch)`` with respect to the towers' outputs and
    ``log_std`` (None for a discrete policy)."""
    leaves = [out.detach().requires_grad_(True), value.detach().requires_grad_(True)]
    if log_std is not None:
        leaves.append(log_std.detach().requires_grad_(True))
    with torch.enable_grad():
        loss = head(*leaves[:2], leaves[2] if log_std is not None else None, *batch)
        g = torch.autograd.grad(loss.sum(), leaves)
    return (loss.detach(), *g, None) if log_std is None else (loss.detach(), *g)


__all__ = ["Towers", "head_grads"]
