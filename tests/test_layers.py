"""QuantLinear / QuantConv1d / QuantEmbedding: float equivalence when off, fake-quant reference
when on, from_float / to_float and state_dict compatibility."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.nn import LayerQuantConfig, QuantConv1d, QuantEmbedding, QuantLinear
from qat.nn.config import default_act_spec, default_weight_spec
from qat.quant import FakeQuantizer, disable_fake_quant, disable_observers
from qat.quant.functional import calc_qparams, fake_quantize_affine

OFF = LayerQuantConfig(weight=None, input=None, output=None)


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def _float_and_inputs(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 7), torch.randn(4, 5, 12)
    if kind == "linear_nobias":
        return nn.Linear(12, 7, bias=False), torch.randn(4, 12)
    if kind == "conv":
        return nn.Conv1d(6, 8, 3, padding=1), torch.randn(4, 6, 20)
    if kind == "conv_circular_groups":
        return nn.Conv1d(6, 8, 5, padding=2, groups=2, dilation=1,
                         padding_mode="circular"), torch.randn(3, 6, 11)
    if kind == "conv_strided":  # (B, T, C) -> (B, C, T) view, as after an embedding
        return nn.Conv1d(6, 8, 3), torch.randn(4, 20, 6).transpose(1, 2)
    if kind == "embedding":
        return nn.Embedding(30, 8, padding_idx=0), torch.randint(0, 30, (4, 9))
    raise AssertionError(kind)


_WRAP = {"linear": QuantLinear, "linear_nobias": QuantLinear, "conv": QuantConv1d,
         "conv_circular_groups": QuantConv1d, "conv_strided": QuantConv1d,
         "embedding": QuantEmbedding}
KINDS = list(_WRAP)


def _run(module: nn.Module, x: torch.Tensor):
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    y = module(x)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad if x.is_floating_point() else None), grads


def _fresh_copy_loaded(kind: str, config: LayerQuantConfig | None):
    """A wrapper built from a *different* float module, then loaded with the float state_dict."""
    fm, x = _float_and_inputs(kind)
    other, _ = _float_and_inputs(kind)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    qm = _WRAP[kind].from_float(other, config)
    missing, unexpected = qm.load_state_dict(fm.state_dict(), strict=False)
    assert not unexpected
    assert all("_quant." in k for k in missing)
    return fm, qm, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["none", "flags_off"])
def test_quantizers_off_is_bit_exact(kind: str, how: str) -> None:
    fm, qm, x = _fresh_copy_loaded(kind, OFF if how == "none" else None)
    if how == "flags_off":
        disable_fake_quant(qm)
        disable_observers(qm)
        assert qm.weight_quant is not None
    y0, gx0, g0 = _run(fm, x)
    y1, gx1, g1 = _run(qm, x)
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    if gx0 is not None:
        torch.testing.assert_close(gx1, gx0, atol=0, rtol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=0, rtol=0)


def test_state_dict_keys_and_isinstance() -> None:
    for kind in KINDS:
        fm, x = _float_and_inputs(kind)
        qm = _WRAP[kind].from_float(copy.deepcopy(fm), LayerQuantConfig())
        assert isinstance(qm, type(fm))
        float_keys = set(fm.state_dict())
        q_keys = set(qm.state_dict())
        assert float_keys <= q_keys
        assert all(k.split(".")[0] in ("weight_quant", "input_quant", "output_quant")
                   for k in q_keys - float_keys)
        assert isinstance(qm.weight_quant, FakeQuantizer)
        assert qm.output_quant is None
        if kind == "embedding":
            assert qm.input_quant is None  # indices are not quantized
        else:
            assert isinstance(qm.input_quant, FakeQuantizer)


def _fq_ref(x: torch.Tensor, spec, per_row: bool) -> torch.Tensor:
    """Reference fake quant from the core functions: range of this batch (first observation)."""
    if per_row:
        rows = x.detach().reshape(x.shape[0], -1)
        s, zp = calc_qparams(rows.amin(1), rows.amax(1), spec)
    else:
        s, zp = calc_qparams(x.detach().min().reshape(1), x.detach().max().reshape(1), spec)
    return fake_quantize_affine(x, s, zp, spec, clip_grad=spec.estimator != "ste")


@pytest.mark.parametrize("kind", KINDS)
def test_quantizers_on_match_reference(kind: str) -> None:
    fm, x = _float_and_inputs(kind)
    qm = _WRAP[kind].from_float(copy.deepcopy(fm), LayerQuantConfig())
    ws, acts = default_weight_spec(), default_act_spec()
    if x.is_floating_point():
        xq = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        y = qm(xq)
    else:
        y = qm(x)
    w = fm.weight
    wq = _fq_ref(w, ws, per_row=True)
    if kind.startswith("linear"):
        ref = F.linear(_fq_ref(xr, acts, False), wq, fm.bias)
    elif kind.startswith("conv"):
        ref = fm._conv_forward(_fq_ref(xr, acts, False), wq, fm.bias)
    else:
        ref = F.embedding(x, wq, fm.padding_idx)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(qm.weight.grad, fm.weight.grad, atol=1e-5, rtol=1e-5)
    if x.is_floating_point():
        torch.testing.assert_close(xq.grad, xr.grad, atol=1e-5, rtol=1e-5)
    # the weight really is on a per-channel 8-bit grid
    s, _ = qm.weight_quant.qparams()
    levels = qm.weight_quant(qm.weight).detach().reshape(w.shape[0], -1) / s[:, None]
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert levels.abs().max() <= 128


def test_output_quantizer_puts_output_on_grid() -> None:
    torch.manual_seed(0)
    cfg = LayerQuantConfig(output=default_act_spec().replace(bits=4))
    qm = QuantLinear.from_float(nn.Linear(8, 5), cfg)
    y = qm(torch.randn(6, 8))
    s, zp = qm.output_quant.qparams()
    lv = y.detach() / s + zp
    torch.testing.assert_close(lv, lv.round(), atol=1e-4, rtol=0)
    assert lv.round().unique().numel() <= 16


def test_from_float_shares_to_float_restores() -> None:
    fm = nn.Linear(4, 3)
    qm = QuantLinear.from_float(fm)
    assert qm.weight is fm.weight and qm.bias is fm.bias
    back = qm.to_float()
    assert type(back) is nn.Linear and back.weight is fm.weight
    assert set(back.state_dict()) == {"weight", "bias"}
    assert "weight_quant" not in dict(back.named_children())
    conv = QuantConv1d.from_float(nn.Conv1d(2, 3, 3)).to_float()
    assert type(conv) is nn.Conv1d
    emb = QuantEmbedding.from_float(nn.Embedding(5, 2)).to_float()
    assert type(emb) is nn.Embedding
    with pytest.raises(ValueError, match="expects a float Linear"):
        QuantLinear.from_float(qm)
    with pytest.raises(ValueError, match="expects a float Linear"):
        QuantLinear.from_float(nn.Conv1d(2, 3, 3))


def test_direct_construction_and_bad_config() -> None:
    q = QuantLinear(4, 3, config=LayerQuantConfig(weight=default_weight_spec().replace(bits=4)))
    assert q.weight_quant.spec.bits == 4
    assert QuantConv1d(2, 3, 3, padding=1, config=OFF)(torch.randn(1, 2, 5)).shape == (1, 3, 5)
    with pytest.raises(ValueError, match="no quantizer slot 'gates'"):
        QuantLinear(4, 3, config=LayerQuantConfig(slots={"gates": None}))
    with pytest.raises(ValueError, match="sparse=True"):
        QuantEmbedding(10, 4, sparse=True)
    assert QuantEmbedding(10, 4, sparse=True, config=OFF).weight_quant is None
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(4, 3, config={"weight": {"bits": 9}})


def test_embedding_max_norm_renorms_like_float() -> None:
    torch.manual_seed(0)
    fm = nn.Embedding(10, 4, max_norm=0.5)
    qm = QuantEmbedding.from_float(copy.deepcopy(fm), LayerQuantConfig())
    idx = torch.tensor([[1, 2, 3]])
    fm(idx)
    qm(idx)
    torch.testing.assert_close(qm.weight, fm.weight, atol=0, rtol=0)
    assert fm.weight[1:4].norm(dim=1).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("noclip", [False, True])
@pytest.mark.parametrize("estimator", ["clipped_ste", "ste"])
def test_embedding_row_path_equals_table_path(estimator: str, noclip: bool, granularity: str,
                                              monkeypatch) -> None:
    """Quantizing only the looked-up rows gives the table path's values and gradients (also on
    the no-clip path that the rows' observed extremes allow)."""
    from qat.quant import functional

    if noclip:
        monkeypatch.setattr(functional, "NOCLIP_MIN_NUMEL", 0)
    torch.manual_seed(0)
    spec = default_weight_spec().replace(bits=4, estimator=estimator, granularity=granularity)
    fast = QuantEmbedding.from_float(nn.Embedding(50, 6, padding_idx=1),
                                     LayerQuantConfig(weight=spec))
    slow = copy.deepcopy(fast)
    slow._row_path = False
    assert fast._row_path
    idx = torch.tensor([[1, 3, 3, 7, 49], [0, 3, 1, 1, 12]])  # repeats and padding
    g = torch.randn(2, 5, 6)
    for m in (fast, slow):
        m(idx).backward(g)
    torch.testing.assert_close(fast(idx), slow(idx), atol=0, rtol=0)
    torch.testing.assert_close(fast.weight.grad, slow.weight.grad, atol=0, rtol=0)
    for name in ("scale", "zero_point"):
        assert torch.equal(getattr(fast.weight_quant, name), getattr(slow.weight_quant, name))
    assert fast.weight_quant.observer.count == slow.weight_quant.observer.count == 2
    fn = fast(idx).grad_fn
    while type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    assert type(fn).__name__ == ("_RoundSTEBackward" if noclip else "_FakeQuantSTEBackward")
    for m in (fast, slow):  # frozen ranges, wider weights: some rows clip, the masks must match
        m.weight.grad = None
        m.weight_quant.enable_observer(False)
        with torch.no_grad():
            m.weight.mul_(3.0)
        m(idx).backward(g)
    torch.testing.assert_close(fast(idx), slow(idx), atol=0, rtol=0)
    torch.testing.assert_close(fast.weight.grad, slow.weight.grad, atol=0, rtol=0)
    if estimator == "clipped_ste":
        looked_up = idx.unique()
        assert (fast.weight.grad[looked_up[looked_up != 1]] == 0).any()  # not padding: clipped
