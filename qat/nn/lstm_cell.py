"""Recurrent engines of QuantLSTM's full path: the gate-by-gate cell over a whole sequence.

Both engines take the same arguments and return the same values, for all directions of one layer
at once (directions are a batch dimension of ``bmm``):

- ``xp`` (D, T, B, 4H): input projection x @ W_ih^T + b_ih + b_hh for every step, gate rows in
  the order **i, f, o, g** (PyTorch's i, f, g, o reordered by :data:`GATE_ORDER`);
- ``w_hh`` (D, 4H, H) in the same gate order; ``h0``, ``c0`` (D, B, H);
- ``valid`` (T, 1, B, 1) bool or None: step t of sequence b is real (steps past a sequence's
  length carry the state unchanged and output zeros);
- returns ``out`` (D, T, B, H), ``h_n``, ``c_n`` (D, B, H) and, per observed slot, the values
  before fake quantization, (D, T, B, X) tensors, for the observers.

:func:`fused_sequence` handles fixed-scale per-tensor quantizers (estimators ``ste`` and
``clipped_ste``) with a hand-written backward: no autograd graph per step, and the recurrent weight
gradient is one matmul over the sequence. :func:`autograd_sequence` calls the quantizer modules per
step and lets autograd differentiate (learnable scales, any estimator).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SLOTS", "FixedQuant", "gate_order", "fused_sequence", "autograd_sequence"]

SLOTS = ("gates", "sigmoid", "tanh", "cell", "hidden")


def gate_order(hidden_size: int, device: torch.device | None = None) -> Tensor:
    """Row index that turns PyTorch's gate order (i, f, g, o) into (i, f, o, g)."""
    h = hidden_size
    idx = torch.arange(4 * h, device=device)
    return torch.cat([idx[: 2 * h], idx[3 * h :], idx[2 * h : 3 * h]])


class FixedQuant(NamedTuple):
    """A per-tensor affine grid frozen for one forward: PyTorch's fake-quant arithmetic."""

    scale: float
    inv_scale: float  # float32 1 / scale, as torch.fake_quantize_per_tensor_affine computes it
    zero_point: float
    qmin: float
    qmax: float
    clip: bool  # clipped STE: no gradient where the value was clamped


