"""Recurrent engines of QuantLSTM's full path: the gate-by-gate cell over a whole sequence.

Both engines take the same arguments and return the same values, for all directions of one layer
at once (directions are a batch dimension of ``bmm``):

- ``xp`` (D, T, B, 4H): input projection x @ W_ih^T + b_ih + b_hh for every step, gate rows in
  the order **i, f, o, g** (PyTorch's i, f, g, o reordered by :func:`gate_order`);
- ``w_hh`` (D, 4H, H) in the same gate order; ``h0``, ``c0`` (D, B, H);
- ``valid`` (T, 1, B, 1) bool or None: step t of sequence b is real (steps past a sequence's
  length carry the state unchanged and output zeros);
- returns ``out`` (D, T, B, H), ``h_n``, ``c_n`` (D, B, H) and, per observed slot, the values
  before fake quantization, (T, D, B, X) tensors, for the observers (the ``tanh`` slot gets a
  pair: tanh(g) and tanh(c)).

:func:`fused_sequence` handles fixed-scale per-tensor quantizers (estimators ``ste`` and
``clipped_ste``) with a hand-written backward (loops in :mod:`.lstm_kernels`): no autograd graph
per step, gate derivatives and clip masks computed once in the forward, and the recurrent weight
gradient is one matmul over the sequence. :func:`autograd_sequence` calls the quantizer modules per
step and lets autograd differentiate (learnable scales, any estimator; LSQ's gradient scale then
counts the elements of one step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .lstm_kernels import loops

__all__ = ["SLOTS", "FixedQuant", "gate_order", "fused_sequence", "autograd_sequence"]

SLOTS = ("gates", "sigmoid", "tanh", "cell", "hidden")


def gate_order(hidden_size: int, device: torch.device | None = None) -> Tensor:
    """Row index that turns PyTorch's gate order (i, f, g, o) into (i, f, o, g)."""
    h = hidden_size
    idx = torch.arange(4 * h, device=device)
    return torch.cat([idx[: 2 * h], idx[3 * h :], idx[2 * h : 3 * h]])


class FixedQuant(NamedTuple):
    """A per-tensor affine grid frozen for one forward: PyTorch's fake-quant arithmetic.

    (clamp(round(x * inv) + z, qmin, qmax) - z) * s equals clamp(round(x * inv), lo, hi) * s
    with lo = qmin - z, hi = qmax - z (integers: exact in float32).
    """

    scale: float
    inv_scale: float  # float32 1 / scale, as torch.fake_quantize_per_tensor_affine computes it
    lo: float  # qmin - zero_point
    hi: float  # qmax - zero_point
    clip: bool  # clipped STE: no gradient where the value was clamped


class _FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, w_hh, h0, c0, valid, q, observe, stats, script):  # noqa: D102
        # observe: slot -> 1 (its observer needs each row's min and max) or 2 (all values)
        fwd, ctx.bwd = loops(script)
        qs = [q.get(n) for n in SLOTS]
        qon = [p is not None for p in qs]
        qclip = [p is not None and p.clip for p in qs]
        num = lambda v: torch.tensor(v, dtype=xp.dtype, device=xp.device)  # noqa: E731
        qp = [(num(0.0), num(0.0), 0.0, 0.0) if p is None else
              (num(p.inv_scale), num(p.scale), p.lo, p.hi) for p in qs]
        need = any(ctx.needs_input_grad[:4])
        (out, hn, cn), saved, seen = fwd(xp, w_hh, h0, c0, valid, qon, qclip, qp,
                                         [observe.get(n, 0) for n in SLOTS], need)
        *full, rng = seen  # rng: row ranges (source, min|max, T, D, B)
        sources = (0, 1, 2, 4, 5, 3)  # rng rows of gates, sigmoid, tanh(g), cell, hidden, tanh(c)
        g, s, u, c, hh, k = (  # a row range (2, T, D, B) -> (T, D, B, 2): same min and max
            f if f is not None or rng is None else rng[j].permute(1, 2, 3, 0)
            for f, j in zip(full, sources, strict=True))
        stats.update({"gates": g, "sigmoid": s, "tanh": (u, k), "cell": c, "hidden": hh})
        if need:
            ctx.save_for_backward(w_hh, h0, c0, out)
            ctx.bufs = (*saved, valid)
        return out, hn, cn

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):  # noqa: D102
        w_hh, h0, c0, out = ctx.saved_tensors
        actq, dgate, dtanh, kq, cs, m_c, m_h, valid = ctx.bufs
        d_xp, d_w, dh, dc = ctx.bwd(d_out, d_hn, d_cn, w_hh, h0, c0, out, actq, dgate, dtanh,
                                    kq, cs, m_c, m_h, valid, ctx.needs_input_grad[1])
        return d_xp, d_w, dh, dc, None, None, None, None, None


