"""Fake-quant core: bit-exact math against a hand-written NumPy reference, gradients, state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from qat.quant import (
    FakeQuantizer,
    QuantSpec,
    disable_fake_quant,
    disable_observers,
    enable_fake_quant,
    format_report,
    quant_report,
    track_clipping,
)
from qat.quant import functional as F


# ---- hand-written reference ----------------------------------------------------------------
def ref_rows(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        return np.moveaxis(x, spec.axis, 0).reshape(x.shape[spec.axis], -1)
    return x.reshape(-1, spec.group_size)


def ref_qparams(rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    f32 = np.float32
    lo = np.minimum(rows.min(axis=1), f32(0))
    hi = np.maximum(rows.max(axis=1), f32(0))
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.symmetric:
        amax = np.maximum(-lo, hi) if spec.signed else hi
        scale = (amax / f32(qmax)).astype(f32)
        scale = np.maximum(scale, f32(spec.eps))
        zp = np.zeros_like(scale)
    else:
        scale = ((hi - lo) / f32(qmax - qmin)).astype(f32)
        scale = np.maximum(scale, f32(spec.eps))
        zp = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(f32)
    return scale, zp


def ref_fake_quant(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """out = (clamp(round(x * (1/s)) + zp, qmin, qmax) - zp) * s, per row, in float32."""
    rows = ref_rows(x, spec)
    scale, zp = ref_qparams(rows, spec)
    inv = (np.float32(1.0) / scale)[:, None]
    q = np.clip(np.rint(rows * inv) + zp[:, None], spec.quant_min, spec.quant_max)
    out = ((q - zp[:, None]) * scale[:, None]).astype(np.float32)
    if spec.granularity == "channel":
        moved = np.moveaxis(x, spec.axis, 0).shape
        return np.moveaxis(out.reshape(moved), 0, spec.axis)
    return out.reshape(x.shape)


GRANS = [
    dict(granularity="tensor"),
    dict(granularity="channel", axis=0),
    dict(granularity="channel", axis=1),
    dict(granularity="group", group_size=8),
]


@pytest.mark.parametrize("gran", GRANS, ids=lambda g: "-".join(map(str, g.values())))
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_bit_exact_against_reference(gran, bits, signed, symmetric):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, **gran)
    g = torch.Generator().manual_seed(bits * 7 + signed + 2 * symmetric)
    x = torch.randn(12, 32, generator=g) * 3 + 0.5
    fq = FakeQuantizer(spec, tuple(x.shape))
    y = fq(x)
    expected = torch.from_numpy(ref_fake_quant(x.numpy(), spec))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    scale, zp = ref_qparams(ref_rows(x.numpy(), spec), spec)
    torch.testing.assert_close(fq.scale, torch.from_numpy(scale), atol=0, rtol=0)
    torch.testing.assert_close(fq.zero_point.float(), torch.from_numpy(zp), atol=0, rtol=0)


@pytest.mark.parametrize("gran", GRANS, ids=lambda g: "-".join(map(str, g.values())))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu_kernel", "tensor_ops"])
def test_plain_ops_path_is_bit_exact_with_fused(gran, symmetric, kernel, monkeypatch):
    """qat's fake quant (the one-pass CPU kernel, or tensor ops) equals PyTorch's fused
    kernels: values and clipped-STE mask."""
    monkeypatch.setenv("QAT_CPU_KERNEL", kernel)
    spec = QuantSpec(bits=5, symmetric=symmetric, **gran)
    x = torch.randn(12, 32) * 2
    fq = FakeQuantizer(spec, tuple(x.shape))
    fq(x)
    fq.enable_observer(False)
    x = (x * 1.5).requires_grad_()  # some values leave the grid
    y = fq(x)
    g = torch.randn_like(x)
    (y * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    y_ref = F.fake_quantize_affine_fused(xr, fq.scale, fq.zero_point, spec)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, xr.grad, atol=0, rtol=0)
    assert (x.grad == 0).any() and (x.grad != 0).any()
    rows = F.to_rows(x.detach(), spec)
    plain = F.fake_quantize_affine_plain(
        rows, fq.scale[:, None], fq.zero_point[:, None].float(), spec.quant_min, spec.quant_max
    )
    torch.testing.assert_close(y, F.from_rows(plain, x, spec), atol=0, rtol=0)


def _fq_paths(spec: QuantSpec, batches: list[torch.Tensor], monkeypatch, limit: int):
    """Outputs, input gradients and grad_fn names of a fresh quantizer over ``batches``."""
    monkeypatch.setattr(F, "NOCLIP_MIN_NUMEL", limit)
    fq = FakeQuantizer(spec, tuple(batches[0].shape))
    out = []
    for x in batches:
        x = x.clone().requires_grad_()
        y = fq(x)
        (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
        fn = y.grad_fn
        while type(fn).__name__ in ("ViewBackward0", "ReshapeAliasBackward0"):
            fn = fn.next_functions[0][0]  # per-group: the quantizer works on a (rows, group) view
        out.append((y.detach(), x.grad, type(fn).__name__))
    return out


@pytest.mark.parametrize("gran", GRANS, ids=lambda g: "-".join(map(str, g.values())))
@pytest.mark.parametrize("observer", ["minmax", "ema"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_no_clip_path_is_bit_exact(gran, observer, symmetric, monkeypatch):
    """When the observed batch extremes show nothing clips, clamp and mask are skipped: the same
    values and gradients as the clamping path, bit for bit; batches that clip take that path."""
    spec = QuantSpec(bits=4, symmetric=symmetric, observer=observer, momentum=0.5, **gran)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(12, 32, generator=g) * m + 0.3 for m in (2.0, 1.0, 3.0, 0.5)]
    batches.append(batches[-1].clone())
    batches[-1][0, 0] = float("nan")  # non-finite extremes: the clamping path
    fast = _fq_paths(spec, batches, monkeypatch, 0)
    slow = _fq_paths(spec, batches, monkeypatch, 1 << 40)
    for (yf, gf, _), (ys, gs, name) in zip(fast, slow, strict=True):
        assert name == "_FakeQuantSTEBackward"
        torch.testing.assert_close(yf, ys, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(gf, gs, atol=0, rtol=0)
    names = [n for _, _, n in fast]
    assert names[0] == names[3] == "_RoundSTEBackward"  # first batch / inside the running range
    assert names[-1] == "_FakeQuantSTEBackward"
    if observer == "ema":  # a wider batch than the moving average clips: the mask is needed
        assert names[2] == "_FakeQuantSTEBackward" and (fast[2][1] == 0).any()


def test_qparams_numpy_and_tensor_paths_agree_bit_for_bit():
    """CPU float32 ranges take a NumPy path (less dispatch overhead): the same bits as the tensor
    ops, including overflowing, infinite and NaN bounds."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        rows = int(torch.randint(1, 40, (1,), generator=g))
        mag = float(10 ** (torch.rand(1, generator=g) * 46.5 - 8))
        lo = -torch.rand(rows, generator=g) * mag * (torch.rand(rows, generator=g) > 0.2)
        hi = torch.rand(rows, generator=g) * mag * (torch.rand(rows, generator=g) > 0.2)
        for i, v in ((0, float("inf")), (-1, float("nan"))):
            if trial % 7 == abs(i):
                hi[i] = v
        lo[0] = float("-inf") if trial % 11 == 0 else lo[0]
        spec = QuantSpec(bits=2 + trial % 7, symmetric=trial % 2 == 0, signed=trial % 3 != 1)
        s_np, z_np = F.calc_qparams(lo, hi, spec)
        s_t, z_t = F.calc_qparams_tensor(lo, hi, spec)
        torch.testing.assert_close(s_np, s_t, atol=0, rtol=0)
        assert z_np.dtype == z_t.dtype == torch.int32 and torch.equal(z_np, z_t)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_holds_matches_elementwise_check(symmetric):
    spec = QuantSpec(bits=3, symmetric=symmetric, signed=symmetric)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(64, generator=g) * float(torch.rand(1, generator=g) * 4)
        scale = torch.rand(1, generator=g) * 0.5 + 0.05
        zp = torch.randint(0, 8, (1,), generator=g).float()
        z = None if symmetric else zp
        v = torch.round(x * (1.0 / scale)) + (0 if z is None else z)
        inside = bool(((v >= spec.quant_min) & (v <= spec.quant_max)).all())
        lo, hi = x.min().reshape(1), x.max().reshape(1)
        assert F.grid_holds(lo, hi, scale, z, spec) == inside
    nan = torch.tensor([float("nan")])
    assert not F.grid_holds(nan, nan, torch.ones(1), None, spec)


