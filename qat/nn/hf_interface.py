"""Quantized attention for Hugging Face modules that dispatch through ``ALL_ATTENTION_FUNCTIONS``
(transformers 5.x): DistilBERT's and ALBERT's attention, and the cross-attention of BERT-family
decoders (their self-attention has its own wrapper, :mod:`qat.nn.hf`).

These modules compute the projections themselves and hand (query, key, value, mask) to the
function ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``. The
wrapper (a subclass of the model's own class, so ``isinstance`` checks and the
``output_attentions`` hooks still apply) keeps the parent's forward and gives the module a view
of the model config whose ``_attn_implementation`` is ``"qat_quant"``: a function registered
with transformers' ``AttentionInterface`` that computes the attention explicitly with the
module's ``q_quant``, ``k_quant``, ``attn_quant`` and ``v_quant`` around both matmuls. Only the
wrapped module sees that name: the model still builds its masks for its own implementation
(eager: additive float, sdpa: bool or None; both are handled). The projections are ordinary
``nn.Linear`` children (QuantLinear after ``prepare``); the ones that read the same hidden
states share one input quantizer (:mod:`qat.nn.sharing`).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

from .attention import _ATTN_MODULES, ATTN_SLOTS, quant_attention, register_attention_quantizers
from .base import QuantModule, adopt, register_quant_module, strip_to
from .config import LayerQuantConfig
from .hf import _hf_mask
from .linear import QUANT_SLOTS, QuantLinear

__all__ = ["IMPLEMENTATION", "quant_attention_function", "HF_INTERFACE_ATTENTION"]

IMPLEMENTATION = "qat_quant"


def quant_attention_function(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The ``AttentionInterface`` entry: q (B, H, L, D), k / v (B, H, S, D) -> output
    (B, L, H, D) and probabilities (B, H, L, S), both matmuls on the module's quantizers."""
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"{type(module).__name__}: {key.shape[1]} key heads for "
                         f"{query.shape[1]} query heads (grouped-query attention) is not "
                         "supported by qat's quantized attention")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    mask = _hf_mask(attention_mask, query.dtype, causal, query.shape[2], key.shape[2],
                    query.device)
    out, probs = quant_attention(module, query, key, value, mask, scale, dropout,
                                 scale_first=False)
    return out.transpose(1, 2).contiguous(), probs  # (B, H, L, D) -> (B, L, H, D)


class _QuantConfigView:
    """The model config as one quantized attention module sees it: every attribute is the
    model's, except ``_attn_implementation``."""

    _attn_implementation = IMPLEMENTATION

    def __init__(self, base: Any) -> None:
        self.__dict__["_base"] = base

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("_base")  # absent while unpickling
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_base"], name, value)  # the model's config changes, not the view


class _QuantInterfaceAttentionMixin(QuantModule):
    """Fake-quantized attention for a module that calls ``ALL_ATTENTION_FUNCTIONS``."""

    quant_slots = ATTN_SLOTS
    attention_module = True
    _float_cls: type[nn.Module]

    def _init_quant(self, config: LayerQuantConfig | None, convert_children: bool) -> None:
        config = LayerQuantConfig.from_any(config)
        like = next(self.parameters())
        for name in QUANT_SLOTS:
            self.register_module(name, None)
        register_attention_quantizers(self, config, like)
        if convert_children:
            plain = config.replace(slots={})
            for name, child in list(self._modules.items()):
                if type(child) is nn.Linear:
                    setattr(self, name, QuantLinear.from_float(child, plain))
        if not isinstance(self.config, _QuantConfigView):
            self.config = _QuantConfigView(self.config)

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> Any:
        """Wrap ``module`` (sharing its parameters); ``convert_children`` also wraps its
        nn.Linear children (the projections) as QuantLinear."""
        if type(module) is not cls._float_cls:
            raise ValueError(f"{cls.__name__}.from_float expects {cls._float_cls.__name__}, "
                             f"got {type(module).__name__}")
        new = adopt(cls, module)
        new._init_quant(config, convert_children)
        return new

    def to_float(self) -> nn.Module:
        """The float module with the same (unfolded) parameters and the model's config."""
        new = strip_to(self._float_cls, self, QUANT_SLOTS + _ATTN_MODULES)
        new.config = self.config._base
        for name, child in self._modules.items():
            if isinstance(child, QuantLinear):
                new._modules[name] = child.to_float()
        return new


def _float_classes() -> list[type[nn.Module]]:
    found = []
    names = [("distilbert", "DistilBertSelfAttention"), ("albert", "AlbertAttention")]
    names += [(mod, f"{prefix}CrossAttention") for mod, prefix in (
        ("bert", "Bert"), ("roberta", "Roberta"), ("xlm_roberta", "XLMRoberta"),
        ("electra", "Electra"), ("camembert", "Camembert"))]
    for mod, name in names:
        try:
            m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        except ImportError:  # pragma: no cover - depends on the transformers build
            continue
        cls = getattr(m, name, None)
        if cls is not None:
            found.append(cls)
    return found


def _register() -> dict[type[nn.Module], type[nn.Module]]:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, quant_attention_function)
    out = {}
    for cls in _float_classes():
        q = type(f"Quant{cls.__name__}", (_QuantInterfaceAttentionMixin, cls),
                 {"__module__": __name__, "__doc__": f"Fake-quantized ``{cls.__name__}``.",
                  "_float_cls": cls})
        globals()[q.__name__] = q
        __all__.append(q.__name__)
        register_quant_module(cls, q)
        out[cls] = q
    return out


HF_INTERFACE_ATTENTION = _register()