def fused_sequence(
    xp: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    valid: Tensor | None,
    quant: dict[str, FixedQuant | None],
    observe: frozenset[str] | set[str],
    script: bool = True,
    ranges_only: frozenset[str] | set[str] = frozenset(),
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | tuple[Tensor, ...] | None]]:
    """The cell over the sequence with fixed-scale quantizers and a hand-written backward.

    Slots in ``ranges_only`` (range observers) get (T, D, B, 2) tensors holding each row's
    minimum and maximum instead of all values.
    """
    stats: dict = {}
    modes = {n: 1 if n in ranges_only else 2 for n in observe}
    out, hn, cn = _FusedLSTM.apply(xp, w_hh, h0, c0, valid, quant, modes, stats, script)
    return out, hn, cn, {k: v for k, v in stats.items() if k in observe}


def autograd_sequence(
    xp: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    valid: Tensor | None,
    quant: dict[str, Callable[[Tensor], Tensor] | None],
    observe: frozenset[str] | set[str],
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | tuple[Tensor, ...] | None]]:
    """The cell over the sequence, one autograd graph per step (any quantizer callable)."""
    h = w_hh.shape[-1]
    h3 = 3 * h
    qg, qs, qt, qc, qh = (quant.get(n) for n in SLOTS)
    rec: dict[str, list[Tensor]] = {n: [] for n in ("gates", "sigmoid", "tanh", "k", "cell",
                                                      "hidden")}
    keep = lambda n, v: rec[n].append(v.detach()) if n in observe else None  # noqa: E731
    wt = w_hh.transpose(1, 2)  # (D, 4H, H) -> (D, H, 4H)
    hx, cx = h0, c0
    outs = []
    for t, x_t in enumerate(xp.unbind(1)):
        gates = torch.baddbmm(x_t, hx, wt)  # (D, B, 4H)
        keep("gates", gates)
        if qg is not None:
            gates = qg(gates)
        s = torch.sigmoid(gates[..., :h3])
        u = torch.tanh(gates[..., h3:])
        keep("sigmoid", s)
        keep("tanh", u)
        if qs is not None:
            s = qs(s)
        if qt is not None:
            u = qt(u)
        cn = s[..., h : 2 * h] * cx + s[..., :h] * u  # f * c + i * g
        keep("cell", cn)
        if qc is not None:
            cn = qc(cn)
        k = torch.tanh(cn)
        if "tanh" in observe:
            rec["k"].append(k.detach())
        if qt is not None:
            k = qt(k)
        hn = s[..., 2 * h :] * k  # o * tanh(c)
        keep("hidden", hn)
        if qh is not None:
            hn = qh(hn)
        if valid is None:
            outs.append(hn)
            hx, cx = hn, cn
        else:
            vm = valid[t]  # (1, B, 1)
            outs.append(torch.where(vm, hn, 0.0))
            hx, cx = torch.where(vm, hn, hx), torch.where(vm, cn, cx)
    stack = lambda n: torch.stack(rec[n]) if rec[n] else None  # noqa: E731  (T, D, B, X)
    stats: dict = {n: stack(n) for n in ("gates", "sigmoid", "cell", "hidden")}
    if "tanh" in observe:
        stats["tanh"] = (stack("tanh"), stack("k"))
    return torch.stack(outs, 1), hx, cx, {k: v for k, v in stats.items() if k in observe}