def test_percentile_observer_gives_no_extrema():
    x = torch.randn(8, 64)
    assert FakeQuantizer(QuantSpec(observer="percentile")).observe(x) is None
    lo, hi = FakeQuantizer(QuantSpec(observer="ema")).observe(x)
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4),
    QuantSpec(bits=3, symmetric=False, signed=False, granularity="channel"),
    QuantSpec(bits=6, granularity="group", group_size=8),
    QuantSpec(bits=4, estimator="lsq"),
    QuantSpec(bits=4, estimator="lsq_plus", symmetric=False),
    QuantSpec(bits=4, estimator="pact", signed=False),
])
def test_idempotent_and_on_grid(spec):
    x = torch.randn(12, 32) * 2
    fq = FakeQuantizer(spec, tuple(x.shape))
    y = fq(x)
    fq.enable_observer(False)
    torch.testing.assert_close(fq(y), y, atol=0, rtol=0)
    scale, zp = fq.qparams()
    codes = F.to_rows(y, spec) / scale[:, None] + zp[:, None]  # every estimator: qparams' grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= spec.quant_min and codes.round().max() <= spec.quant_max


# ---- gradients -------------------------------------------------------------------------------
def test_clipped_ste_gradient_is_mask():
    spec = QuantSpec(bits=4, estimator="clipped_ste")
    fq = FakeQuantizer(spec)
    fq(torch.linspace(-1, 1, 100))  # range [-1, 1]
    fq.enable_observer(False)
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    fq(x).sum().backward()
    s = float(fq.scale)
    v = torch.round(x.detach() * (1 / s))
    inside = (v >= spec.quant_min) & (v <= spec.quant_max)
    torch.testing.assert_close(x.grad, inside.float(), atol=0, rtol=0)
    assert 0 < inside.sum() < x.numel()


