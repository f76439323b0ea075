"""The recurrent loops of QuantLSTM's fused engine, forward and hand-written backward.

Plain tensor code (no autograd inside) in the TorchScript subset: :func:`loops` returns them
compiled with ``torch.jit.script`` (about 2x less per-step overhead on CPU) or, where scripting
is unavailable, as the same Python functions. Shapes and gate order are those of
:mod:`qat.nn.lstm_cell`; slot indices follow ``SLOTS``: 0 gates, 1 sigmoid, 2 tanh, 3 cell,
4 hidden. Slot i quantizes with ``qp[i]`` = (1/scale, scale, qmin - zero_point,
qmax - zero_point), the first two as 0-dim tensors.
"""

# No `from __future__ import annotations`: TorchScript reads the annotations at runtime.
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fused_forward", "fused_backward", "loops"]

def _fq_into(x: Tensor, q: tuple[Tensor, Tensor, float, float], out: Tensor,
             clipped: Tensor | None) -> Tensor:
    """out = clamp(round(x * inv), lo, hi) * scale; clipped = where the clamp acted.

    q = (inv, scale, lo, hi); ``inv`` and ``scale`` are 0-dim tensors of x's dtype (a Python
    float would be converted to a tensor at every call).
    """
    inv, scale, lo, hi = q
    if clipped is None:
        torch.mul(x, inv, out=out)
        return out.round_().clamp_(lo, hi).mul_(scale)
    v = torch.mul(x, inv).round_()
    torch.clamp(v, lo, hi, out=out)
    torch.ne(out, v, out=clipped)
    return out.mul_(scale)


def _row_range(x: Tensor, rng: Tensor, j: int, t: int) -> None:
    """rng[j, :, t] = min and max of each row of x (D, B, X)."""
    lo, hi = torch.aminmax(x, dim=-1)
    rng[j, 0, t].copy_(lo)
    rng[j, 1, t].copy_(hi)


