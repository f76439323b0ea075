"""One input quantizer per tensor: wrapped layers that read the same tensor share one quantizer.

Eager wrappers give each layer its own ``input_quant``, so a tensor read by k layers (the
convolutions of a multi-width TextCNN, parallel heads, a custom cell's gates) would be observed
and fake-quantized k times by k quantizers that hold identical state. Graph-mode tools observe
each tensor once; :func:`share_inputs` gets the same in eager mode without tracing: it arms a
one-shot probe that, during the model's next forward, records which QuantLinear / QuantConv1d
layers receive the very same tensor object. After that forward, the input quantizers of each
such group that have equal specs and equal state (they have just observed the same tensor) and
no learnable parameters are tied to one module. The tied quantizer observes and fake-quantizes
the tensor once per model forward and hands the copy to every reader (it holds the copy only
until the forward ends).

Values and observer statistics are those of the untied model; input gradients are equal up to
the order in which the readers' gradients are summed. The tie is visible in ``state_dict`` only
as equal values under each reader's key, so checkpoints load into tied and untied models alike.
Assumption: the readers keep reading one tensor in later forwards (the probe saw them do so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from .linear import QuantConv1d, QuantLinear

__all__ = ["share_inputs", "shared_inputs"]

_READERS = (QuantLinear, QuantConv1d)
_ATTR = "_qat_shared_inputs"


def _equal(u: Tensor, v: Tensor) -> bool:
    """Same shape, dtype and values (NaN equal to NaN: an unset clip fraction is NaN)."""
    return u.shape == v.shape and u.dtype == v.dtype and torch.allclose(
        u, v, rtol=0, atol=0, equal_nan=True)


def _same_state(a: FakeQuantizer, b: FakeQuantizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (a.spec == b.spec and a.track_clipping == b.track_clipping and sa.keys() == sb.keys()
            and all(_equal(sa[k], sb[k]) for k in sa))


def _tieable(q: Any) -> bool:
    return isinstance(q, FakeQuantizer) and next(q.parameters(), None) is None


class _Probe:
    """Forward hooks that watch one forward and then tie the input quantizers."""

    def __init__(self, root: nn.Module) -> None:
        self.readers: dict[int, tuple[Tensor, list[str]]] = {}
        self.handles = [root.register_forward_pre_hook(self.start),
                        root.register_forward_hook(self.finish)]
        for name, m in root.named_modules():
            if isinstance(m, _READERS) and _tieable(m.input_quant):
                self.handles.append(m.register_forward_pre_hook(_Record(self, name)))

    def start(self, root: nn.Module, args: Any) -> None:
        self.readers = {}

    def finish(self, root: nn.Module, args: Any, out: Any) -> None:
        groups = [names for _, names in self.readers.values() if len(names) > 1]
        self.readers = {}
        for h in self.handles:
            h.remove()
        tied = []
        for names in groups:
            layers = [root.get_submodule(n) for n in names]
            first = layers[0].input_quant
            same = [n for n, m in zip(names[1:], layers[1:], strict=True)
                    if m.input_quant is not first and _same_state(first, m.input_quant)]
            for n in same:
                root.get_submodule(n).input_quant = first
            if same:
                first.shared = True
                tied.append([names[0], *same])
        if tied:
            setattr(root, _ATTR, getattr(root, _ATTR, []) + tied)
            root.register_forward_pre_hook(_forget)
            root.register_forward_hook(_forget)


class _Record:
    """Pre-hook of one reader: note which tensor it received."""

    def __init__(self, probe: _Probe, name: str) -> None:
        self.probe, self.name = probe, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            x = args[0]
            self.probe.readers.setdefault(id(x), (x, []))[1].append(self.name)


def _forget(root: nn.Module, args: Any, out: Any = None) -> None:
    """Root pre- and post-hook: the tied quantizers forget the tensor (and its quantized copy)
    of the last forward."""
    for names in getattr(root, _ATTR, ()):
        q = getattr(root.get_submodule(names[0]), "input_quant", None)
        if isinstance(q, FakeQuantizer):  # (an exported copy may have replaced the layer)
            q.forget()


def share_inputs(model: nn.Module) -> nn.Module:
    """Arm the probe on ``model``: its next forward ties the input quantizers of wrapped layers
    that read the same tensor (see the module docstring). Returns ``model``."""
    _Probe(model)
    return model


def shared_inputs(model: nn.Module) -> list[list[str]]:
    """The groups of layers whose input quantizers are tied (empty before the first forward)."""
    return [list(g) for g in getattr(model, _ATTR, [])]
