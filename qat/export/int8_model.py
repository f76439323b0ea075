"""Convert a prepared, calibrated model into the int8 PyTorch inference model (see :mod:`.int8`)."""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.attention import QuantMultiheadAttention
from ..nn.base import QuantModule, quant_layers
from ..nn.linear import QuantConv1d, QuantEmbedding, QuantLinear
from ..quant.control import disable_observers
from .int8 import MODES, Int8Conv1d, Int8Embedding, Int8Linear, _static_ok, int8_supported
from .qweight import IntWeight, quantize_weight, weight_quantizers

__all__ = ["to_int8", "int8_summary"]


def _mha_int8_forward(self: QuantMultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Tensor | None = None, need_weights: bool = True,
                      attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """Batch-first self-attention with the int8 in-projection; other calls take the float path."""
    simple = (self.batch_first and query.dim() == 3 and key is query and value is query
              and self.bias_k is None and not self.add_zero_attn)
    if not simple:
        return QuantMultiheadAttention.forward(self, query, key, value, key_padding_mask,
                                               need_weights, attn_mask, average_attn_weights,
                                               is_causal)
    n, tgt, _ = query.shape
    h, d = self.num_heads, self.head_dim
    qkv = self.int8_in_proj(query)  # (N, L, 3E)
    q, k, v = qkv.view(n, tgt, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3x (N, H, L, D)
    mask = self._mask(attn_mask, key_padding_mask, is_causal, n, tgt, tgt, qkv.dtype, qkv.device)
    out, probs = self._attend(q, k, v, mask, need_weights)
    if not need_weights:
        return out, None
    return out, (probs.mean(dim=1) if average_attn_weights else probs)


def _fold(module: nn.Module, pname: str, iw: IntWeight | None) -> None:
    if iw is not None:
        with torch.no_grad():
            getattr(module, pname).copy_(iw.dequantize())


@torch.no_grad()
def to_int8(model: nn.Module, mode: str = "static", inplace: bool = False) -> nn.Module:
    """The int8 inference model of a prepared, calibrated ``model`` (eval mode, observers off).

    ``mode``: ``'static'`` (activations on the model's own input grids, weights split where the
    int16 pair sums could saturate: exact), ``'fast'`` (static, one GEMM per layer: may saturate
    on CPUs without VNNI) or ``'dynamic'`` (per-batch 7-bit activation ranges). Layers that
    cannot run in int8 keep exact folded float weights.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: allowed {MODES}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    ints: dict[int, IntWeight | None] = {}
    for name, module, pname, q in list(weight_quantizers(model)):
        ints[id(q)] = quantize_weight(q, getattr(module, pname), name=f"{name}.{pname}")
    hf = _hf_parents(model)
    for name, module in list(model.named_modules()):
        new = _convert(module, ints, mode, hf.get(name))
        if new is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    for _, layer in list(quant_layers(model)):  # what is left: fold into float weights (exact)
        for pname, q in layer.weight_quantizers().items():
            _fold(layer, pname, ints.get(id(q)))
        layer.drop_weight_quantizers()
    for parent in set(hf.values()):
        parent.input_quant = None  # query / key / value quantize their shared input themselves
    disable_observers(model)
    return model


def _hf_parents(model: nn.Module) -> dict[str, nn.Module]:
    """query / key / value names of BERT-style self-attention -> the module whose
    ``input_quant`` quantizes their input."""
    out = {}
    for name, m in model.named_modules():
        iq = m._modules.get("input_quant")
        if not (_static_ok(iq) and all(isinstance(m._modules.get(c), QuantLinear) and
                                       m._modules[c].input_quant is None
                                       for c in ("query", "key", "value"))):
            continue
        for c in ("query", "key", "value"):
            out[f"{name}.{c}" if name else c] = m
    return out


def _convert(module: nn.Module, ints: dict[int, IntWeight | None], mode: str,
             hf_parent: nn.Module | None) -> nn.Module:
    wqs = list(module.weight_quantizers().values()) if isinstance(module, QuantModule) else []
    iw = ints.get(id(wqs[0])) if len(wqs) == 1 else None
    if not int8_supported(iw):
        return module
    if isinstance(module, QuantLinear):
        act = module.input_quant if hf_parent is None else hf_parent.input_quant
        if mode != "dynamic" and not _static_ok(act):
            return module  # float input: folded float weights keep it exact
        return Int8Linear(iw, module.bias, act, mode, module.output_quant)
    if isinstance(module, QuantConv1d):
        if module.groups != 1 or module.padding_mode != "zeros" or (
                mode != "dynamic" and not _static_ok(module.input_quant)):
            return module
        return Int8Conv1d(module, iw, mode)
    if isinstance(module, QuantEmbedding) and iw.spec.granularity in ("tensor", "channel"):
        return Int8Embedding(module, iw)
    if isinstance(module, QuantMultiheadAttention) and module._qkv_same_embed_dim and (
            mode == "dynamic" or _static_ok(module.input_quant)):
        module.int8_in_proj = Int8Linear(iw, module.in_proj_bias, module.input_quant, mode)
        module.forward = types.MethodType(_mha_int8_forward, module)
    return module


def int8_summary(model: nn.Module) -> dict[str, Any]:
    """Counts of int8 modules and of layers left in float in a :func:`to_int8` model."""
    kinds = (Int8Linear, Int8Conv1d, Int8Embedding)
    counts = {k.__name__: sum(isinstance(m, k) for m in model.modules()) for k in kinds}
    counts["float_linear"] = sum(isinstance(m, nn.Linear | nn.Conv1d) for m in model.modules())
    return counts
