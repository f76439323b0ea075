"""Recurrent engines of QuantLSTM's full path: the gate-by-gate cell over a whole sequence.

Both engines take the same arguments and return the same values, for all directions of one layer
at once (directions are a batch dimension of ``bmm``):

- ``xp`` (D, T, B, 4H): input projection x @ W_ih^T + b_ih + b_hh for every step, gate rows in
  the order **i, f, o, g** (PyTorch's i, f, g, o reordered by :func:`gate_order`);
- ``w_hh`` (D, 4H, H) in the same gate order; ``h0``, ``c0`` (D, B, H);
- ``valid`` (T, 1, B, 1) bool or None: step t of sequence b is real (steps past a sequence's
  length carry the state unchanged and output zeros);
- returns ``out`` (D, T, B, H), ``h_n``, ``c_n`` (D, B, H) and, per observed slot, the values
  before fake quantization, (T, D, B, X) tensors, for the observers.

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
    """A per-tensor affine grid frozen for one forward: PyTorch's fake-quant arithmetic.

    (clamp(round(x * inv) + z, qmin, qmax) - z) * s equals clamp(round(x * inv), lo, hi) * s
    with lo = qmin - z, hi = qmax - z (integers: exact in float32).
    """

    scale: float
    inv_scale: float  # float32 1 / scale, as torch.fake_quantize_per_tensor_affine computes it
    lo: float  # qmin - zero_point
    hi: float  # qmax - zero_point
    clip: bool  # clipped STE: no gradient where the value was clamped


def _fq(x: Tensor, p: FixedQuant, out: Tensor | None = None,
        clipped: Tensor | None = None) -> Tensor:
    """Fake-quantize x into ``out`` (a new tensor if None); clamped elements into ``clipped``."""
    if clipped is None:
        v = torch.mul(x, p.inv_scale, out=out) if out is not None else x * p.inv_scale
        return v.round_().clamp_(p.lo, p.hi).mul_(p.scale)
    v = torch.mul(x, p.inv_scale).round_()
    q = torch.clamp(v, p.lo, p.hi, out=out) if out is not None else v.clamp(p.lo, p.hi)
    torch.ne(q, v, out=clipped)
    return q.mul_(p.scale)


def _steps(buf: Tensor | None, t_len: int, lo: int = 0, hi: int | None = None,
           dim: int = 1) -> list:
    """Per-step views of buf[..., lo:hi] along ``dim`` (1: (D, T, ...), 0: (T, D, ...))."""
    if buf is None:
        return [None] * t_len
    return list(buf[..., lo:hi].unbind(dim))


class _FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, w_hh, h0, c0, valid, q, observe, stats):  # noqa: D102
        d, n, b, g4 = xp.shape  # (D, T, B, 4H)
        h = g4 // 4
        h2, h3 = 2 * h, 3 * h
        qg, qs, qt, qc, qh = (q.get(name) for name in SLOTS)
        need = any(ctx.needs_input_grad[:4])
        clip = lambda p: need and p is not None and p.clip  # noqa: E731
        new = lambda size, dt=None: xp.new_empty(d, n, b, size, dtype=dt)  # noqa: E731
        tnew = lambda on, size: xp.new_empty(n, d, b, size) if on else None  # noqa: E731
        # saved for backward: quantized activations, gate derivatives (zero where clipped),
        # tanh'(c) (zero where the tanh quantizer clipped), carried cell states, clip masks
        actq = new(g4)
        dgate = new(g4) if need else None
        dtanh = new(h) if need else None
        kq = new(h)
        cs = new(h)
        out = new(h)
        m_c = new(h, torch.bool) if clip(qc) else None
        m_h = new(h, torch.bool) if clip(qh) else None
        # values seen by the observers, time-major (T, D, B, X)
        g_pre, c_pre, h_pre = (tnew(name in observe, size) for name, size in
                               (("gates", g4), ("cell", h), ("hidden", h)))
        acts = tnew("sigmoid" in observe or "tanh" in observe, g4)
        k_pre = tnew("tanh" in observe, h)
        tmp_a = xp.new_empty(d, b, g4)
        tmp_k = xp.new_empty(d, b, h)
        mask_a = torch.empty(d, b, g4, dtype=torch.bool, device=xp.device)
        mask_g = torch.empty(d, b, g4, dtype=torch.bool, device=xp.device)
        mask_k = torch.empty(d, b, h, dtype=torch.bool, device=xp.device)
        one = xp.new_ones(())
        xs, aq, dg, dk = _steps(xp, n), _steps(actq, n), _steps(dgate, n), _steps(dtanh, n)
        ig, fg, og, ug = (_steps(actq, n, 0, h), _steps(actq, n, h, h2),
                          _steps(actq, n, h2, h3), _steps(actq, n, h3))
        k_q, c_s, outs, mc, mh = (_steps(x, n) for x in (kq, cs, out, m_c, m_h))
        gp, cp, hp, ap, kp = (_steps(x, n, dim=0) for x in (g_pre, c_pre, h_pre, acts, k_pre))
        wt = w_hh.transpose(1, 2)  # (D, 4H, H) -> (D, H, 4H)
        hx, cx = h0, c0
        for t in range(n):
            gates = torch.baddbmm(xs[t], hx, wt, out=gp[t])  # (D, B, 4H)
            if qg is not None:
                gates = _fq(gates, qg, None, mask_g if clip(qg) else None)
            a = ap[t] if ap[t] is not None else (tmp_a if qs or qt else aq[t])
            torch.sigmoid(gates[..., :h3], out=a[..., :h3])
            torch.tanh(gates[..., h3:], out=a[..., h3:])
            if need:
                torch.addcmul(a[..., :h3], a[..., :h3], a[..., :h3], value=-1,
                              out=dg[t][..., :h3])  # sigmoid' = s - s^2
                torch.addcmul(one, a[..., h3:], a[..., h3:], value=-1,
                              out=dg[t][..., h3:])  # tanh' = 1 - u^2
            for p, sl in ((qs, slice(0, h3)), (qt, slice(h3, g4))):
                if p is not None:
                    _fq(a[..., sl], p, aq[t][..., sl], mask_a[..., sl] if clip(p) else None)
                    if clip(p):
                        dg[t][..., sl].masked_fill_(mask_a[..., sl], 0.0)
                elif a is not aq[t]:
                    aq[t][..., sl].copy_(a[..., sl])
            if clip(qg):
                dg[t].masked_fill_(mask_g, 0.0)
            cn = torch.mul(fg[t], cx, out=cp[t])
            cn += ig[t] * ug[t]  # c = f * c + i * g
            c_dst = c_s[t] if valid is None else None
            cn = cn if qc is None else _fq(cn, qc, c_dst, mc[t])
            k = torch.tanh(cn, out=kp[t] if kp[t] is not None else tmp_k)
            if need:
                torch.addcmul(one, k, k, value=-1, out=dk[t])  # tanh'(c)
            if qt is not None:
                k = _fq(k, qt, k_q[t], mask_k if clip(qt) else None)
                if clip(qt):
                    dk[t].masked_fill_(mask_k, 0.0)
            else:
                k = k_q[t].copy_(k)
            hn = torch.mul(og[t], k, out=hp[t])  # o * tanh(c)
            if valid is None:
                hx = outs[t].copy_(hn) if qh is None else _fq(hn, qh, outs[t], mh[t])
                cx = cn if cn is c_s[t] else c_s[t].copy_(cn)
            else:
                hn = hn if qh is None else _fq(hn, qh, None, mh[t])
                vm = valid[t]  # (1, B, 1)
                torch.where(vm, hn, xp.new_zeros(()), out=outs[t])
                hx = torch.where(vm, hn, hx)
                cx = torch.where(vm, cn, cx, out=c_s[t])
        stats.update({"gates": g_pre, "cell": c_pre, "hidden": h_pre})
        if "sigmoid" in observe:
            stats["sigmoid"] = acts[..., :h3]
        if "tanh" in observe:
            stats["tanh"] = (acts[..., h3:], k_pre)
        if need:
            ctx.save_for_backward(w_hh, h0, c0, out)
            ctx.bufs = (actq, dgate, dtanh, kq, cs, m_c, m_h, valid)
        return out, hx.clone(), cx.clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):  # noqa: D102
        w_hh, h0, c0, out = ctx.saved_tensors
        actq, dgate, dtanh, kq, cs, m_c, m_h, valid = ctx.bufs
        d, n, b, g4 = actq.shape
        h = g4 // 4
        h2, h3 = 2 * h, 3 * h
        d_xp = actq.new_empty(d, n, b, g4)  # gradient of the gate pre-activations
        dgs, di, df, do, du = (_steps(d_xp, n), _steps(d_xp, n, 0, h), _steps(d_xp, n, h, h2),
                               _steps(d_xp, n, h2, h3), _steps(d_xp, n, h3))
        ig, fg, og, ug = (_steps(actq, n, 0, h), _steps(actq, n, h, h2),
                          _steps(actq, n, h2, h3), _steps(actq, n, h3))
        dgt, dth, k_q, c_s, d_o = (_steps(x, n) for x in (dgate, dtanh, kq, cs, d_out))
        mc, mh = _steps(m_c, n), _steps(m_h, n)
        dh = torch.zeros_like(h0) if d_hn is None else d_hn
        dc = torch.zeros_like(c0) if d_cn is None else d_cn
        for t in range(n - 1, -1, -1):
            dht = dh if d_o[t] is None else dh + d_o[t]
            if valid is not None:
                vm = valid[t]
                skip_h, skip_c = torch.where(vm, 0.0, dh), torch.where(vm, 0.0, dc)
                dht, dc = torch.where(vm, dht, 0.0), torch.where(vm, dc, 0.0)
            if mh[t] is not None:
                dht = dht.masked_fill(mh[t], 0.0)
            torch.mul(dht, k_q[t], out=do[t])
            dk = dht * og[t]
            dk *= dth[t]
            dk += dc
            if mc[t] is not None:
                dk.masked_fill_(mc[t], 0.0)
            torch.mul(dk, ug[t], out=di[t])
            torch.mul(dk, c_s[t - 1] if t > 0 else c0, out=df[t])
            torch.mul(dk, ig[t], out=du[t])
            dc = dk * fg[t]
            dg = dgs[t].mul_(dgt[t])
            if valid is not None:
                dh = torch.baddbmm(skip_h, dg, w_hh)  # (D, B, 4H) @ (D, 4H, H)
                dc += skip_c
            else:
                dh = torch.bmm(dg, w_hh)
        d_w = None
        if ctx.needs_input_grad[1]:
            h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # (D, T, B, H)
            d_w = torch.bmm(
                d_xp.reshape(d, n * b, g4).transpose(1, 2),  # (D, 4H, T*B)
                h_prev.reshape(d, n * b, h),  # (D, T*B, H)
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
    stack = lambda n: torch.stack(rec[n]) if rec[n] else None  # noqa: E731  (T, D, B, X)
    stats: dict = {n: stack(n) for n in ("gates", "sigmoid", "cell", "hidden")}
    if "tanh" in observe:
        stats["tanh"] = (stack("tanh"), stack("k"))
    return torch.stack(outs, 1), hx, cx, {k: v for k, v in stats.items() if k in observe}