def test_plain_ste_gradient_is_identity():
    fq = FakeQuantizer(QuantSpec(bits=4, estimator="ste"))
    fq(torch.linspace(-1, 1, 100))
    fq.enable_observer(False)
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    fq(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), atol=0, rtol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_lsq_gradients_match_paper(granularity):
    spec = QuantSpec(bits=3, estimator="lsq", granularity=granularity)
    x0 = torch.randn(4, 50) * 2
    fq = FakeQuantizer(spec, tuple(x0.shape))
    fq(x0)
    with torch.no_grad():
        fq.scale.mul_(0.5)  # force some clipping
    x = x0.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    (fq(x) * dy).sum().backward()
    s = fq.scale.detach().view(-1, 1) if granularity == "channel" else fq.scale.detach()
    v = x0 / s
    qn, qp = spec.quant_min, spec.quant_max
    inside = (v >= qn) & (v <= qp)
    g = 1.0 / math.sqrt((x0.numel() / fq.scale.numel()) * qp)
    dx = dy * inside
    ds_elem = dy * torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp).round()) * g
    ds = ds_elem.sum() if granularity == "tensor" else ds_elem.sum(dim=1)
    torch.testing.assert_close(x.grad, dx, atol=0, rtol=0)
    torch.testing.assert_close(fq.scale.grad.reshape(-1), ds.reshape(-1), atol=1e-5, rtol=1e-5)


