"""One definition of a quantized layer: the :class:`QuantModule` base and the float-to-wrapper
registry.

Every wrapper (``QuantLinear``, ``QuantConv1d``, ``QuantEmbedding``, ``QuantMultiheadAttention``,
``QuantTransformerEncoderLayer``, ``QuantLSTM``, the Hugging Face attention wrappers) derives from
:class:`QuantModule` and answers, for itself only (not its children):

- ``from_float(module, config)`` / ``to_float()``: wrap a float module (sharing its parameters)
  and back;
- ``weight_quantizers()``: parameter name -> weight FakeQuantizer;
- ``activation_quantizers()``: slot (``input``, ``output``, attention ``q`` / ``k`` / ``v`` /
  ``attn``, LSTM cell slots) -> FakeQuantizer.

Surgery, ``convert``, the export paths, the model size, the LSTM and the callback enumerate
quantizers only through these methods (:func:`quant_layers`, :func:`weight_quantizers`), and
``prepare`` finds the wrapper of a float module with :func:`quant_class_for` (exact type: a
subclass with its own forward is not assumed to compute what its parent computes).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from ..quant.fake_quantizer import FakeQuantizer

__all__ = [
    "QuantModule",
    "register_quant_module",
    "quant_class_for",
    "registered_quant_modules",
    "quant_layers",
    "weight_quantizers",
    "layer_quantizers",
    "adopt",
    "strip_to",
    "check_prunable",
]


def adopt(cls: type[nn.Module], module: nn.Module) -> Any:
    """A new ``cls`` instance that shares ``module``'s parameters, buffers, children and hooks.

    Container attributes (parameter / module / hook dicts) are copied, so later changes to one
    module's structure do not leak into the other; tensors are shared.
    """
    new = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in vars(module).items()}
    new.__dict__.update(state)
    return new


def strip_to(float_cls: type[nn.Module], module: nn.Module, slots: tuple[str, ...]) -> Any:
    """Inverse of :func:`adopt`: a ``float_cls`` instance without the quantizer ``slots``."""
    new = adopt(float_cls, module)
    for name in slots:
        new._modules.pop(name, None)
        new.__dict__.pop(name, None)
    new.__dict__.pop("_float_cls", None)
    return new


class QuantModule:
    """Base of every quantized wrapper (a mixin: wrappers also subclass their torch module).

    Class attributes: ``quant_slots``, the layer-specific activation slots its config may set
    (attention: q, k, v, attn; LSTM: the cell slots); ``attention_module``: True when the
    wrapper exists to quantize attention matmuls (``prepare`` swaps it only with attention on);
    ``weight_name``: the parameter a single ``weight_quant`` quantizes.
    """

    quant_slots: ClassVar[tuple[str, ...]] = ()
    attention_module: ClassVar[bool] = False
    weight_name: ClassVar[str] = "weight"

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None,
                   convert_children: bool = True) -> Any:  # pragma: no cover - abstract
        """Wrap ``module`` (sharing its parameters) with quantizers built from ``config``;
        ``convert_children`` also wraps the float sublayers it owns (attention projections)."""
        raise NotImplementedError

    def to_float(self) -> nn.Module:  # pragma: no cover - abstract
        """The float module with the same (unfolded) parameters."""
        raise NotImplementedError

    def weight_quantizers(self) -> dict[str, FakeQuantizer]:
        """Parameter name -> weight quantizer, for this layer's own parameters."""
        wq = self._modules.get("weight_quant")  # type: ignore[attr-defined]
        if isinstance(wq, FakeQuantizer):
            return {self.weight_name: wq}
        if isinstance(wq, nn.ModuleDict):
            return {k: q for k, q in wq.items() if isinstance(q, FakeQuantizer)}
        return {}

    def activation_quantizers(self) -> dict[str, FakeQuantizer]:
        """Slot -> quantizer of this layer's own activations (``input``, ``output`` and the
        layer-specific slots), the ones that exist."""
        out = {}
        for slot in ("input", "output", *self.quant_slots):
            q = self._modules.get(f"{slot}_quant")  # type: ignore[attr-defined]
            if isinstance(q, FakeQuantizer):
                out[slot] = q
        return out

    def drop_weight_quantizers(self) -> None:
        """Remove the weight quantizers (after their weights were folded onto the grid)."""
        if self._modules.get("weight_quant") is not None:  # type: ignore[attr-defined]
            self.weight_quant = None


def check_prunable(module: nn.Module, pname: str, where: str = "") -> None:
    """Raise ValueError when a pruning mask on ``module.<pname>`` cannot keep its zeros through
    the layer's weight quantizer: binary weights are sign(w) * alpha and sign(0) = +1, so a
    pruned weight would come back as +alpha. Every other weight mode maps 0 to exactly 0."""
    if not isinstance(module, QuantModule):
        return
    q = module.weight_quantizers().get(pname)
    if q is not None and q.spec.mode == "binary":
        name = f"{where}.{pname}" if where else f"{type(module).__name__}.{pname}"
        raise ValueError(f"{name}: binary weights cannot be pruned (sign(0) = +1: a pruned "
                         "weight would be +alpha): allowed mode 'ternary' or 'int' for pruned "
                         "layers, or leave this layer unpruned")


_REGISTRY: dict[type[nn.Module], type[QuantModule]] = {}


def register_quant_module(float_cls: type[nn.Module], quant_cls: type[QuantModule]) -> None:
    """Make ``prepare`` wrap modules of exactly ``float_cls`` with ``quant_cls``."""
    if not (isinstance(quant_cls, type) and issubclass(quant_cls, QuantModule)):
        raise TypeError(f"{quant_cls!r} is not a QuantModule subclass")
    _REGISTRY[float_cls] = quant_cls


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The wrapper registered for ``type(module)`` (exact type), or None."""
    return _REGISTRY.get(type(module))


def registered_quant_modules() -> dict[type[nn.Module], type[QuantModule]]:
    """A copy of the registry: float type -> wrapper."""
    return dict(_REGISTRY)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """Every quantized layer of ``model`` with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            yield name, m


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, FakeQuantizer]]:
    """Every (layer name, layer, parameter name, weight quantizer) of ``model``."""
    for name, m in quant_layers(model):
        for pname, q in m.weight_quantizers().items():
            yield name, m, pname, q  # type: ignore[misc]


def layer_quantizers(model: nn.Module) -> Iterator[tuple[str, str, FakeQuantizer]]:
    """Every quantizer of ``model`` once, as (qualified quantizer name, role, quantizer): role is
    ``weight:<param>`` or the activation slot. A quantizer shared by several layers (tied
    inputs) is listed under its first owner."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: set[int] = set()
    for _, m in quant_layers(model):
        roles = [(f"weight:{p}", q) for p, q in m.weight_quantizers().items()]
        roles += list(m.activation_quantizers().items())
        for role, q in roles:
            if id(q) not in seen:
                seen.add(id(q))
                yield names.get(id(q), role), role, q
