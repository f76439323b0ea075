"""Fuzzing every quantized wrapper: random specs, shapes and contents (float32 / bfloat16; NaN,
inf, constant, tiny and huge values). No crash, finite scales, observers free of NaN / inf, and
outputs on the grid wherever an output quantizer is set."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qat.nn import (
    QuantConv1d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
)
from qat.nn.config import LayerQuantConfig
from qat.nn.lstm import QuantLSTM
from qat.quant import FakeQuantizer, QuantSpec, quantizers
from qat.quant import functional as F

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = [0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, 1e-45, 3e38, float("nan"), float("inf"),
           float("-inf")]
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def weight_specs(draw) -> QuantSpec | None:
    mode = draw(st.sampled_from(["int", "int", "int", "ternary", "binary", "off"]))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    if mode == "off":
        return None
    if mode == "ternary":
        return QuantSpec(bits=2, mode="ternary", granularity=gran, group_size=4,
                         ternary_scale=draw(st.sampled_from(["closed_form", "learned"])))
    if mode == "binary":
        return QuantSpec(bits=1, mode="binary", granularity=gran, group_size=4)
    est = draw(st.sampled_from(["ste", "clipped_ste", "lsq", "pact"]))
    return QuantSpec(bits=draw(st.integers(2, 8)), granularity="tensor" if est == "pact" else gran,
                     group_size=4, estimator=est, narrow_range=draw(st.booleans()),
                     observer=draw(st.sampled_from(["minmax", "ema", "percentile", "mse"])),
                     mse_grid=4)


@st.composite
def act_specs(draw, grid: bool = False) -> QuantSpec | None:
    """Per-tensor activation specs; ``grid``: fixed-scale estimators only (for the grid check)."""
    if draw(st.integers(0, 4)) == 0:
        return None
    est = draw(st.sampled_from(["ste", "clipped_ste"] if grid else
                               ["ste", "clipped_ste", "lsq", "lsq_plus", "pact"]))
    symmetric = est != "lsq_plus" and draw(st.booleans())
    signed = draw(st.booleans())
    return QuantSpec(bits=draw(st.integers(2, 8)), signed=signed, symmetric=symmetric,
                     narrow_range=signed and draw(st.booleans()), estimator=est,
                     observer=draw(st.sampled_from(["minmax", "ema", "percentile", "mse"])),
                     mse_grid=4)


def configs(slots: tuple[str, ...] = ()) -> st.SearchStrategy[LayerQuantConfig]:
    return st.builds(
        lambda w, i, o, s: LayerQuantConfig(weight=w, input=i, output=o,
                                            slots=dict(zip(slots, s, strict=True))),
        weight_specs(), act_specs(), act_specs(grid=True),
        st.tuples(*[act_specs() for _ in slots]))


@st.composite
def contents(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape``: random, scaled (tiny / huge), constant or special values."""
    kind = draw(st.sampled_from(["random", "scaled", "constant", "special", "sprinkled"]))
    n = int(torch.tensor(shape).prod())
    if kind == "constant":
        return torch.full(shape, draw(st.sampled_from(SPECIAL + [3.5])))
    if kind == "special":
        return torch.tensor(draw(st.lists(st.sampled_from(SPECIAL), min_size=n, max_size=n)),
                            dtype=torch.float32).reshape(shape)
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "scaled":
        x = x * draw(st.sampled_from([1e-30, 1e-6, 1e6, 1e30]))
    if kind == "sprinkled":  # a few NaN / inf among normal values
        idx = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
        x.view(-1)[idx] = torch.tensor([draw(st.sampled_from(SPECIAL[-3:])) for _ in idx])
    return x


# ---- checks ---
def _capture_outputs(module: nn.Module) -> list[tuple[FakeQuantizer, torch.Tensor]]:
    """Hooks recording (output_quant, output) for every submodule that has an output quantizer."""
    seen: list[tuple[FakeQuantizer, torch.Tensor]] = []
    for m in module.modules():
        q = getattr(m, "output_quant", None)
        if isinstance(q, FakeQuantizer):
            def hook(mod, args, out, q=q):
                seen.append((q, (out[0] if isinstance(out, tuple) else out).detach()))
            m.register_forward_hook(hook)
    return seen


def _check(module: nn.Module, seen: list[tuple[FakeQuantizer, torch.Tensor]],
           dtype: torch.dtype) -> None:
    for name, q in quantizers(module):
        scale, zp = q.qparams()
        assert torch.isfinite(scale).all() and (scale > 0).all(), (name, scale)
        assert (zp >= q.spec.quant_min).all() and (zp <= q.spec.quant_max).all(), name
        if int(q.observer.count):
            ob = q.observer
            assert torch.isfinite(ob.min_val).all() and torch.isfinite(ob.max_val).all(), name
    for q, y in seen:
        if not q.is_fake_quant or q.spec.estimator not in ("ste", "clipped_ste"):
            continue
        scale, zp = q.qparams()
        steps = F.to_rows(y.float(), q.spec) / scale[:, None]
        codes = steps + zp[:, None]
        ok = torch.isfinite(codes)
        tol = 1e-3 if dtype == torch.float32 else steps.abs().clamp_min(1) / 128
        err = (codes - codes.round()).abs()
        assert torch.all((err <= tol)[ok]), "output off the grid"


