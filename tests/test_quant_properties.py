"""Property tests: any valid spec on any tensor gives finite positive scales and no crash."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qat.quant import FakeQuantizer, QuantSpec
from qat.quant import functional as F


@st.composite
def specs(draw) -> QuantSpec:
    mode = draw(st.sampled_from(["int", "int", "int", "ternary", "binary"]))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    if mode == "ternary":
        return QuantSpec(bits=2, mode="ternary", granularity=gran, group_size=4,
                         ternary_scale=draw(st.sampled_from(["closed_form", "learned"])))
    if mode == "binary":
        return QuantSpec(bits=1, mode="binary", granularity=gran, group_size=4)
    estimator = draw(st.sampled_from(["ste", "clipped_ste", "lsq", "lsq_plus", "pact"]))
    symmetric = estimator != "lsq_plus" and draw(st.booleans())
    signed = draw(st.booleans())
    bits = draw(st.integers(2, 8))
    if estimator == "pact":
        gran = "tensor"
    return QuantSpec(
        bits=bits, signed=signed, symmetric=symmetric, granularity=gran, group_size=4,
        narrow_range=signed and draw(st.booleans()), estimator=estimator,
        observer=draw(st.sampled_from(["minmax", "ema", "percentile", "mse"])), mse_grid=8,
    )


SPECIAL = [0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, 1e-45, 3e38, float("nan"),
           float("inf"), float("-inf")]


@st.composite
def tensors(draw) -> torch.Tensor:
    rows = draw(st.integers(0, 5))
    cols = 4 * draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["random", "constant", "zeros", "special", "scaled"]))
    if kind == "constant":
        x = torch.full((rows, cols), draw(st.sampled_from(SPECIAL + [3.5])))
    elif kind == "zeros":
        x = torch.zeros(rows, cols)
    elif kind == "special":
        vals = draw(st.lists(st.sampled_from(SPECIAL), min_size=rows * cols,
                             max_size=rows * cols))
        x = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)
    else:
        seed = draw(st.integers(0, 2**16))
        mag = draw(st.sampled_from([1e-20, 1e-6, 1.0, 1e6, 1e20])) if kind == "scaled" else 1.0
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * mag
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return x.to(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), x=tensors(), observe_twice=st.booleans())
def test_any_spec_any_tensor(spec: QuantSpec, x: torch.Tensor, observe_twice: bool):
    fq = FakeQuantizer(spec, (max(x.shape[0], 1), x.shape[1]))
    xin = x.clone().requires_grad_(x.numel() > 0)
    y = fq(xin)
    if observe_twice:
        y = fq(xin)
    assert y.shape == x.shape and y.dtype == x.dtype
    scale, zp = fq.qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all(), scale
    assert (zp >= spec.quant_min).all() and (zp <= spec.quant_max).all()
    if not x.numel():
        return
    yf = y.float()
    assert torch.isfinite(yf[torch.isfinite(x.float())]).all()
    if torch.isfinite(yf).all():
        yf.sum().backward()
    if spec.mode == "int" and spec.estimator in ("ste", "clipped_ste"):
        steps = F.to_rows(yf.detach(), spec) / scale[:, None]
        codes = steps + zp[:, None]
        ok = torch.isfinite(codes)
        # bfloat16 keeps 8 significant bits: y / scale is exact up to 2**-8 relative error
        tol = 1e-3 if x.dtype == torch.float32 else steps.abs().clamp_min(1) / 128
        err = (codes - codes.round()).abs()
        assert torch.all((err <= tol)[ok]), "output off the grid"


def test_bfloat16_equals_float32_path_rounded():
    spec = QuantSpec(bits=8, granularity="channel")
    x = torch.randn(4, 16).bfloat16()
    b = FakeQuantizer(spec, (4, 16))(x)
    a = FakeQuantizer(spec, (4, 16))(x.float())
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a.bfloat16(), atol=0, rtol=0)
