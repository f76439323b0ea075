"""Quantized multi-head attention and Transformer encoder layer (drop-ins for the torch modules).

Attention is computed explicitly (matmul, softmax, matmul) so that fake quantizers sit on the
inputs of both matmuls: ``q_quant``, ``k_quant`` (scores = Q K^T), ``attn_quant`` (the softmax
probabilities, unsigned) and ``v_quant`` (out = P V). Parameters and state_dict keys are those
of ``nn.MultiheadAttention`` (packed ``in_proj_weight`` / ``in_proj_bias``, ``out_proj``), so a
float state_dict loads as is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from ..quant.spec import QuantSpec
from .base import QuantModule, adopt, register_quant_module, strip_to
from .config import LayerQuantConfig
from .linear import QUANT_SLOTS, QuantLinear, make_quantizer, quant_input

__all__ = [
    "ATTN_SLOTS",
    "attn_prob_spec",
    "attention_specs",
    "quant_attention",
    "QuantMultiheadAttention",
    "QuantTransformerEncoderLayer",
]

ATTN_SLOTS = ("q", "k", "v", "attn")
_ATTN_MODULES = tuple(f"{s}_quant" for s in ATTN_SLOTS)
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def attn_prob_spec(act: QuantSpec | None) -> QuantSpec | None:
    """The spec for attention probabilities: the activation's bits, unsigned, range [0, max].

    The observer is a running min-max whatever the activations use: probabilities are bounded
    by 1, so the range settles at about [0, 1] (what integer softmax kernels assume) and never
    clips the largest probabilities, which a moving average or percentile would."""
    if act is None:
        return None
    estimator = "lsq" if act.estimator == "lsq_plus" else act.estimator
    return act.replace(signed=False, symmetric=True, narrow_range=False, granularity="tensor",
                       mode="int", estimator=estimator, observer="minmax")


def attention_specs(config: LayerQuantConfig, layer: str) -> dict[str, QuantSpec | None]:
    """Specs for q / k / v / attn: explicit slots win, else q / k / v follow ``config.input``
    and attn follows :func:`attn_prob_spec` of it."""
    config.check_slots(ATTN_SLOTS, layer)
    specs = {s: config.slots.get(s, config.input) for s in ("q", "k", "v")}
    specs["attn"] = config.slots["attn"] if "attn" in config.slots else attn_prob_spec(config.input)
    return specs


def register_attention_quantizers(module: nn.Module, config: LayerQuantConfig,
                                  like: Tensor) -> None:
    """Add ``q_quant``, ``k_quant``, ``v_quant``, ``attn_quant`` (None when off) to ``module``."""
    for slot, spec in attention_specs(config, type(module).__name__).items():
        module.register_module(f"{slot}_quant", make_quantizer(spec, None, like))


def _fq(q: FakeQuantizer | None, x: Tensor) -> Tensor:
    return x if q is None else q(x)


def quant_attention(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                    scale: float, dropout_p: float,
                    scale_first: bool = True) -> tuple[Tensor, Tensor]:
    """softmax(fq(Q) fq(K)^T * scale + mask) -> fq -> dropout -> @ fq(V).

    q (B, H, L, D), k / v (B, H, S, D), mask additive and broadcastable to (B, H, L, S).
    Returns the output (B, H, L, D) and the probabilities (B, H, L, S) after dropout.
    ``scale_first``: (Q * scale) K^T, as torch's MultiheadAttention computes; else
    (Q K^T) * scale, as Hugging Face's eager attention does (the same float rounding as the
    module it replaces: with quantization off, the same bits).
    """
    q = quant_input(module.q_quant, q)
    k = quant_input(module.k_quant, k)
    v = quant_input(module.v_quant, v)
    if scale_first:
        scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, L, S)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if mask is not None:
        scores.add_(mask)  # in place: the matmul's backward does not need its output
    probs = _fq(module.attn_quant, torch.softmax(scores, dim=-1))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), probs


def _additive(mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Bool masks (True = masked out) -> 0 / -inf; float masks pass unchanged."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    return mask.to(dtype)


class QuantMultiheadAttention(QuantModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with quantized projections and attention matmul inputs.

    ``weight_quant`` quantizes the packed ``in_proj_weight`` (per-channel = per row of the 3E
    rows) or, with kdim / vdim != embed_dim, is a ModuleDict over ``q/k/v_proj_weight``.
    ``input_quant`` quantizes query (and key / value when they are other tensors); ``out_proj``
    is a :class:`QuantLinear`. ``output_quant`` is always None (``out_proj`` has one).
    """

    quant_slots = ATTN_SLOTS
    weight_name = "in_proj_weight"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None,
                 config: LayerQuantConfig | None = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device=device, dtype=dtype)
        self._float_cls = nn.MultiheadAttention
        self._init_quant(config, convert_children=True)

    def _init_quant(self, config: LayerQuantConfig | None, convert_children: bool) -> None:
        config = LayerQuantConfig.from_any(config)
        like = self.out_proj.weight
        if config.weight is None:
            wq = None
        elif self._qkv_same_embed_dim:
            wq = make_quantizer(config.weight, tuple(self.in_proj_weight.shape), like, True)
        else:
            wq = nn.ModuleDict({n: make_quantizer(config.weight, tuple(getattr(self, n).shape),
                                                  like, True) for n in _SEPARATE})
        self.register_module("weight_quant", wq)
        self.register_module("input_quant", make_quantizer(config.input, None, like))
        self.register_module("output_quant", None)
        register_attention_quantizers(self, config, like)
        if convert_children and not isinstance(self.out_proj, QuantLinear):
            self.out_proj = QuantLinear.from_float(self.out_proj, config.replace(slots={}))

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> QuantMultiheadAttention:
        """Wrap ``module`` (sharing its parameters); ``convert_children`` also wraps out_proj."""
        if not isinstance(module, nn.MultiheadAttention) or isinstance(module, cls):
            raise ValueError(f"{cls.__name__}.from_float expects a float nn.MultiheadAttention, "
                             f"got {type(module).__name__}")
        new = adopt(cls, module)
        new._float_cls = type(module)
        new._init_quant(config, convert_children)
        return new

    def to_float(self) -> nn.MultiheadAttention:
        """The float module with the same (unfolded) parameters."""
        new = strip_to(self._float_cls, self, QUANT_SLOTS + _ATTN_MODULES)
        if isinstance(self.out_proj, QuantLinear):
            new._modules["out_proj"] = self.out_proj.to_float()
        return new

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        wq = self.weight_quant
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight if wq is None else wq(self.in_proj_weight)
            return w.chunk(3)
        return tuple(getattr(self, n) if wq is None else wq[n](getattr(self, n))
                     for n in _SEPARATE)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        self_attn, same_kv = key is query and value is query, value is key
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, e = query.shape
        h, d = self.num_heads, self.head_dim
        iq = self.input_quant
        x = quant_input(iq, query)
        b = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        packed = self_attn and self._qkv_same_embed_dim  # one GEMM, as torch computes it
        if packed:
            w = self.in_proj_weight if self.weight_quant is None else self.weight_quant(
                self.in_proj_weight)
            qkv = F.linear(x, w, self.in_proj_bias)  # (N, L, 3E)
        if packed and self.bias_k is None:
            q, k, v = qkv.view(n, tgt, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3x (N,H,L,D)
        else:
            if packed:
                q, k, v = qkv.chunk(3, dim=-1)  # 3x (N, L, E)
                q = q.reshape(n, tgt, h, d).transpose(1, 2)  # (N, H, L, D)
            else:
                xk = x if self_attn else quant_input(iq, key)
                xv = xk if same_kv else quant_input(iq, value)
                wq_, wk, wv = self._weights()
                q = F.linear(x, wq_, b[0]).view(n, tgt, h, d).transpose(1, 2)  # (N, H, L, D)
                k, v = F.linear(xk, wk, b[1]), F.linear(xv, wv, b[2])  # (N, S, E)
            if self.bias_k is not None:
                k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
                v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            k = k.reshape(n, -1, h, d).transpose(1, 2)  # (N, S, E) -> (N, H, S, D)
            v = v.reshape(n, -1, h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, n, tgt, k.shape[2], x.dtype,
                          x.device)
        out, probs = self._attend(q, k, v, mask, need_weights)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (N, L, E) -> (L, N, E)
        if not need_weights:
            return out, None
        if average_attn_weights:
            probs = probs.mean(dim=1)  # (N, H, L, S) -> (N, L, S)
        return out, (probs if batched else probs.squeeze(0))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Both attention matmuls (quantized where a slot is on) and the output projection:
        q (N, H, L, D), k / v (N, H, S, D) -> output (N, L, E) and probabilities (N, H, L, S)."""
        n, h, tgt, d = q.shape
        p = self.dropout if self.training else 0.0
        quantized = any(m is not None for m in (self.q_quant, self.k_quant, self.v_quant,
                                                  self.attn_quant))
        if need_weights or quantized:
            out, probs = quant_attention(self, q, k, v, mask, 1.0 / math.sqrt(d), p)
        else:
            out, probs = F.scaled_dot_product_attention(q, k, v, mask, p), None
        return self.out_proj(out.transpose(1, 2).reshape(n, tgt, h * d)), probs  # (N,L,E)

    def _mask(self, attn_mask: Tensor | None, kpm: Tensor | None, is_causal: bool, n: int,
              tgt: int, src: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Merge attn_mask and key_padding_mask into one additive (N|1, H|1, L, S) mask."""
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src - extra, dtype=torch.bool, device=device).triu_(1)
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype, "attn_mask")
            if m.dim() == 2 and m.shape == (tgt, src - extra):
                m = m.view(1, 1, tgt, -1)  # (L, S) -> (1, 1, L, S)
            elif m.dim() == 3 and m.shape == (n * self.num_heads, tgt, src - extra):
                m = m.view(n, self.num_heads, tgt, -1)  # (N*H, L, S) -> (N, H, L, S)
            else:
                allowed = f"{(tgt, src - extra)} or {(n * self.num_heads, tgt, src - extra)}"
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}: allowed {allowed}")
            mask = m
        if kpm is not None:
            if kpm.shape != (n, src - extra):
                raise ValueError(f"key_padding_mask has shape {tuple(kpm.shape)}: expected "
                                 f"{(n, src - extra)}")
            m = _additive(kpm, dtype, "key_padding_mask").view(n, 1, 1, -1)  # (N,S) -> (N,1,1,S)
            mask = m if mask is None else mask + m
        if mask is not None and extra:
            mask = F.pad(mask, (0, extra))
        return mask