def test_lsq_plus_offset_gradient():
    """LSQ+ quantizes on the integer grid of z = round(-offset / s); the offset's gradient is
    g where x falls outside that grid (Bhalgat et al.), the scale's the clipping bound there."""
    spec = QuantSpec(bits=3, estimator="lsq_plus", symmetric=False)
    x0 = torch.randn(200) + 1
    fq = FakeQuantizer(spec)
    fq(x0)
    with torch.no_grad():
        fq.scale.mul_(0.6)
        fq.offset.add_(0.37 * fq.scale)  # off the grid: z rounds it
    x = x0.clone().requires_grad_(True)
    dy = torch.randn_like(x0)
    (fq(x) * dy).sum().backward()
    s, beta = fq.scale.detach(), fq.offset.detach()
    z = torch.round(-beta / s).clamp(spec.quant_min, spec.quant_max)
    v = x0 / s
    lo, hi = spec.quant_min - z, spec.quant_max - z
    outside = (v < lo) | (v > hi)
    g = 1.0 / math.sqrt(x0.numel() * spec.quant_max)
    torch.testing.assert_close(fq.offset.grad, ((dy * outside).sum() * g).reshape(1), atol=1e-5,
                               rtol=0)
    bound = torch.where(v < lo, float(spec.quant_min), float(spec.quant_max))
    ds = (dy * torch.where(outside, bound, v.round() - v)).sum() * g
    torch.testing.assert_close(fq.scale.grad, ds.reshape(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, dy * ~outside, atol=0, rtol=0)
    y = fq(x0).detach()  # on the integer grid: (codes - z) * s, and 0 maps to 0
    torch.testing.assert_close(y, torch.clamp(v.round(), lo, hi) * s, atol=0, rtol=0)
    assert float(fq(torch.zeros(1))) == 0.0 and outside.any()


def test_asymmetric_lsq_applies_the_zero_point():
    """Bug: asymmetric LSQ ignored the observer's zero point in training (an unsigned grid
    clipped every negative input to 0) while qparams() and export used it."""
    spec = QuantSpec(bits=8, estimator="lsq", symmetric=False, signed=False)
    fq = FakeQuantizer(spec)
    x = torch.linspace(-1.0, 3.0, 401)
    y = fq(x)
    s, zp = fq.qparams()
    assert int(zp) == 64  # [-1, 3] on 0..255
    ref = (torch.clamp(torch.round(x * (1.0 / s)) + zp, 0, 255) - zp) * s
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    assert float(y.min()) < -0.99
    with torch.no_grad():
        fq.scale.mul_(0.5)  # learned scale: the zero point stays, the range shrinks around it
    xg = x.clone().requires_grad_(True)
    dy = torch.rand_like(x)
    (fq(xg) * dy).sum().backward()
    s2 = fq.scale.detach()
    v = x / s2
    lo, hi = 0 - 64, 255 - 64
    inside = (v >= lo) & (v <= hi)
    g = 1.0 / math.sqrt(x.numel() * 255)
    ds = (dy * torch.where(inside, v.round() - v, torch.clamp(v.round(), lo, hi))).sum() * g
    torch.testing.assert_close(fq.scale.grad, ds.reshape(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad, dy * inside, atol=0, rtol=0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_pact_gradients_match_the_forward(signed: bool, narrow: bool) -> None:
    """Bug: signed PACT clipped at qmin * alpha / qmax = -128/127 alpha in the forward but took
    the gradient at -alpha. The forward is y = clamp(round(x / s), qmin, qmax) * s with
    s = alpha / qmax, so dy/dalpha = 1 above alpha, qmin / qmax below qmin * s, 0 inside."""
    if narrow and not signed:
        pytest.skip("narrow_range needs signed")
    spec = QuantSpec(bits=8, estimator="pact", signed=signed, narrow_range=narrow)
    fq = FakeQuantizer(spec)
    fq(torch.tensor([-1.0, 1.0]))  # alpha = 1
    assert float(fq.alpha.detach()) == 1.0
    qmin, qmax = spec.quant_min, spec.quant_max
    s = 1.0 / qmax
    lo = qmin * s if signed else 0.0
    x = torch.cat([torch.linspace(-2, 2, 81), torch.tensor([-1.0 - 0.5 / qmax, -1.0 - 0.2 * s])])
    xr = x.clone().requires_grad_(True)
    dy = torch.rand_like(x)
    y = fq(xr)
    (y * dy).sum().backward()
    above = x >= 1.0
    below = x <= lo if signed else x < 0
    expect = (dy * above).sum() + (dy * below).sum() * (qmin / qmax)
    torch.testing.assert_close(fq.alpha.grad, expect.reshape(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xr.grad, dy * ~(above | below), atol=0, rtol=0)
    assert float(y.detach().min()) == pytest.approx(lo, abs=1e-7)
    # the forward itself: clipped values move with alpha at exactly those rates
    with torch.no_grad():
        fq.alpha.fill_(1.25)
        y2 = fq(x)
    up, down = x >= 1.25, x <= 1.25 * lo  # clipped under both alphas
    clipped = up | down
    slope = (y2 - y.detach())[clipped] / 0.25
    want = torch.where(up, 1.0, qmin / qmax)[clipped]
    torch.testing.assert_close(slope, want, atol=1e-4, rtol=0)


# ---- ternary / binary --------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_matches_twn(granularity):
    spec = QuantSpec(bits=2, mode="ternary", granularity=granularity)
    w = torch.randn(6, 40)
    y = FakeQuantizer(spec, tuple(w.shape))(w)
    rows = w.reshape(1, -1) if granularity == "tensor" else w
    for r_w, r_y in zip(rows, y.reshape(rows.shape), strict=True):
        delta = 0.7 * r_w.abs().mean()
        keep = r_w.abs() > delta
        alpha = r_w.abs()[keep].mean()
        torch.testing.assert_close(r_y, torch.sign(r_w) * keep * alpha, atol=0, rtol=1e-6)
    assert y.unique().numel() <= (3 if granularity == "tensor" else 3 * 6)


def test_binary_sign_times_mean_abs_per_channel():
    spec = QuantSpec(bits=1, mode="binary", granularity="channel")
    w = torch.randn(5, 33)
    w[0, 0] = 0.0
    y = FakeQuantizer(spec, tuple(w.shape))(w)
    expect = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(y, expect, atol=0, rtol=0)


def test_learned_ternary_scale_gets_gradient():
    spec = QuantSpec(bits=2, mode="ternary", ternary_scale="learned", granularity="channel")
    w = torch.randn(4, 30, requires_grad=True)
    fq = FakeQuantizer(spec, (4, 30))
    fq(w).sum().backward()
    levels, _ = F.ternarize(w, spec)
    torch.testing.assert_close(fq.scale.grad, levels.sum(dim=1), atol=0, rtol=0)


# ---- observers -----------------------------------------------------------------------------
def test_observers_ignore_non_finite_and_ema_formula():
    spec = QuantSpec(observer="ema", momentum=0.25)
    fq = FakeQuantizer(spec)
    fq(torch.tensor([-1.0, 2.0, float("nan")]))
    fq(torch.tensor([-3.0, 6.0, float("inf"), -float("inf")]))
    fq(torch.tensor([float("nan")]))  # nothing finite: unchanged
    assert float(fq.observer.min_val) == -1.0 + 0.25 * (-3.0 + 1.0)
    assert float(fq.observer.max_val) == 2.0 + 0.25 * (6.0 - 2.0)
    assert int(fq.observer.count) == 2


def test_percentile_and_mse_observers_clip_outliers():
    x = torch.cat([torch.randn(10000), torch.tensor([100.0])])
    mm = FakeQuantizer(QuantSpec(bits=4))
    pc = FakeQuantizer(QuantSpec(bits=4, observer="percentile", percentile=99.9))
    mse = FakeQuantizer(QuantSpec(bits=4, observer="mse"))
    errs = {}
    for name, fq in [("minmax", mm), ("percentile", pc), ("mse", mse)]:
        errs[name] = float((fq(x) - x).pow(2).mean())
    expected_hi = x.kthvalue(int(round(0.999 * x.numel()))).values
    assert float(pc.observer.max_val) == float(expected_hi)
    assert errs["mse"] < errs["minmax"] and errs["percentile"] < errs["minmax"]


def test_per_channel_observer_skips_non_finite_rows():
    fq = FakeQuantizer(QuantSpec(granularity="channel"), (3, 4))
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [float("nan")] * 4, [3.0, 1.0, float("inf"), 2.0]])
    fq(x)
    assert torch.isfinite(fq.scale).all() and (fq.scale > 0).all()
    assert float(fq.observer.max_val[2]) == 3.0


# ---- state ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    QuantSpec(granularity="channel", observer="ema"),
    QuantSpec(estimator="lsq_plus", symmetric=False),
    QuantSpec(estimator="pact", signed=False),
    QuantSpec(bits=2, mode="ternary", ternary_scale="learned", granularity="channel"),
])
def test_state_dict_round_trip(spec):
    fq = FakeQuantizer(spec, (8, 16))
    for _ in range(3):
        fq(torch.randn(8, 16))
    fq.enable_observer(False)
    buf = io.BytesIO()
    torch.save(fq.state_dict(), buf)
    buf.seek(0)
    fresh = FakeQuantizer(spec, (8, 16))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (k, a), (_, b) in zip(fq.state_dict().items(), fresh.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=k)
    assert not fresh.is_observing
    x = torch.randn(8, 16)
    torch.testing.assert_close(fresh(x), fq(x), atol=0, rtol=0)


