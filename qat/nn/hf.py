"""Quantized self-attention for Hugging Face BERT-family encoders (transformers 5.x).

Design: the self-attention *module* is replaced by a subclass of the model's own class
(``QuantBertSelfAttention(BertSelfAttention)``, same for RoBERTa, XLM-R, ELECTRA, CamemBERT,
whose self-attention is a copy of BERT's). The subclass keeps the parent's projections and
state_dict keys and overrides ``forward`` to compute attention explicitly with ``q_quant``,
``k_quant``, ``attn_quant`` and ``v_quant`` around both matmuls, instead of dispatching through
``ALL_ATTENTION_FUNCTIONS``. Why not a registered attention function: that needs a new
``config._attn_implementation`` for the whole model, which also selects the mask format and is
shared with modules we do not quantize. Subclassing keeps ``isinstance(m, BertSelfAttention)``
true, which is what ``output_attentions=True`` hooks onto in 5.x (``_can_record_outputs``), so
the (quantized) probabilities are returned. Both mask formats the model may build are handled:
eager (additive float) and sdpa (bool, True = attend, or None).

``hidden_states`` feed the query, key and value projections; the self-attention's own
``input_quant`` quantizes them once and the three QuantLinear projections get ``input_quant=None``
(one quantized tensor, as in an integer kernel). ``weight_quant`` / ``output_quant`` are None.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from .attention import _ATTN_MODULES, ATTN_SLOTS, quant_attention, register_attention_quantizers
from .base import QuantModule, adopt, register_quant_module, strip_to
from .config import LayerQuantConfig
from .linear import QUANT_SLOTS, QuantLinear, make_quantizer, quant_input

__all__ = ["QuantBertSelfAttention", "HF_SELF_ATTENTION", "hf_quant_class", "is_hf_self_attention"]

_PROJ = ("query", "key", "value")


def _hf_mask(mask: Any, dtype: torch.dtype, causal: bool, tgt: int, src: int,
             device: torch.device) -> Tensor | None:
    """The model's attention mask as an additive float mask broadcastable to (B, H, L, S)."""
    if mask is None:
        if not (causal and tgt > 1):
            return None
        mask = torch.ones(tgt, src, dtype=torch.bool, device=device).tril_(src - tgt)
    if not isinstance(mask, Tensor):
        raise ValueError(f"quantized attention got a {type(mask).__name__} mask: use "
                         "attn_implementation='eager' or 'sdpa'")
    if mask.dtype == torch.bool:  # sdpa format: True = attend
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


class _QuantSelfAttentionMixin(QuantModule):
    """Explicit, fake-quantized attention for BERT-style self-attention modules."""

    quant_slots = ATTN_SLOTS
    attention_module = True
    _float_cls: type[nn.Module]

    def _init_quant(self, config: LayerQuantConfig | None, convert_children: bool) -> None:
        config = LayerQuantConfig.from_any(config)
        like = self.query.weight
        for name in QUANT_SLOTS:
            self.register_module(name, None)
        register_attention_quantizers(self, config, like)
        if convert_children:
            plain = config.replace(slots={})
            for name in _PROJ:
                if not isinstance(getattr(self, name), QuantLinear):
                    setattr(self, name, QuantLinear.from_float(getattr(self, name), plain))
        # hidden_states feed all three projections: quantize them once, here
        if any(isinstance(getattr(self, n), QuantLinear) for n in _PROJ):
            self.register_module("input_quant", make_quantizer(config.input, None, like))
            for name in _PROJ:
                child = getattr(self, name)
                if isinstance(child, QuantLinear):
                    child.register_module("input_quant", None)

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> Any:
        """Wrap ``module`` (sharing its parameters); ``convert_children`` also wraps
        query / key / value as QuantLinear."""
        float_cls = cls._float_cls
        if type(module) is not float_cls:
            raise ValueError(f"{cls.__name__}.from_float expects {float_cls.__name__}, "
                             f"got {type(module).__name__}")
        new = adopt(cls, module)
        new._init_quant(config, convert_children)
        return new

    def to_float(self) -> nn.Module:
        """The float self-attention with the same (unfolded) parameters."""
        new = strip_to(self._float_cls, self, QUANT_SLOTS + _ATTN_MODULES)
        for name in _PROJ:
            child = self._modules[name]
            if isinstance(child, QuantLinear):
                new._modules[name] = child.to_float()
        return new

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        hidden_states = quant_input(self.input_quant, hidden_states)
        # (B, L, E) -> (B, L, H, D) -> (B, H, L, D)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            from transformers.cache_utils import EncoderDecoderCache

            cache = past_key_values
            if isinstance(past_key_values, EncoderDecoderCache):
                cache = past_key_values.self_attention_cache
            key, value = cache.update(key, value, self.layer_idx)
        mask = _hf_mask(attention_mask, query.dtype, bool(getattr(self, "is_causal", False)),
                        query.shape[2], key.shape[2], query.device)
        p = self.dropout.p if self.training else 0.0
        out, probs = quant_attention(self, query, key, value, mask, self.scaling, p,
                                     scale_first=False)
        out = out.transpose(1, 2).reshape(*input_shape, -1)  # (B, H, L, D) -> (B, L, E)
        return out, probs


def _float_classes() -> dict[str, type[nn.Module]]:
    """The installed BERT-family self-attention classes that share BERT's forward."""
    found = {}
    for mod, name in (("bert", "Bert"), ("roberta", "Roberta"), ("xlm_roberta", "XLMRoberta"),
                      ("electra", "Electra"), ("camembert", "Camembert")):
        try:
            m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        except ImportError:  # pragma: no cover - depends on the transformers build
            continue
        cls = getattr(m, f"{name}SelfAttention", None)
        if cls is not None:
            found[name] = cls
    return found


HF_SELF_ATTENTION: dict[type[nn.Module], type[nn.Module]] = {}
for _name, _cls in _float_classes().items():
    _q = type(f"Quant{_name}SelfAttention", (_QuantSelfAttentionMixin, _cls),
              {"__module__": __name__, "__doc__": f"Fake-quantized ``{_cls.__name__}``.",
               "_float_cls": _cls})
    globals()[_q.__name__] = _q
    HF_SELF_ATTENTION[_cls] = _q
    register_quant_module(_cls, _q)
    if _q.__name__ not in __all__:
        __all__.append(_q.__name__)

QuantBertSelfAttention = globals()["QuantBertSelfAttention"]


def is_hf_self_attention(module: nn.Module) -> bool:
    """True for a float BERT-family self-attention module we can quantize."""
    return type(module) in HF_SELF_ATTENTION


def hf_quant_class(module: nn.Module) -> type[nn.Module]:
    """The quantized class for a float BERT-family self-attention module."""
    return HF_SELF_ATTENTION[type(module)]
