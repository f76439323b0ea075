"""QuantMultiheadAttention / QuantTransformerEncoderLayer against the torch modules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_ulps_close
from torch import nn

from qat.nn import (
    LayerQuantConfig,
    QuantLinear,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
    attn_prob_spec,
)
from qat.nn.config import default_act_spec, default_weight_spec
from qat.quant import disable_fake_quant, disable_observers
from qat.quant.functional import calc_qparams, fake_quantize_affine

OFF = LayerQuantConfig(weight=None, input=None, output=None,
                       slots={"q": None, "k": None, "v": None, "attn": None})
E, H, N, L = 16, 4, 3, 6


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def _kpm(dtype=torch.bool) -> torch.Tensor:
    m = torch.zeros(N, L, dtype=torch.bool)
    m[1, 4:] = True
    m[2, 5:] = True
    return m if dtype == torch.bool else torch.zeros(N, L).masked_fill(m, float("-inf"))


def _causal(float_mask: bool = False) -> torch.Tensor:
    m = torch.ones(L, L, dtype=torch.bool).triu(1)
    return torch.zeros(L, L).masked_fill(m, float("-inf")) if float_mask else m


def _x(batch_first: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((N, L, E) if batch_first else (L, N, E), generator=g)


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def _wrap_loaded(fm: nn.Module, cls, config) -> nn.Module:
    """Wrapper built from a perturbed copy, then loaded with the float state_dict."""
    other = copy.deepcopy(fm)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    qm = cls.from_float(other, config)
    missing, unexpected = qm.load_state_dict(fm.state_dict(), strict=False)
    assert not unexpected and all("_quant." in k for k in missing)
    return qm


def _compare_mha(fm, qm, args, kwargs, train: bool) -> None:
    fm.train(train)
    qm.train(train)
    outs = []
    for m in (fm, qm):
        xs = [a.clone().requires_grad_(True) for a in args]
        if args[0] is args[1] is args[2]:
            xs = [xs[0]] * 3
        y, w = m(*xs, **kwargs)
        loss = y.square().sum() + (w.sum() if w is not None else 0)
        loss.backward()
        outs.append((y.detach(), None if w is None else w.detach(), xs[0].grad, _grads(m)))
        m.zero_grad()
    (y0, w0, gx0, g0), (y1, w1, gx1, g1) = outs
    # outputs, probabilities and input gradients: the same operations in the same order as
    # torch's MultiheadAttention, bit for bit
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    assert (w0 is None) == (w1 is None)
    if w0 is not None:
        torch.testing.assert_close(w1, w0, atol=0, rtol=0)
    torch.testing.assert_close(gx1, gx0, atol=0, rtol=0)
    assert g0.keys() == g1.keys()
    for k in g0:  # parameter gradients sum over batch and positions in another row order
        assert_ulps_close(g1[k], g0[k], ulps=4)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "kpm", "causal", "both_float", "3d"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_off_matches_float(batch_first: bool, masks: str, need_weights: bool) -> None:
    torch.manual_seed(0)
    fm = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=batch_first)
    qm = _wrap_loaded(fm, QuantMultiheadAttention, OFF)
    x = _x(batch_first)
    kw: dict = {"need_weights": need_weights}
    if masks == "kpm":
        kw["key_padding_mask"] = _kpm()
    elif masks == "causal":
        kw["attn_mask"] = _causal()
    elif masks == "both_float":
        kw["attn_mask"], kw["key_padding_mask"] = _causal(True), _kpm(torch.float)
    elif masks == "3d":
        kw["attn_mask"] = torch.randn(N * H, L, L)
    for train in (True, False):
        _compare_mha(fm, qm, (x, x, x), kw, train)


def test_mha_flags_off_per_head_weights_cross_and_unbatched() -> None:
    torch.manual_seed(1)
    fm = nn.MultiheadAttention(E, H, batch_first=True)
    qm = _wrap_loaded(fm, QuantMultiheadAttention, None)
    disable_fake_quant(qm)
    disable_observers(qm)
    x, mem = _x(True), torch.randn(N, L + 2, E)
    kw = {"average_attn_weights": False}
    _compare_mha(fm, qm, (x, mem, mem), kw, train=True)
    _compare_mha(fm, qm, (x[0], x[0], x[0]), {"attn_mask": _causal()}, train=False)


@pytest.mark.parametrize("variant", ["kdim", "bias_kv", "zero_attn", "no_bias"])
def test_mha_variants_off_match_float(variant: str) -> None:
    torch.manual_seed(2)
    kw = {"kdim": {"kdim": 10, "vdim": 12}, "bias_kv": {"add_bias_kv": True},
          "zero_attn": {"add_zero_attn": True}, "no_bias": {"bias": False}}[variant]
    fm = nn.MultiheadAttention(E, H, batch_first=True, **kw)
    qm = _wrap_loaded(fm, QuantMultiheadAttention, OFF)
    x = _x(True)
    k = torch.randn(N, L, 10) if variant == "kdim" else x
    v = torch.randn(N, L, 12) if variant == "kdim" else x
    call = {"key_padding_mask": _kpm(), "attn_mask": _causal()}
    _compare_mha(fm, qm, (x, k, v), call, train=True)


def test_mha_dropout_same_rng_matches_float() -> None:
    torch.manual_seed(3)
    fm = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True)
    qm = _wrap_loaded(fm, QuantMultiheadAttention, OFF)
    x = _x(True)
    torch.manual_seed(7)
    y0, w0 = fm(x, x, x, average_attn_weights=False)
    torch.manual_seed(7)
    y1, w1 = qm(x, x, x, average_attn_weights=False)
    assert (w1 == 0).any()  # dropout hit the returned probabilities, like torch
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    torch.testing.assert_close(w1, w0, atol=0, rtol=0)


def _fq(x, spec, per_row=False):
    if per_row:
        s, zp = calc_qparams(x.detach().amin(1), x.detach().amax(1), spec)
    else:
        s, zp = calc_qparams(x.detach().min().reshape(1), x.detach().max().reshape(1), spec)
    return fake_quantize_affine(x, s, zp, spec)


def test_mha_on_matches_reference() -> None:
    torch.manual_seed(4)
    fm = nn.MultiheadAttention(E, H, batch_first=True)
    qm = QuantMultiheadAttention.from_float(copy.deepcopy(fm), LayerQuantConfig())
    assert isinstance(qm.out_proj, QuantLinear)
    x = _x(True)
    kpm = _kpm()
    y, w = qm(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    a, ws, ps = default_act_spec(), default_weight_spec(), attn_prob_spec(default_act_spec())
    assert ps.quant_min == 0 and ps.symmetric and not ps.signed and ps.bits == a.bits
    d = E // H
    qkv = F.linear(_fq(x, a), _fq(fm.in_proj_weight, ws, True), fm.in_proj_bias)
    q, k, v = qkv.view(N, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3x (N, H, L, D)
    scores = torch.matmul(_fq(q, a) / math.sqrt(d), _fq(k, a).transpose(-2, -1))
    scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    p = _fq(torch.softmax(scores, -1), ps)
    o = torch.matmul(p, _fq(v, a)).transpose(1, 2).reshape(N, L, E)  # (N,H,L,D) -> (N,L,E)
    ref = F.linear(_fq(o, a), _fq(fm.out_proj.weight, ws, True), fm.out_proj.bias)
    torch.testing.assert_close(w, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    s, zp = qm.attn_quant.qparams()
    assert int(zp) == 0
    lv = w.detach() / s
    torch.testing.assert_close(lv, lv.round(), atol=1e-3, rtol=0)
    y_float = fm(x, x, x, key_padding_mask=kpm)[0].detach()
    assert float(torch.dist(y.detach(), y_float)) > 1e-4  # quantization bites


def test_mha_quantized_cross_attention_and_unbatched() -> None:
    torch.manual_seed(8)
    qm = QuantMultiheadAttention(E, H, batch_first=True, kdim=10, vdim=12)
    y, w = qm(_x(True), torch.randn(N, L + 1, 10), torch.randn(N, L + 1, 12))
    assert y.shape == (N, L, E) and w.shape == (N, L, L + 1)
    assert qm.input_quant.observer.count == 3  # query, key and value inputs
    assert all(q.observer.count == 1 for q in qm.weight_quant.values())
    x = _x(True)[0]
    y1, w1 = QuantMultiheadAttention(E, H)(x, x, x.clone())
    assert y1.shape == (L, E) and w1.shape == (L, L)


def test_mha_slots_and_to_float() -> None:
    qm = QuantMultiheadAttention(E, H, config=LayerQuantConfig(slots={"attn": None, "q": None}))
    assert qm.attn_quant is None and qm.q_quant is None and qm.k_quant is not None
    assert qm.output_quant is None and qm.weight_quant is not None
    with pytest.raises(ValueError, match="no quantizer slot 'gates'"):
        QuantMultiheadAttention(E, H, config=LayerQuantConfig(slots={"gates": None}))
    back = qm.to_float()
    assert type(back) is nn.MultiheadAttention
    assert type(back.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(back.state_dict()) == set(nn.MultiheadAttention(E, H).state_dict())
    sep = QuantMultiheadAttention(E, H, kdim=8, vdim=8)
    assert set(sep.weight_quant) == {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    with pytest.raises(ValueError, match="attn_mask has shape"):
        qm(_x(False), _x(False), _x(False), attn_mask=torch.zeros(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_layer_off_matches_float(norm_first: bool, activation: str,
                                         batch_first: bool) -> None:
    torch.manual_seed(5)
    fm = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, activation=activation,
                                    batch_first=batch_first, norm_first=norm_first)
    qm = _wrap_loaded(fm, QuantTransformerEncoderLayer, OFF)
    assert isinstance(qm.self_attn, QuantMultiheadAttention)
    assert isinstance(qm.linear1, QuantLinear) and isinstance(qm.linear2, QuantLinear)
    x = _x(batch_first)
    for kw in ({"src_key_padding_mask": _kpm()}, {"src_mask": _causal(), "is_causal": True}):
        # train mode: the torch layer takes its explicit path
        outs = []
        for m in (fm, qm):
            m.train()
            xi = x.clone().requires_grad_(True)
            m(xi, **kw).square().sum().backward()
            outs.append((m(x, **kw).detach(), xi.grad, _grads(m)))
            m.zero_grad()
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=0, rtol=0)
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=0, rtol=0)
        for k in outs[0][2]:  # parameter gradients: sums over the batch in another order
            assert_ulps_close(outs[1][2][k], outs[0][2][k], ulps=4)
        # eval under no_grad: the torch layer may take its fused fast path
        fm.eval()
        qm.eval()
        with torch.no_grad():
            y0, y1 = fm(x, **kw), qm(x, **kw)
        keep = ~_kpm() if "src_key_padding_mask" in kw else torch.ones(N, L, dtype=torch.bool)
        keep = keep if batch_first else keep.T
        assert_ulps_close(y1[keep], y0[keep], ulps=4)  # torch's fused fast-path kernel


def test_encoder_layer_quantized_and_to_float() -> None:
    torch.manual_seed(6)
    fm = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    qm = QuantTransformerEncoderLayer.from_float(copy.deepcopy(fm), LayerQuantConfig())
    x = _x(True)
    y = qm(x, src_key_padding_mask=_kpm())
    assert qm.self_attn.attn_quant.observer.count == 1
    assert float(torch.dist(y.detach(), fm(x, src_key_padding_mask=_kpm()).detach())) > 1e-4
    back = qm.to_float()
    assert type(back) is nn.TransformerEncoderLayer and type(back.linear1) is nn.Linear
    assert type(back.self_attn) is nn.MultiheadAttention
    torch.testing.assert_close(back(x), fm(x), atol=0, rtol=0)
    direct = QuantTransformerEncoderLayer(E, H, 32, batch_first=True, norm_first=True)
    assert direct(x).shape == x.shape
    with pytest.raises(ValueError, match="nested tensor"):
        qm(torch.nested.nested_tensor([torch.randn(3, E), torch.randn(2, E)],
                                     layout=torch.jagged))