def test_model_helpers_and_report():
    model = torch.nn.Sequential(torch.nn.Identity())
    model.a = FakeQuantizer(QuantSpec(bits=4))
    model.b = FakeQuantizer(QuantSpec(bits=8, granularity="channel"), (3, 5))
    disable_observers(model)
    disable_fake_quant(model)
    assert not model.a.is_observing and not model.b.is_fake_quant
    x = torch.randn(3, 5)
    assert torch.equal(model.a(x), x)
    enable_fake_quant(model)
    model.a.enable_observer(True)
    with track_clipping(model):
        model.a(torch.linspace(-1, 1, 50))
        model.a.enable_observer(False)
        model.a(torch.linspace(-2, 2, 50))
    rows = {r.name: r for r in quant_report(model)}
    assert rows["a"].bits == 4 and rows["b"].granularity == "channel"
    assert 0.4 < rows["a"].clip_fraction < 0.6
    assert "a" in format_report(list(rows.values()))


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("bits", 0), ("bits", 9), ("bits", 4.0), ("granularity", "row"), ("observer", "hist"),
    ("estimator", "dorefa"), ("mode", "quaternary"), ("momentum", 0.0), ("momentum", 1.5),
    ("percentile", 30.0), ("mse_grid", 1), ("group_size", 0), ("eps", 0.0), ("signed", "yes"),
    ("ternary_scale", "x"), ("axis", 1.5),
])
def test_invalid_field_names_field(field, value):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}="):
        QuantSpec(**{field: value})