def _fq(x: Tensor, p: FixedQuant, out: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s into ``out``; in-range mask into ``mask``."""
    v = torch.mul(x, p.inv_scale, out=out) if out is not None else x * p.inv_scale
    v.round_()
    if p.zero_point:
        v.add_(p.zero_point)
    if mask is not None:
        torch.ge(v, p.qmin, out=mask)
        mask.logical_and_(v <= p.qmax)
    v.clamp_(p.qmin, p.qmax)
    if p.zero_point:
        v.sub_(p.zero_point)
    return v.mul_(p.scale)


def _buf(on: bool, like: Tensor, size: int, dtype: torch.dtype | None = None) -> Tensor | None:
    d, t, b = like.shape[:3]
    return like.new_empty(d, t, b, size, dtype=dtype) if on else None


class _FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, w_hh, h0, c0, valid, q, observe, stats):  # noqa: D102
        d, t_len, b, g4 = xp.shape  # (D, T, B, 4H)
        h = g4 // 4
        h3 = 3 * h
        qg, qs, qt, qc, qh = (q.get(n) for n in SLOTS)
        need = any(ctx.needs_input_grad[:4])
        msk = lambda p, size: _buf(need and p is not None and p.clip, xp, size, torch.bool)  # noqa: E731
        acts = xp.new_empty(d, t_len, b, g4)  # sigmoid(i, f, o), tanh(g) before quantization
        actq = acts if qs is None and qt is None else xp.new_empty(d, t_len, b, g4)
        m_a = None
        if need and ((qs is not None and qs.clip) or (qt is not None and qt.clip)):
            m_a = torch.ones(d, t_len, b, g4, dtype=torch.bool, device=xp.device)
        ks = xp.new_empty(d, t_len, b, h)  # tanh(c) before quantization
        kq = ks if qt is None else xp.new_empty(d, t_len, b, h)
        cs = xp.new_empty(d, t_len, b, h)  # cell state carried to the next step
        out = xp.new_empty(d, t_len, b, h)
        m_g, m_c, m_k, m_h = msk(qg, g4), msk(qc, h), msk(qt, h), msk(qh, h)
        g_pre = _buf("gates" in observe, xp, g4)
        c_pre = _buf("cell" in observe, xp, h)
        h_pre = _buf("hidden" in observe, xp, h)
        wt = w_hh.transpose(1, 2)  # (D, 4H, H) -> (D, H, 4H)
        hx, cx = h0, c0
        for t in range(t_len):
            gates = torch.baddbmm(xp[:, t], hx, wt)  # (D, B, 4H)
            if g_pre is not None:
                g_pre[:, t] = gates
            if qg is not None:
                _fq(gates, qg, gates, None if m_g is None else m_g[:, t])
            a = acts[:, t]
            torch.sigmoid(gates[..., :h3], out=a[..., :h3])
            torch.tanh(gates[..., h3:], out=a[..., h3:])
            aq = actq[:, t]
            if actq is not acts:
                for p, sl in ((qs, slice(0, h3)), (qt, slice(h3, g4))):
                    if p is None:
                        aq[..., sl] = a[..., sl]
                    else:
                        _fq(a[..., sl], p, aq[..., sl], None if m_a is None else m_a[:, t, :, sl])
            cn = aq[..., h : 2 * h] * cx + aq[..., :h] * aq[..., h3:]  # f * c + i * g
            if c_pre is not None:
                c_pre[:, t] = cn
            if qc is not None:
                _fq(cn, qc, cn, None if m_c is None else m_c[:, t])
            k = torch.tanh(cn, out=ks[:, t])
            if qt is not None:
                k = _fq(k, qt, kq[:, t], None if m_k is None else m_k[:, t])
            hn = aq[..., 2 * h : h3] * k  # o * tanh(c)
            if h_pre is not None:
                h_pre[:, t] = hn
            if qh is not None:
                _fq(hn, qh, hn, None if m_h is None else m_h[:, t])
            if valid is None:
                out[:, t] = hn
                cs[:, t] = cn
                hx, cx = out[:, t], cs[:, t]
            else:
                vm = valid[t]  # (1, B, 1)
                out[:, t] = torch.where(vm, hn, 0.0)
                hx = torch.where(vm, hn, hx)
                cx = torch.where(vm, cn, cx)
                cs[:, t] = cx
        stats.update({"gates": g_pre, "cell": c_pre, "hidden": h_pre})
        if "sigmoid" in observe:
            stats["sigmoid"] = acts[..., :h3]
        if "tanh" in observe:
            stats["tanh"] = (acts[..., h3:], ks)
        if need:
            ctx.save_for_backward(w_hh, h0, c0, out)
            ctx.bufs = (acts, actq, ks, kq, cs, m_a, m_g, m_c, m_k, m_h, valid)
        return out, hx.clone(), cx.clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):  # noqa: D102
        w_hh, h0, c0, out = ctx.saved_tensors
        acts, actq, ks, kq, cs, m_a, m_g, m_c, m_k, m_h, valid = ctx.bufs
        d, t_len, b, g4 = acts.shape
        h = g4 // 4
        h3 = 3 * h
        d_xp = acts.new_empty(d, t_len, b, g4)  # gradient of the gate pre-activations
        dh = torch.zeros_like(h0) if d_hn is None else d_hn
        dc = torch.zeros_like(c0) if d_cn is None else d_cn
        for t in range(t_len - 1, -1, -1):
            dht = dh if d_out is None else dh + d_out[:, t]
            if valid is not None:
                vm = valid[t]
                skip_h, skip_c = torch.where(vm, 0.0, dh), torch.where(vm, 0.0, dc)
                dht, dc = torch.where(vm, dht, 0.0), torch.where(vm, dc, 0.0)
            if m_h is not None:
                dht = dht * m_h[:, t]
            aq, a, dg = actq[:, t], acts[:, t], d_xp[:, t]
            torch.mul(dht, kq[:, t], out=dg[..., 2 * h : h3])  # d o
            dk = dht * aq[..., 2 * h : h3]
            if m_k is not None:
                dk.mul_(m_k[:, t])
            k = ks[:, t]
            dcn = dc + dk * (1.0 - k * k)
            if m_c is not None:
                dcn.mul_(m_c[:, t])
            c_prev = cs[:, t - 1] if t > 0 else c0
            torch.mul(dcn, aq[..., h3:], out=dg[..., :h])  # d i
            torch.mul(dcn, c_prev, out=dg[..., h : 2 * h])  # d f
            torch.mul(dcn, aq[..., :h], out=dg[..., h3:])  # d g
            dc = dcn * aq[..., h : 2 * h]
            if m_a is not None:
                dg.mul_(m_a[:, t])
            s = a[..., :h3]
            dg[..., :h3].mul_(s - s * s)  # sigmoid'
            u = a[..., h3:]
            dg[..., h3:].mul_(1.0 - u * u)  # tanh'
            if m_g is not None:
                dg.mul_(m_g[:, t])
            if valid is not None:
                dh = torch.baddbmm(skip_h, dg, w_hh)  # (D, B, 4H) @ (D, 4H, H)
                dc = dc + skip_c
            else:
                dh = torch.bmm(dg, w_hh)
        d_w = None
        if ctx.needs_input_grad[1]:
            h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # (D, T, B, H)
            d_w = torch.bmm(
                d_xp.reshape(d, t_len * b, g4).transpose(1, 2),  # (D, 4H, T*B)
                h_prev.reshape(d, t_len * b, h),  # (D, T*B, H)
            )
        return d_xp, d_w, dh, dc, None, None, None, None


def fused_sequence(
    xp: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    valid: Tensor | None,
    quant: dict[str, FixedQuant | None],
    observe: frozenset[str] | set[str],
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | tuple[Tensor, ...] | None]]:
    """The cell over the sequence with fixed-scale quantizers and a hand-written backward."""
    stats: dict = {}
    out, hn, cn = _FusedLSTM.apply(xp, w_hh, h0, c0, valid, quant, frozenset(observe), stats)
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
    stack = lambda n: torch.stack(rec[n], 1) if rec[n] else None  # noqa: E731  (D, T, B, X)
    stats: dict = {n: stack(n) for n in ("gates", "sigmoid", "cell", "hidden")}
    if "tanh" in observe:
        stats["tanh"] = (stack("tanh"), stack("k"))
    return torch.stack(outs, 1), hx, cx, {k: v for k, v in stats.items() if k in observe}