def _run(module: nn.Module, dtype: torch.dtype, call, twice: bool) -> None:
    """Forward (twice: observers move), backward when finite, then the checks. bfloat16 runs as
    Lightning's ``bf16-mixed`` does: float32 module, bfloat16 inputs, CPU autocast."""
    seen = _capture_outputs(module)
    for _ in range(2 if twice else 1):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = call(module)
    y = out[0] if isinstance(out, tuple) else out
    if y.requires_grad and torch.isfinite(y.float()).all():
        y.float().sum().backward()
    _check(module, seen, dtype)


def _set_weights(module: nn.Module, w: torch.Tensor) -> None:
    """Fill every weight matrix with (a tiled copy of) ``w``'s values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "weight" in name and p.dim() >= 2:
                p.copy_(w.reshape(-1).repeat(p.numel() // w.numel() + 1)[: p.numel()]
                        .reshape(p.shape))


# ---- one test per wrapper ---
@SETTINGS
@given(cfg=configs(), x=contents((3, 5, 8)), w=contents((4, 8)), dtype=DTYPES, twice=st.booleans())
def test_fuzz_quant_linear(cfg, x, w, dtype, twice):
    lin = nn.Linear(8, 4)
    _set_weights(lin, w)
    q = QuantLinear.from_float(lin, cfg)
    _run(q, dtype, lambda m: m(x.to(dtype).requires_grad_()), twice)


@SETTINGS
@given(cfg=configs(), x=contents((2, 4, 7)), w=contents((4, 4, 2)), dtype=DTYPES,
       twice=st.booleans())
def test_fuzz_quant_conv1d(cfg, x, w, dtype, twice):
    conv = nn.Conv1d(4, 4, 2, padding=1)
    _set_weights(conv, w)
    q = QuantConv1d.from_float(conv, cfg)
    _run(q, dtype, lambda m: m(x.to(dtype).requires_grad_()), twice)


@SETTINGS
@given(cfg=configs(), w=contents((10, 8)), dtype=DTYPES, twice=st.booleans(),
       idx=st.lists(st.integers(0, 9), min_size=1, max_size=12))
def test_fuzz_quant_embedding(cfg, w, dtype, twice, idx):
    emb = nn.Embedding(10, 8, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(w)
    q = QuantEmbedding.from_float(emb, cfg.replace(input=None))
    _run(q, dtype, lambda m: m(torch.tensor(idx).reshape(1, -1)), twice)


@SETTINGS
@given(cfg=configs(("q", "k", "v", "attn")), x=contents((2, 3, 8)), w=contents((8, 8)),
       dtype=DTYPES, twice=st.booleans(), masked=st.booleans())
def test_fuzz_quant_multihead_attention(cfg, x, w, dtype, twice, masked):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    _set_weights(mha, w)
    q = QuantMultiheadAttention.from_float(mha, cfg)
    kpm = torch.tensor([[False, False, True], [False, False, False]]) if masked else None

    def call(m):
        xi = x.to(dtype).requires_grad_()
        return m(xi, xi, xi, key_padding_mask=kpm)

    _run(q, dtype, call, twice)


@SETTINGS
@given(cfg=configs(("q", "k", "v", "attn")), x=contents((2, 3, 8)), w=contents((8, 8)),
       dtype=DTYPES, twice=st.booleans())
def test_fuzz_quant_transformer_encoder_layer(cfg, x, w, dtype, twice):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    _set_weights(layer, w)
    q = QuantTransformerEncoderLayer.from_float(layer, cfg)
    _run(q, dtype, lambda m: m(x.to(dtype).requires_grad_()), twice)


@SETTINGS
@given(cfg=configs(), x=contents((2, 5, 4)), w=contents((16, 4)), dtype=DTYPES,
       twice=st.booleans(), lengths=st.sampled_from([None, [5, 3]]), bi=st.booleans())
def test_fuzz_quant_lstm_fast(cfg, x, w, dtype, twice, lengths, bi):
    lstm = nn.LSTM(4, 4, batch_first=True, bidirectional=bi)
    _set_weights(lstm, w)
    q = QuantLSTM.from_float(lstm, cfg)
    assert q.path == "fast"
    _run(q, dtype, lambda m: m(x.to(dtype).requires_grad_(), lengths=lengths), twice)


@SETTINGS
@given(cfg=configs(("hidden", "gates", "sigmoid", "tanh", "cell")), x=contents((2, 4, 4)),
       w=contents((16, 4)), twice=st.booleans(), lengths=st.sampled_from([None, [4, 2]]))
def test_fuzz_quant_lstm_full(cfg, x, w, twice, lengths):
    lstm = nn.LSTM(4, 4, batch_first=True)
    _set_weights(lstm, w)
    q = QuantLSTM.from_float(lstm, cfg, force_full=True)
    assert q.path == "full"
    _run(q, torch.float32, lambda m: m(x.requires_grad_(), lengths=lengths), False)


@pytest.mark.parametrize("lengths", [None, [3, 2]])
def test_lstm_full_path_under_bfloat16_autocast(lengths):
    """The gate-by-gate cell runs in float32 under autocast: the float32 result, gradients too."""
    torch.manual_seed(0)
    q = QuantLSTM.from_float(nn.LSTM(4, 4, batch_first=True, bidirectional=True),
                             LayerQuantConfig(), force_full=True)
    x = torch.randn(2, 3, 4)
    lens = torch.tensor(lengths) if lengths else None
    q.eval()  # observers would move between the two calls otherwise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = q(x.requires_grad_(), lengths=lens)
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(x.grad).all()
    ref, _ = q(x.detach(), lengths=lens)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_module_cast_to_bfloat16():
    q = QuantLinear.from_float(nn.Linear(8, 4), LayerQuantConfig()).to(torch.bfloat16)
    y = q(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