class QuantTransformerEncoderLayer(QuantModule, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` with QuantMultiheadAttention and QuantLinear children.

    Always takes the explicit (slow) path so every quantizer runs; nested-tensor input (from the
    ``nn.TransformerEncoder`` fast path) is rejected. The layer's own ``weight_quant``,
    ``input_quant`` and ``output_quant`` slots are None: the children quantize.
    """

    quant_slots = ATTN_SLOTS

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Any = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None, config: LayerQuantConfig | None = None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                         batch_first, norm_first, bias, device=device, dtype=dtype)
        self._float_cls = nn.TransformerEncoderLayer
        self._init_quant(config, convert_children=True)

    def _init_quant(self, config: LayerQuantConfig | None, convert_children: bool) -> None:
        config = LayerQuantConfig.from_any(config)
        config.check_slots(ATTN_SLOTS, type(self).__name__)
        for name in QUANT_SLOTS:
            self.register_module(name, None)
        if not convert_children:
            return
        if not isinstance(self.self_attn, QuantMultiheadAttention):
            self.self_attn = QuantMultiheadAttention.from_float(self.self_attn, config)
        plain = config.replace(slots={})
        for name in ("linear1", "linear2"):
            if not isinstance(getattr(self, name), QuantLinear):
                setattr(self, name, QuantLinear.from_float(getattr(self, name), plain))

    @classmethod
    def from_float(cls, module: nn.TransformerEncoderLayer,
                   config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> QuantTransformerEncoderLayer:
        """Wrap ``module`` (sharing its parameters); ``convert_children`` wraps its sublayers."""
        if not isinstance(module, nn.TransformerEncoderLayer) or isinstance(module, cls):
            raise ValueError(f"{cls.__name__}.from_float expects a float "
                             f"nn.TransformerEncoderLayer, got {type(module).__name__}")
        new = adopt(cls, module)
        new._float_cls = type(module)
        new._init_quant(config, convert_children)
        return new

    def to_float(self) -> nn.TransformerEncoderLayer:
        """The float layer (children back to float too) with the same parameters."""
        new = strip_to(self._float_cls, self, QUANT_SLOTS)
        for name, child in self._modules.items():
            if hasattr(child, "to_float") and name in ("self_attn", "linear1", "linear2"):
                new._modules[name] = child.to_float()
        return new

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if src.is_nested:
            raise ValueError("QuantTransformerEncoderLayer got a nested tensor: build the "
                             "nn.TransformerEncoder with enable_nested_tensor=False (qat.prepare "
                             "turns it off)")
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None,
                                     other_name="", target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                              is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


register_quant_module(nn.MultiheadAttention, QuantMultiheadAttention)
register_quant_module(nn.TransformerEncoderLayer, QuantTransformerEncoderLayer)