@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=1), "bits"),
    (dict(mode="ternary", bits=4), "bits"),
    (dict(mode="binary", bits=1, symmetric=False), "symmetric"),
    (dict(mode="binary", bits=1, estimator="lsq"), "estimator"),
    (dict(estimator="lsq_plus"), "estimator"),
    (dict(estimator="pact", granularity="channel"), "granularity"),
    (dict(narrow_range=True, signed=False), "narrow_range"),
])
def test_incompatible_options(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}="):
        QuantSpec(**kwargs)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="needs the tensor shape"):
        FakeQuantizer(QuantSpec(granularity="channel"))
    with pytest.raises(ValueError, match="group_size=128"):
        FakeQuantizer(QuantSpec(granularity="group"), (4, 100))
    with pytest.raises(ValueError, match="axis=3"):
        FakeQuantizer(QuantSpec(granularity="channel", axis=3), (4, 100))
    with pytest.raises(ValueError, match="no field 'bitz'"):
        QuantSpec.from_any({"bitz": 3})


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus", "pact"])
def test_paused_learnable_quantizer_waits_for_statistics(estimator):
    """Bug: with its observer paused, an uninitialised learnable quantizer still observed its
    first fake-quantized input and started its scale from it (e.g. a validation batch)."""
    fq = FakeQuantizer(QuantSpec(estimator=estimator, symmetric=False, signed=False))
    fq.enable_observer(False)
    x = torch.randn(100) * 50
    assert torch.equal(fq(x), x)  # nothing to quantize with yet: passes through
    assert int(fq.observer.count) == 0 and int(fq.initialized[0]) == 0
    fq.enable_observer(True)
    fq(torch.rand(100))  # the first observed batch sets the range, then learning starts
    assert int(fq.initialized[0]) == 1 and float(fq.qparams()[0]) * 255 <= 1.0 + 1e-6


