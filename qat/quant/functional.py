"""Fake-quantization math: quantization parameters, the affine grid and the gradient estimators.

All functions take and return plain tensors. Scales are 1-D with one entry per *row*, where a
tensor is seen as rows by :func:`to_rows` (one row per tensor, channel or group).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import cpu_kernel
from .spec import QuantSpec

__all__ = [
    "to_rows",
    "from_rows",
    "num_rows",
    "calc_qparams",
    "calc_qparams_tensor",
    "fake_quantize_affine",
    "fake_quantize_affine_plain",
    "fake_quantize_affine_fused",
    "fake_quantize",
    "grid_holds",
    "lsq_fake_quantize",
    "lsq_zero_point",
    "pact_fake_quantize",
    "ternarize",
    "binarize",
    "lsq_grad_scale",
    "exact_div",
]


# ---- viewing a tensor as rows that share a scale ------------------------------------------
def num_rows(spec: QuantSpec, shape: tuple[int, ...] | torch.Size | None) -> int:
    """How many scales a tensor of ``shape`` needs under ``spec``."""
    if spec.granularity == "tensor":
        return 1
    if shape is None:
        raise ValueError(
            f"QuantSpec.granularity={spec.granularity!r} needs the tensor shape at construction"
        )
    shape = tuple(shape)
    if spec.granularity == "channel":
        if not -len(shape) <= spec.axis < len(shape):
            raise ValueError(
                f"QuantSpec.axis={spec.axis} is invalid for a tensor of shape {shape}: allowed "
                f"{-len(shape)}..{len(shape) - 1}"
            )
        return shape[spec.axis]
    per_channel = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    channels = shape[0] if len(shape) > 1 else 1
    if per_channel % spec.group_size:
        raise ValueError(
            f"QuantSpec.group_size={spec.group_size} does not divide the {per_channel} elements "
            f"per output channel of a tensor of shape {shape}"
        )
    return channels * (per_channel // spec.group_size)


def to_rows(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` as (rows, elements): one row per scale."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        return x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    return x.reshape(-1, spec.group_size)  # (channels * groups, group_size)


def from_rows(rows: Tensor, like: Tensor, spec: QuantSpec) -> Tensor:
    """Inverse of :func:`to_rows`."""
    if spec.granularity == "channel":
        moved = like.movedim(spec.axis, 0).shape
        return rows.reshape(moved).movedim(0, spec.axis)
    return rows.reshape(like.shape)


def _row_view(v: Tensor, x: Tensor, spec: QuantSpec) -> Tensor:
    """Reshape a per-row vector so that it broadcasts against ``x`` itself (channel axis)."""
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return v.reshape(shape)
    return v  # per-tensor: shape (1,) broadcasts; per-group is applied on rows


def exact_div(t: Tensor, k: float) -> Tensor:
    """``t / k`` correctly rounded on every device: CUDA computes a tensor divided by a Python
    number as ``t * (1 / k)`` (PyTorch's div kernel), which can be one ulp off the CPU's
    quotient; dividing by a 0-dim tensor on ``t``'s device is a true division everywhere."""
    return t / torch.full((), k, dtype=t.dtype, device=t.device)


# ---- quantization parameters ---------------------------------------------------------------
def calc_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point from a range; the range always includes zero.

    Symmetric signed: scale = max|x| / quant_max, zero point 0. Symmetric unsigned: the range is
    [0, max], zero point 0. Asymmetric: scale = (max - min) / (quant_max - quant_min), zero point
    ``quant_min - round(min / scale)``. Scales are at least ``spec.eps`` and always finite.
    """
    if min_val.device.type == "cpu" and min_val.dtype == max_val.dtype == torch.float32 and \
            not torch.compiler.is_compiling():
        scale, zp = _qparams_numpy(min_val.detach().numpy(), max_val.detach().numpy(), spec)
        return torch.from_numpy(scale), torch.from_numpy(zp)
    return calc_qparams_tensor(min_val, max_val, spec)


def calc_qparams_tensor(min_val: Tensor, max_val: Tensor,
                        spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """:func:`calc_qparams` in tensor ops (any device and dtype; traceable by torch.compile)."""
    qmin, qmax = spec.quant_min, spec.quant_max
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi) if spec.signed else hi
        scale = exact_div(amax, qmax)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = exact_div(hi - lo, qmax - qmin)
    big = torch.finfo(torch.float32).max / 4
    scale = torch.nan_to_num(scale, nan=1.0, posinf=big).clamp(spec.eps, big).float()
    if not spec.symmetric:
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def _qparams_numpy(min_val: np.ndarray, max_val: np.ndarray,
                   spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """:func:`calc_qparams` in NumPy float32: the same IEEE operations in the same order (so the
    same bits), without the per-op dispatch cost that dominates for a handful of scales."""
    f32 = np.float32
    qmin, qmax = spec.quant_min, spec.quant_max
    big = f32(np.finfo(np.float32).max / 4)
    with np.errstate(all="ignore"):
        lo = np.minimum(min_val, f32(0.0))
        hi = np.maximum(max_val, f32(0.0))
        if spec.symmetric:
            amax = np.maximum(-lo, hi) if spec.signed else hi
            scale = amax / f32(qmax)
        else:
            scale = (hi - lo) / f32(qmax - qmin)
        nan = np.isnan(scale)
        if nan.any():
            scale = np.where(nan, f32(1.0), scale)
        scale = np.minimum(np.maximum(scale, f32(spec.eps)), big).astype(np.float32)  # inf: big
        if spec.symmetric:
            return scale, np.zeros(scale.shape, dtype=np.int32)
        zp = np.minimum(np.maximum(f32(qmin) - np.rint(lo / scale), f32(qmin)), f32(qmax))
        zp = zp.astype(np.int32)
    return scale, zp


# ---- fixed-scale affine fake quant ---------------------------------------------------------
def fake_quantize_affine_plain(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale, with broadcast scale."""
    inv = 1.0 / scale
    q = torch.clamp(torch.round(x * inv) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _scaled(x: Tensor, inv: Tensor) -> Tensor:
    """``x * inv`` in a new contiguous tensor, also when ``x`` is a strided view (one pass:
    no separate copy to make it contiguous first). ``x`` and ``inv`` are float32."""
    if x.is_contiguous():
        return x * inv
    if torch.compiler.is_compiling():  # the compiler plans the layout itself
        return (x * inv).contiguous()
    return torch.mul(x, inv, out=torch.empty_like(x, memory_format=torch.contiguous_format))


class _FakeQuantSTE(torch.autograd.Function):
    """Fixed-scale affine fake quant; gradient 1 inside the grid (clipped STE) or everywhere
    (STE). On the CPU one pass of :mod:`qat.quant.cpu_kernel`, elsewhere (or without it) plain
    tensor ops; both faster on CPU than ``torch.fake_quantize_per_*_affine`` (see
    ``scripts/bench_fake_quant.py``) and bit-identical to it on finite inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor | float | None, qmin: int, qmax: int,
                clip: bool) -> Tensor:
        ctx.clip = clip and ctx.needs_input_grad[0]
        lo, hi = (qmin, qmax) if zp is None else (qmin - zp, qmax - zp)
        fused = cpu_kernel.fake_quant(x, scale, lo, hi, mask=ctx.clip)
        if fused is not None:  # one pass on the CPU, the same values (see cpu_kernel)
            if ctx.clip:
                ctx.save_for_backward(fused[1])
            return fused[0]
        v = _scaled(x, scale.reciprocal()).round_()  # reciprocal() is what 1.0 / scale does
        # clamp(v + zp, qmin, qmax) - zp == clamp(v, qmin - zp, qmax - zp): v and zp are integers
        # (or v is beyond the grid either way), so the zero point costs no pass over x
        q = v.clamp(qmin, qmax) if zp is None else torch.clamp(v, lo, hi)
        if ctx.clip:
            ctx.save_for_backward(q == v)  # inside the grid: one pass, not two comparisons
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.clip:
            return grad, None, None, None, None, None
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


class _RoundSTE(torch.autograd.Function):
    """``round(x / s) * s`` with gradient 1: the fake quant of a tensor known to lie inside the
    grid (see :func:`grid_holds`), where clamp and the clipping mask change nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        fused = cpu_kernel.fake_quant(x, scale, -math.inf, math.inf, mask=False)
        if fused is not None:
            return fused[0]
        return _scaled(x, scale.reciprocal()).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# below this many elements the grid check costs more than the clamp and mask it saves
NOCLIP_MIN_NUMEL = 1 << 15


@torch.no_grad()
def grid_holds(lo: Tensor, hi: Tensor, scale: Tensor, zero_point: Tensor | None,
               spec: QuantSpec) -> bool:
    """True when every value in ``[lo, hi]`` (per row) rounds onto the integer grid, i.e. fake
    quant clips nothing. Exact: ``round(x * (1 / s))`` is monotone in ``x``, so the extremes of
    the batch decide; NaN or infinite extremes give False."""
    if lo.device.type == "cpu":  # NumPy float32: the same IEEE results, a tenth of the overhead
        t = (lo, hi, scale.float()) + (() if zero_point is None else (zero_point.float(),))
        lo_, hi_, s, *zp = (a.detach().numpy() for a in t)
        with np.errstate(all="ignore"):  # an overflow to inf is an answer, not a problem
            inv = np.float32(1.0) / s
            v_lo, v_hi = np.rint(lo_ * inv), np.rint(hi_ * inv)
        shift = zp[0] if zp else np.float32(0.0)
        return bool((v_lo >= spec.quant_min - shift).all() & (v_hi <= spec.quant_max - shift).all())
    inv = 1.0 / scale.float()
    v_lo, v_hi = torch.round(lo * inv), torch.round(hi * inv)
    shift = 0.0 if zero_point is None else zero_point.float()
    return bool(((v_lo >= spec.quant_min - shift) & (v_hi <= spec.quant_max - shift)).all())


def fake_quantize_affine_fused(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec
) -> Tensor:
    """The same fake quant (clipped STE) with PyTorch's fused kernels: a reference and a peer."""
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.granularity == "tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    if spec.granularity == "channel":
        axis = spec.axis % x.dim()
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    rows = x.reshape(-1, spec.group_size)  # (channels * groups, group_size)
    y = torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, qmin, qmax)
    return y.reshape(x.shape)


def fake_quantize_affine(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, clip_grad: bool = True,
    extrema: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Fixed-scale fake quant: clamp(round(x / s) + zp, qmin, qmax) - zp) * s per row.

    ``clip_grad``: the gradient is 1 inside the representable range and 0 outside (clipped STE);
    otherwise it is 1 everywhere (STE). ``extrema``: the exact per-row (min, max) of ``x`` when
    known (an observer just computed them); if nothing clips, clamp and mask are skipped (the
    same values and gradients, two to three fewer passes over ``x``).
    """
    dtype = x.dtype
    xf = x if dtype == torch.float32 else x.float()
    scale = scale.float()  # a module cast with .to(bfloat16) casts its scale buffers too
    zp = None if spec.symmetric else zero_point.float()
    inside = extrema is not None and x.numel() >= NOCLIP_MIN_NUMEL and grid_holds(
        extrema[0], extrema[1], scale, zp, spec)
    if spec.granularity == "group":
        rows = xf.reshape(-1, spec.group_size)  # (channels * groups, group_size)
        zr = zp[:, None] if zp is not None else None
        y = _RoundSTE.apply(rows, scale[:, None]) if inside else _FakeQuantSTE.apply(
            rows, scale[:, None], zr, spec.quant_min, spec.quant_max, clip_grad)
        y = y.reshape(x.shape)
    else:  # per-tensor: 0-dim scale, so that any shape (0-dim too) keeps its shape
        s = _row_view(scale, xf, spec) if spec.granularity == "channel" else scale.reshape(())
        if zp is None or spec.granularity == "channel":
            z = None if zp is None else _row_view(zp, xf, spec)
        else:  # one zero point: plain-number clamp bounds (on the CPU; else no host sync)
            host = zp.device.type == "cpu" and not torch.compiler.is_compiling()
            z = zp.item() if host else zp.reshape(())
        y = _RoundSTE.apply(xf, s) if inside else _FakeQuantSTE.apply(
            xf, s, z, spec.quant_min, spec.quant_max, clip_grad)
    return y if dtype == torch.float32 else y.to(dtype)


# ---- learnable scales ------------------------------------------------------------------------
def lsq_grad_scale(numel: int, num_scales: int, qmax: int) -> float:
    """Esser et al.: g = 1 / sqrt(N * Qp), N = elements sharing one scale."""
    n = max(numel // max(num_scales, 1), 1)
    return 1.0 / math.sqrt(n * max(qmax, 1))


def _sum_to(g: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient back to the shape of ``like``."""
    g = g.sum(dim=tuple(range(g.dim() - like.dim()))) if g.dim() > like.dim() else g
    pairs = enumerate(zip(g.shape, like.shape, strict=True))
    dims = [i for i, (a, b) in pairs if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


class _LSQ(torch.autograd.Function):
    """LSQ / LSQ+ on an integer grid with zero point ``z``:
    out = (clamp(round(x / s) + z, qmin, qmax) - z) * s
        = clamp(round(x / s), qmin - z, qmax - z) * s.

    ``z`` is None (symmetric LSQ), the observer's zero point (asymmetric LSQ: fixed, the learned
    scale moves the range around it), or, for LSQ+ (``offset`` given), ``round(-offset / s)``
    clamped to the grid: the learned offset snapped to a whole number of steps, so that the
    trained function is the one integer kernels compute and 0 stays exactly representable.
    Gradients (Esser et al.; Bhalgat et al. for the offset, which is treated as continuous):
    x: 1 inside the grid; s: round(v) - v inside, the clipping bound outside (LSQ+: in offset
    coordinates, qmin / qmax); offset: 1 outside the grid; s and offset scaled by ``g``.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, zp, qmin: int, qmax: int, g: float, eps: float):
        s = scale.abs().clamp_min(eps)
        z = _lsq_zero_point(s, offset, zp, qmin, qmax)
        v = x * (1.0 / s)
        if z is None:
            out = v.round_().clamp_(qmin, qmax)  # in place: one allocation
        else:
            out = torch.clamp(v.round_(), qmin - z, qmax - z)
        ctx.save_for_backward(x, scale, offset, zp)
        ctx.meta = (qmin, qmax, g, eps)
        return out.mul_(s)

    @staticmethod
    def backward(ctx, dy):
        x, scale, offset, zp = ctx.saved_tensors
        qmin, qmax, g, eps = ctx.meta
        s = scale.abs().clamp_min(eps)
        z = _lsq_zero_point(s, offset, zp, qmin, qmax)
        v = x * (1.0 / s)
        lo, hi = (qmin, qmax) if z is None else (qmin - z, qmax - z)
        inside = (v >= lo) & (v <= hi)
        dx = dy * inside
        q = torch.round(v)
        q = q.clamp_(qmin, qmax) if z is None else q.clamp_(lo, hi)
        q.sub_(v.mul_(inside))  # d out / d s per element (before g): round(v) - v inside, the
        if offset is not None:  # bound outside; LSQ+: d/ds of (bound * s + offset) = bound + z
            q.add_(z * ~inside)
        if scale.numel() == 1:
            ds = torch.vdot(dy.reshape(-1), q.reshape(-1)).reshape(1) * g
        else:
            ds = _sum_to(q.mul_(dy), scale) * g
        ds = ds.reshape(scale.shape) * torch.sign(scale)
        doff = None
        if offset is not None:
            doff = _sum_to(dy * (~inside), offset) * g
        return dx, ds, doff, None, None, None, None, None


def _lsq_zero_point(s: Tensor, offset: Tensor | None, zp: Tensor | None, qmin: int,
                    qmax: int) -> Tensor | None:
    """The integer zero point (as float) of LSQ+ (from the offset) or asymmetric LSQ."""
    if offset is not None:
        return torch.clamp(torch.round(-offset / s), qmin, qmax)
    return zp


def _broadcast_rows(p: Tensor, x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Pair ``x`` (possibly as rows) with a per-row parameter shaped to broadcast."""
    if spec.granularity == "group":
        return x.reshape(-1, spec.group_size), p.reshape(-1, 1)
    return x, _row_view(p, x, spec)


def lsq_zero_point(scale: Tensor, offset: Tensor | None, zero_point: Tensor,
                   spec: QuantSpec) -> Tensor:
    """The integer zero point LSQ / LSQ+ quantize with (int32, per row): 0 when symmetric,
    ``round(-offset / |s|)`` on the grid for LSQ+, else the stored (observer's) one."""
    if spec.symmetric:
        return torch.zeros_like(zero_point)
    if offset is None:
        return zero_point.clone()
    s = scale.detach().abs().clamp_min(spec.eps)
    z = _lsq_zero_point(s, offset.detach(), None, spec.quant_min, spec.quant_max)
    return z.to(torch.int32)


def lsq_fake_quantize(x: Tensor, scale: Tensor, spec: QuantSpec, offset: Tensor | None = None,
                      zero_point: Tensor | None = None) -> Tensor:
    """LSQ or LSQ+ fake quant with Esser et al.'s gradient scale (see :class:`_LSQ`).

    ``offset``: the LSQ+ offset (its zero point is derived from it); ``zero_point``: the fixed
    integer zero point of asymmetric LSQ (ignored with a symmetric spec or an offset)."""
    g = lsq_grad_scale(x.numel(), scale.numel(), spec.quant_max)
    xr, s = _broadcast_rows(scale, x, spec)
    off = _broadcast_rows(offset, x, spec)[1] if offset is not None else None
    zp = None
    if off is None and zero_point is not None and not spec.symmetric:
        zp = _broadcast_rows(zero_point.float(), x, spec)[1]
    y = _LSQ.apply(xr.float(), s, off, zp, spec.quant_min, spec.quant_max, g, spec.eps)
    return y.reshape(x.shape).to(x.dtype)


class _PACT(torch.autograd.Function):
    """PACT: y = clamp(round(x / s), qmin, qmax) * s with s = alpha / qmax, i.e. x clipped to
    [qmin * s, alpha] (unsigned: [0, alpha]; signed: [-(2^(b-1)) / (2^(b-1) - 1) * alpha,
    alpha], or [-alpha, alpha] with narrow_range) and quantized.

    Gradients follow that forward: x: 1 strictly inside (unsigned: x >= 0) and below alpha;
    alpha: 1 where x >= alpha, qmin / qmax where x <= qmin * s (signed grids)."""

    @staticmethod
    def forward(ctx, x, alpha, qmin: int, qmax: int, eps: float):
        s = exact_div(alpha.abs(), qmax).clamp_min(eps)
        q = torch.clamp(torch.round(x * (1.0 / s)), qmin, qmax)
        ctx.save_for_backward(x, alpha)
        ctx.meta = (qmin, qmax, eps)
        return q * s

    @staticmethod
    def backward(ctx, dy):
        x, alpha = ctx.saved_tensors
        qmin, qmax, eps = ctx.meta
        s = exact_div(alpha.abs(), qmax).clamp_min(eps)
        above = x >= s * qmax
        below = x <= s * qmin if qmin < 0 else x < 0
        dx = dy * ~(above | below)
        da = (dy * above).sum()
        if qmin < 0:
            da = da + (dy * below).sum() * (qmin / qmax)
        return dx, (da * torch.sign(alpha)).reshape(alpha.shape), None, None, None


def pact_fake_quantize(x: Tensor, alpha: Tensor, spec: QuantSpec) -> Tensor:
    """PACT fake quant with the gradients of its forward (see :class:`_PACT`). The grid's zero
    point is 0 whatever ``spec.symmetric`` says: PACT clips at 0 (unsigned) or around it."""
    return _PACT.apply(x.float(), alpha, spec.quant_min, spec.quant_max, spec.eps).to(x.dtype)


# ---- ternary and binary weights ----------------------------------------------------------------
def _weight_rows(w: Tensor, spec: QuantSpec) -> Tensor:
    return w.reshape(1, -1) if spec.granularity == "tensor" else to_rows(w, spec)


def _abs_rows(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(rows of w, |rows| with non-finite values as 0); float64 where float32 sums overflow."""
    rows = _weight_rows(w.detach().float(), spec)
    a = torch.where(torch.isfinite(rows), rows.abs(), 0.0)
    if not bool(torch.isfinite(a.sum(dim=1)).all()):
        a = a.double()
    return rows, a


def _finite_scale(alpha: Tensor, spec: QuantSpec) -> Tensor:
    big = torch.finfo(torch.float32).max / 4
    return torch.nan_to_num(alpha, nan=spec.eps, posinf=big).clamp(spec.eps, big)


def ternarize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """TWN: levels sign(w) * [|w| > 0.7 mean|w|] and the closed-form scale per row.

    Returns (levels in {-1, 0, 1} shaped like ``w``, per-row scale).
    """
    rows, a = _abs_rows(w, spec)
    delta = 0.7 * a.mean(dim=1, keepdim=True)
    keep = a > delta
    count = keep.sum(dim=1)
    alpha = ((a * keep).sum(dim=1) / count.clamp_min(1)).float()
    levels = torch.sign(torch.nan_to_num(rows)) * keep
    levels = levels.reshape(w.shape) if spec.granularity != "channel" else from_rows(
        levels, w, spec)
    return levels, _finite_scale(alpha, spec)


def binarize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """BWN: levels sign(w) (sign(0) = +1) and scale mean|w| per row."""
    rows, a = _abs_rows(w, spec)
    alpha = a.mean(dim=1).float()
    levels = torch.where(rows >= 0, 1.0, -1.0)
    levels = levels.reshape(w.shape) if spec.granularity != "channel" else from_rows(
        levels, w, spec)
    return levels, _finite_scale(alpha, spec)


class _ScaledLevels(torch.autograd.Function):
    """out = alpha * levels; STE to w (optionally clipped to |w| <= 1), exact gradient to alpha."""

    @staticmethod
    def forward(ctx, w, levels, alpha_b, clip: bool):
        ctx.save_for_backward(w if clip else None, levels)
        ctx.clip = clip
        ctx.alpha_shape = alpha_b.shape
        return levels * alpha_b

    @staticmethod
    def backward(ctx, dy):
        w, levels = ctx.saved_tensors
        dw = dy * (w.abs() <= 1) if ctx.clip else dy
        dalpha = _sum_to(dy * levels, torch.empty(ctx.alpha_shape))
        return dw, None, dalpha, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec,
                  extrema: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Fixed-scale fake quant for ``spec`` (int modes); estimator ``ste`` or ``clipped_ste``;
    ``extrema`` as in :func:`fake_quantize_affine`."""
    return fake_quantize_affine(x, scale, zero_point, spec, clip_grad=spec.estimator != "ste",
                                extrema=extrema)


def scaled_levels(w: Tensor, levels: Tensor, alpha: Tensor, spec: QuantSpec) -> Tensor:
    """alpha * levels with the straight-through gradient of the spec (ternary / binary)."""
    if spec.granularity == "tensor":
        a = alpha.reshape([1] * w.dim()) if w.dim() else alpha.reshape(())
    else:
        a = _row_view(alpha, w, spec) if spec.granularity == "channel" else alpha
    if spec.granularity == "group":
        rows = _ScaledLevels.apply(
            w.reshape(-1, spec.group_size), levels.reshape(-1, spec.group_size),
            alpha.reshape(-1, 1), spec.estimator == "clipped_ste",
        )
        return rows.reshape(w.shape).to(w.dtype)
    out = _ScaledLevels.apply(w, levels.to(w.dtype), a, spec.estimator == "clipped_ste")
    return out.to(w.dtype)
