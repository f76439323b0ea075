"""Quantized disentangled self-attention of DeBERTa-v2 / v3 (transformers 5.x).

DeBERTa's attention adds two relative-position terms to the content scores: c2p = Q_c K_r^T and
p2c = K_c Q_r^T (K_r, Q_r: the relative embeddings through the key / query projections). All
matmul inputs are quantized: ``q_quant`` (content queries), ``k_quant`` (content keys),
``pos_q_quant`` / ``pos_k_quant`` (the projected relative embeddings: their own ranges, with the
q / k specs), ``attn_quant`` (probabilities) and ``v_quant``. The forward is the parent's (as of
transformers 5.x) with the quantizers inserted; parameters and state_dict keys are the parent's.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from .attention import _ATTN_MODULES, ATTN_SLOTS, register_attention_quantizers
from .base import QuantModule, adopt, register_quant_module, strip_to
from .config import LayerQuantConfig
from .linear import QUANT_SLOTS, QuantLinear, make_quantizer, quant_input

__all__ = ["HF_DEBERTA_ATTENTION"]

_POS = ("pos_q_quant", "pos_k_quant")


def _fq(q: FakeQuantizer | None, x: Tensor) -> Tensor:
    return x if q is None else q(x)


class _QuantDisentangledMixin(QuantModule):
    quant_slots = ATTN_SLOTS
    attention_module = True
    _float_cls: type[nn.Module]
    _helpers: Any

    def _init_quant(self, config: LayerQuantConfig | None, convert_children: bool) -> None:
        config = LayerQuantConfig.from_any(config)
        like = self.query_proj.weight
        for name in QUANT_SLOTS:
            self.register_module(name, None)
        register_attention_quantizers(self, config, like)
        self.register_module("pos_q_quant", make_quantizer(
            None if self.q_quant is None else self.q_quant.spec, None, like))
        self.register_module("pos_k_quant", make_quantizer(
            None if self.k_quant is None else self.k_quant.spec, None, like))
        if convert_children:
            plain = config.replace(slots={})
            for name, child in list(self._modules.items()):
                if type(child) is nn.Linear:
                    setattr(self, name, QuantLinear.from_float(child, plain))

    def activation_quantizers(self) -> dict[str, FakeQuantizer]:
        out = super().activation_quantizers()
        for name in _POS:
            q = self._modules.get(name)
            if isinstance(q, FakeQuantizer):
                out[name[:-6]] = q
        return out

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> Any:
        """Wrap ``module`` (sharing its parameters); ``convert_children`` also wraps its
        projections as QuantLinear."""
        if type(module) is not cls._float_cls:
            raise ValueError(f"{cls.__name__}.from_float expects {cls._float_cls.__name__}, "
                             f"got {type(module).__name__}")
        new = adopt(cls, module)
        new._init_quant(config, convert_children)
        return new

    def to_float(self) -> nn.Module:
        """The float module with the same (unfolded) parameters."""
        new = strip_to(self._float_cls, self, QUANT_SLOTS + _ATTN_MODULES + _POS)
        for name, child in self._modules.items():
            if isinstance(child, QuantLinear):
                new._modules[name] = child.to_float()
        return new

    def _heads(self, x: Tensor) -> Tensor:
        return self.transpose_for_scores(x, self.num_attention_heads)  # (B, L, E) -> (B*H, L, D)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor,
                output_attentions: bool = False, query_states: Tensor | None = None,
                relative_pos: Tensor | None = None,
                rel_embeddings: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if query_states is None:
            query_states = hidden_states
        query_layer = quant_input(self.q_quant, self._heads(self.query_proj(query_states)))
        key_layer = quant_input(self.k_quant, self._heads(self.key_proj(hidden_states)))
        value_layer = quant_input(self.v_quant, self._heads(self.value_proj(hidden_states)))
        scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
        scale = self._helpers.scaled_size_sqrt(query_layer, scale_factor)
        scores = torch.bmm(query_layer, key_layer.transpose(-1, -2) / scale.to(query_layer.dtype))
        if self.relative_attention:
            rel_embeddings = self.pos_dropout(rel_embeddings)
            rel_att = self.disentangled_attention_bias(query_layer, key_layer, relative_pos,
                                                       rel_embeddings, scale_factor)
            if rel_att is not None:
                scores = scores + rel_att
        scores = scores.view(-1, self.num_attention_heads, scores.size(-2), scores.size(-1))
        mask = attention_mask.bool()
        scores = scores.masked_fill(~mask, torch.finfo(query_layer.dtype).min)
        probs = _fq(self.attn_quant, nn.functional.softmax(scores, dim=-1))  # (B, H, L, S)
        probs = self.dropout(probs)
        context = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), value_layer)
        context = context.view(-1, self.num_attention_heads, context.size(-2), context.size(-1))
        context = context.permute(0, 2, 1, 3).contiguous()  # (B, H, L, D) -> (B, L, H, D)
        context = context.view(context.size()[:-2] + (-1,))
        return (context, probs) if output_attentions else (context, None)

    def disentangled_attention_bias(self, query_layer: Tensor, key_layer: Tensor,
                                    relative_pos: Tensor | None, rel_embeddings: Tensor,
                                    scale_factor: int) -> Tensor | int:
        h = self._helpers
        if relative_pos is None:
            relative_pos = h.build_relative_position(query_layer, key_layer,
                                                     bucket_size=self.position_buckets,
                                                     max_position=self.max_relative_positions)
        if relative_pos.dim() == 2:
            relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
        elif relative_pos.dim() == 3:
            relative_pos = relative_pos.unsqueeze(1)
        elif relative_pos.dim() != 4:
            raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. "
                             f"{relative_pos.dim()}")
        att_span = self.pos_ebd_size
        relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
        rel_embeddings = rel_embeddings[0: att_span * 2, :].unsqueeze(0)
        reps = query_layer.size(0) // self.num_attention_heads
        k_proj = self.key_proj if self.share_att_key else getattr(self, "pos_key_proj", None)
        q_proj = self.query_proj if self.share_att_key else getattr(self, "pos_query_proj", None)
        score: Tensor | int = 0
        if "c2p" in self.pos_att_type:  # content -> position
            pos_key = _fq(self.pos_k_quant, self._heads(k_proj(rel_embeddings))).repeat(reps, 1, 1)
            scale = h.scaled_size_sqrt(pos_key, scale_factor)
            c2p = torch.bmm(query_layer, pos_key.transpose(-1, -2))
            c2p_pos = torch.clamp(relative_pos + att_span, 0, att_span * 2 - 1)
            c2p = torch.gather(c2p, dim=-1, index=c2p_pos.squeeze(0).expand(
                [query_layer.size(0), query_layer.size(1), relative_pos.size(-1)]))
            score = score + c2p / scale.to(dtype=c2p.dtype)
        if "p2c" in self.pos_att_type:  # position -> content
            pos_query = _fq(self.pos_q_quant, self._heads(q_proj(rel_embeddings))).repeat(
                reps, 1, 1)
            scale = h.scaled_size_sqrt(pos_query, scale_factor)
            r_pos = h.build_rpos(query_layer, key_layer, relative_pos,
                                 self.max_relative_positions, self.position_buckets)
            p2c_pos = torch.clamp(-r_pos + att_span, 0, att_span * 2 - 1)
            p2c = torch.bmm(key_layer, pos_query.transpose(-1, -2))
            p2c = torch.gather(p2c, dim=-1, index=p2c_pos.squeeze(0).expand(
                [query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])).transpose(-1, -2)
            score = score + p2c / scale.to(dtype=p2c.dtype)
        return score


def _register() -> dict[type[nn.Module], type[nn.Module]]:
    try:
        m = importlib.import_module("transformers.models.deberta_v2.modeling_deberta_v2")
    except ImportError:  # pragma: no cover - depends on the transformers build
        return {}
    cls = m.DisentangledSelfAttention
    q = type("QuantDisentangledSelfAttention", (_QuantDisentangledMixin, cls),
             {"__module__": __name__, "_float_cls": cls, "_helpers": m,
              "__doc__": "Fake-quantized DeBERTa-v2 ``DisentangledSelfAttention``."})
    globals()[q.__name__] = q
    __all__.append(q.__name__)
    register_quant_module(cls, q)
    return {cls: q}


HF_DEBERTA_ATTENTION = _register()