def test_paused_learnable_lstm_slot_is_not_fed():
    from qat.nn import LayerQuantConfig, QuantLSTM

    spec = QuantSpec(estimator="lsq", symmetric=False, signed=False)
    lstm = QuantLSTM(4, 3, qconfig=LayerQuantConfig(slots={"gates": spec}))
    for q in (lstm.gates_quant, lstm.input_quant):
        q.enable_observer(False)
    lstm(torch.randn(5, 2, 4) * 30)
    assert int(lstm.gates_quant.observer.count) == 0
    assert int(lstm.gates_quant.initialized[0]) == 0


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "ema"])
def test_weight_range_follows_the_current_weight(observer):
    """Bug: weight observers kept a min / max over the whole history, so a weight's scale
    could only grow. A weight quantizer now describes the current weight (``ema``: a moving
    average towards it); activation quantizers keep accumulating."""
    from torch import nn

    from qat.nn import LayerQuantConfig, QuantLinear

    spec = QuantSpec(bits=8, observer=observer, granularity="channel", mse_grid=20)
    torch.manual_seed(0)
    lin = QuantLinear.from_float(nn.Linear(16, 4), LayerQuantConfig(weight=spec))
    x = torch.randn(3, 16)
    lin(x)
    s0 = lin.weight_quant.qparams()[0].clone()
    a0 = lin.input_quant.qparams()[0].clone()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    lin(x * 0.5)
    s1 = lin.weight_quant.qparams()[0]
    if observer == "ema":
        assert bool((s1 < s0).all()) and bool((s1 > 0.5 * s0).all())
    else:
        torch.testing.assert_close(s1, 0.5 * s0, rtol=1e-5, atol=0)
    assert float(lin.input_quant.qparams()[0]) >= 0.99 * float(a0)  # activations: history


def test_exact_div_is_a_true_division():
    """CUDA divides a tensor by a Python number as t * (1 / k) (one ulp off at times); the
    qparams use a true division on every device (checked on CUDA in tests/test_gpu.py)."""
    t = torch.tensor([1.0, 3.0, 7.0, 1e-30, 3.4e38], dtype=torch.float32)
    for k in (127, 255, 15, 7):
        ref = torch.from_numpy(t.numpy() / np.float32(k))
        assert torch.equal(F.exact_div(t, k), ref)
    # where the reciprocal product differs from the quotient, exact_div keeps the quotient
    x = torch.arange(1, 20000, dtype=torch.float32) * 0.37
    rec = x * torch.tensor(1 / 255, dtype=torch.float32)
    assert not torch.equal(rec, x / 255) and torch.equal(F.exact_div(x, 255), x / 255)


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_strided_input_same_values_gradients_and_state_contiguous_output(observer, symmetric,
                                                                           clip):
    """A strided view (a transposed embedding, permuted attention heads) is read as it lies:
    values, gradients and observer state equal those of its contiguous copy, bit for bit, and
    the output is contiguous (what the next matmul / conv wants) for fixed-scale per-tensor
    quantizers; the grid-check path and the clamping path alike."""
    spec = QuantSpec(bits=6, symmetric=symmetric, signed=symmetric, observer=observer,
                     momentum=0.3)
    base = torch.randn(4, 40, 300) * 2  # (B, T, D) -> (B, D, T) view: 48000 elements
    a, b = FakeQuantizer(spec), FakeQuantizer(spec)
    for step in range(3):
        x = (base * (1 + step)).transpose(1, 2)
        if clip and step:
            a.enable_observer(False)
            b.enable_observer(False)
        xs, xc = x.clone().requires_grad_(), x.contiguous().requires_grad_()
        assert not x.is_contiguous()
        ys = a(xs.transpose(1, 2).transpose(1, 2))  # the same strided view, as a leaf's view
        yc = b(xc)
        g = torch.randn_like(yc)
        (ys * g).sum().backward()
        (yc * g).sum().backward()
        torch.testing.assert_close(ys, yc, atol=0, rtol=0)
        torch.testing.assert_close(xs.grad, xc.grad, atol=0, rtol=0)
        assert ys.is_contiguous() == a.takes_strided
        for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(u, v, atol=0, rtol=0, equal_nan=True, msg=k)
    assert a.takes_strided and not FakeQuantizer(QuantSpec(estimator="lsq")).takes_strided