def fused_forward(
    xp: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, valid: Tensor | None,
    qon: list[bool], qclip: list[bool], qp: list[tuple[Tensor, Tensor, float, float]],
    obs: list[int], need: bool,
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """Returns ([out, h_n, c_n], saved for backward, values for the observers).

    ``obs[i]``: 0 slot i is not observed, 1 record each row's (min, max) (range observers),
    2 keep every value. Values for the observers: per slot (gates, sigmoid, tanh(g), cell,
    hidden, tanh(c)) the (T, D, B, X) values before quantization or None, then the row ranges
    (6, 2, T, D, B) of the same sources (or None).
    """
    _GATES, _SIG, _TANH, _CELL, _HID = 0, 1, 2, 3, 4  # slot indices (SLOTS order)
    d, n, b, g4 = xp.shape[0], xp.shape[1], xp.shape[2], xp.shape[3]
    h = g4 // 4
    h2, h3 = 2 * h, 3 * h
    clip = [need and qon[i] and qclip[i] for i in range(5)]
    actq = xp.new_empty([d, n, b, g4])  # quantized i, f, o, g
    kq = xp.new_empty([d, n, b, h])  # quantized tanh(c)
    cs = xp.new_empty([d, n, b, h])  # cell state carried to the next step
    out = xp.new_empty([d, n, b, h])
    dgate: Tensor | None = None  # gate derivatives, zero where a quantizer clipped
    dtanh: Tensor | None = None  # tanh'(c), zero where the tanh quantizer clipped
    if need:
        dgate = xp.new_empty([d, n, b, g4])
        dtanh = xp.new_empty([d, n, b, h])
    m_c: Tensor | None = None
    m_h: Tensor | None = None
    if clip[_CELL]:
        m_c = torch.empty([d, n, b, h], dtype=torch.bool, device=xp.device)
    if clip[_HID]:
        m_h = torch.empty([d, n, b, h], dtype=torch.bool, device=xp.device)
    # values before quantization for the observers, time-major (T, D, B, X)
    g_pre: Tensor | None = xp.new_empty([n, d, b, g4]) if obs[_GATES] == 2 else None
    a_pre: Tensor | None = xp.new_empty([n, d, b, g4]) if obs[_SIG] == 2 or obs[_TANH] == 2 \
        else None
    k_pre: Tensor | None = xp.new_empty([n, d, b, h]) if obs[_TANH] == 2 else None
    c_pre: Tensor | None = xp.new_empty([n, d, b, h]) if obs[_CELL] == 2 else None
    h_pre: Tensor | None = xp.new_empty([n, d, b, h]) if obs[_HID] == 2 else None
    # row ranges of gates, sigmoid, tanh(g), tanh(c), cell, hidden: (source, min|max, T, D, B)
    rng: Tensor | None = xp.new_empty([6, 2, n, d, b]) if 1 in obs else None
    rg = [rng is not None and obs[i] == 1 for i in range(5)]
    g_buf, gq_buf, a_buf = xp.new_empty([d, b, g4]), xp.new_empty([d, b, g4]), xp.new_empty(
        [d, b, g4])
    k_buf, c_buf, h_buf = xp.new_empty([d, b, h]), xp.new_empty([d, b, h]), xp.new_empty([d, b, h])
    mask_a = torch.empty([d, b, g4], dtype=torch.bool, device=xp.device)
    mask_g = torch.empty([d, b, g4], dtype=torch.bool, device=xp.device)
    mask_k = torch.empty([d, b, h], dtype=torch.bool, device=xp.device)
    one = torch.ones([], dtype=xp.dtype, device=xp.device)
    zero = torch.zeros([], dtype=xp.dtype, device=xp.device)
    act_in_place = a_pre is None and not (qon[_SIG] or qon[_TANH])
    wt = w_hh.transpose(1, 2)  # (D, 4H, H) -> (D, H, 4H)
    hx, cx = h0, c0
    for t in range(n):
        gp = g_buf if g_pre is None else g_pre[t]
        gates = torch.baddbmm(xp[:, t], hx, wt, out=gp)  # (D, B, 4H)
        if rng is not None and rg[_GATES]:
            _row_range(gates, rng, 0, t)
        if qon[_GATES]:
            gates = _fq_into(gp, qp[_GATES], gp if g_pre is None else gq_buf,
                             mask_g if clip[_GATES] else None)
        aq = actq[:, t]
        a = aq if act_in_place else (a_buf if a_pre is None else a_pre[t])
        torch.sigmoid(gates[..., :h3], out=a[..., :h3])
        torch.tanh(gates[..., h3:], out=a[..., h3:])
        if rng is not None and rg[_SIG]:
            _row_range(a[..., :h3], rng, 1, t)
        if rng is not None and rg[_TANH]:
            _row_range(a[..., h3:], rng, 2, t)
        if dgate is not None:
            dg = dgate[:, t]
            torch.addcmul(a[..., :h3], a[..., :h3], a[..., :h3], value=-1.0,
                          out=dg[..., :h3])  # sigmoid' = s - s^2
            torch.addcmul(one, a[..., h3:], a[..., h3:], value=-1.0, out=dg[..., h3:])  # tanh'
            if clip[_GATES]:
                dg.masked_fill_(mask_g, 0.0)
        for slot, lo, hi in ((_SIG, 0, h3), (_TANH, h3, g4)):
            if qon[slot]:
                m = mask_a[..., lo:hi]
                _fq_into(a[..., lo:hi], qp[slot], aq[..., lo:hi], m if clip[slot] else None)
                if clip[slot] and dgate is not None:
                    dgate[:, t, :, lo:hi].masked_fill_(m, 0.0)
            elif not act_in_place:
                aq[..., lo:hi].copy_(a[..., lo:hi])
        cn = torch.mul(aq[..., h:h2], cx, out=c_buf if c_pre is None else c_pre[t])
        cn.add_(aq[..., :h] * aq[..., h3:])  # c = f * c + i * g
        if rng is not None and rg[_CELL]:
            _row_range(cn, rng, 4, t)
        if qon[_CELL]:
            cn = _fq_into(cn, qp[_CELL], cs[:, t] if valid is None else c_buf,
                          m_c[:, t] if m_c is not None else None)
        k = torch.tanh(cn, out=k_buf if k_pre is None else k_pre[t])
        if rng is not None and rg[_TANH]:
            _row_range(k, rng, 3, t)
        if dtanh is not None:
            torch.addcmul(one, k, k, value=-1.0, out=dtanh[:, t])  # tanh'(c)
        if qon[_TANH]:
            k = _fq_into(k, qp[_TANH], kq[:, t], mask_k if clip[_TANH] else None)
            if clip[_TANH] and dtanh is not None:
                dtanh[:, t].masked_fill_(mask_k, 0.0)
        else:
            k = kq[:, t].copy_(k)
        hn = torch.mul(aq[..., h2:h3], k, out=h_buf if h_pre is None else h_pre[t])  # o * k
        if rng is not None and rg[_HID]:
            _row_range(hn, rng, 5, t)
        mh = m_h[:, t] if m_h is not None else None
        if valid is None:
            hx = _fq_into(hn, qp[_HID], out[:, t], mh) if qon[_HID] else out[:, t].copy_(hn)
            cx = cs[:, t].copy_(cn) if not qon[_CELL] else cn
        else:
            if qon[_HID]:
                hn = _fq_into(hn, qp[_HID], h_buf, mh)
            vm = valid[t]  # (1, B, 1)
            torch.where(vm, hn, zero, out=out[:, t])
            hx = torch.where(vm, hn, hx)
            cx = torch.where(vm, cn, cx, out=cs[:, t])
    a_sig: Tensor | None = None
    a_tanh: Tensor | None = None
    if a_pre is not None:
        a_sig, a_tanh = a_pre[..., :h3], a_pre[..., h3:]
    return ([out, hx.clone(), cx.clone()], [actq, dgate, dtanh, kq, cs, m_c, m_h],
            [g_pre, a_sig, a_tanh, c_pre, h_pre, k_pre, rng])


def fused_backward(
    d_out: Tensor, d_hn: Tensor, d_cn: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
    out: Tensor, actq: Tensor, dgate: Tensor, dtanh: Tensor, kq: Tensor, cs: Tensor,
    m_c: Tensor | None, m_h: Tensor | None, valid: Tensor | None, need_w: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Gradients of (xp, w_hh, h0, c0) from those of (out, h_n, c_n)."""
    d, n, b, g4 = actq.shape[0], actq.shape[1], actq.shape[2], actq.shape[3]
    h = g4 // 4
    h2, h3 = 2 * h, 3 * h
    d_xp = actq.new_empty([d, n, b, g4])  # gradient of the gate pre-activations
    zero = torch.zeros([], dtype=actq.dtype, device=actq.device)
    dh, dc = d_hn, d_cn
    for i in range(n):
        t = n - 1 - i
        dht = dh + d_out[:, t]
        skip_h, skip_c = dh, dc
        if valid is not None:
            vm = valid[t]
            skip_h, skip_c = dh.masked_fill(vm, 0.0), dc.masked_fill(vm, 0.0)
            dht, dc = torch.where(vm, dht, zero), torch.where(vm, dc, zero)
        if m_h is not None:
            dht = dht.masked_fill(m_h[:, t], 0.0)
        aq, dg = actq[:, t], d_xp[:, t]
        torch.mul(dht, kq[:, t], out=dg[..., h2:h3])  # d o
        dk = dht * aq[..., h2:h3]
        dk.mul_(dtanh[:, t]).add_(dc)
        if m_c is not None:
            dk.masked_fill_(m_c[:, t], 0.0)
        torch.mul(dk, aq[..., h3:], out=dg[..., :h])  # d i
        torch.mul(dk, cs[:, t - 1] if t > 0 else c0, out=dg[..., h:h2])  # d f
        torch.mul(dk, aq[..., :h], out=dg[..., h3:])  # d g
        dc = dk * aq[..., h:h2]
        dg.mul_(dgate[:, t])
        if valid is not None:
            dh = torch.baddbmm(skip_h, dg, w_hh)  # (D, B, 4H) @ (D, 4H, H)
            dc.add_(skip_c)
        else:
            dh = torch.bmm(dg, w_hh)
    d_w: Tensor | None = None
    if need_w:
        h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # (D, T, B, H)
        d_w = torch.bmm(
            d_xp.reshape(d, n * b, g4).transpose(1, 2),  # (D, T*B, 4H) -> (D, 4H, T*B)
            h_prev.reshape(d, n * b, h),  # (D, T, B, H) -> (D, T*B, H)
        )
    return d_xp, d_w, dh, dc


_LOOPS: dict = {}


def loops(script: bool = True) -> tuple[Callable, Callable]:
    """(forward, backward) loops, TorchScript-compiled once if ``script`` and possible."""
    if not script:
        return fused_forward, fused_backward
    if "fns" not in _LOOPS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.x
                _LOOPS["fns"] = (torch.jit.script(fused_forward),
                                 torch.jit.script(fused_backward))
        except Exception as e:  # noqa: BLE001  (no TorchScript: the same code, uncompiled)
            warnings.warn(f"QuantLSTM: TorchScript unavailable ({e}); running eagerly",
                          stacklevel=2)
            _LOOPS["fns"] = (fused_forward, fused_backward)
    return _LOOPS["fns"]
