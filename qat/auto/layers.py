"""What the allocation chooses for: quantizable layers, the groups that move together, formats.

A *layer* is a prepared module (:class:`qat.nn.base.QuantModule`) that owns weight quantizers
(``QuantLinear``, ``QuantConv1d``, ``QuantEmbedding``, ``QuantMultiheadAttention``'s
in-projection, ``QuantLSTM`` with every gate and direction: one module, one width); its input
quantizer is its ``activation_quantizers()["input"]``. A *group* is a set of layers that get one
format:

- layers whose input quantizers are tied (:mod:`qat.nn.sharing`: one quantized tensor, one
  activation width; e.g. a TextCNN's convolutions, custom q/k/v projections);
- layers fed by an input quantizer their parent owns (BERT self-attention: query, key and value
  read the hidden states the attention module quantizes once);
- layers matched by one of the user's ``groups`` patterns.

A *candidate* is a (weight bits, activation bits) pair; activation bits are None for groups whose
members do not all own their input quantizer (embeddings, BERT projections): their activations
keep the base config. Weight bits 2 mean ternary and 1 binary (weight-only modes), 3-8 integers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..nn.base import QuantModule, quant_layers
from ..nn.sharing import shared_inputs
from ..quant.fake_quantizer import FakeQuantizer
from ..quant.spec import QuantSpec

__all__ = ["Layer", "Group", "Candidate", "find_layers", "group_layers", "weight_format",
           "act_format", "candidates"]

_STE = ("ste", "clipped_ste")


@dataclass
class Layer:
    """One module of the prepared model that owns weight quantizers."""

    name: str
    module: nn.Module
    weights: list[tuple[str, FakeQuantizer]]  # (parameter name, its quantizer at the base spec)
    input_quant: FakeQuantizer | None  # its own input quantizer (None: none or the parent's)
    act_base: QuantSpec | None  # the spec of the activations it reads (own or parent's)

    def param(self, pname: str) -> Tensor:
        return getattr(self.module, pname)

    @property
    def numel(self) -> int:
        return sum(self.param(p).numel() for p, _ in self.weights)

    @property
    def weight_base(self) -> QuantSpec:
        return self.weights[0][1].spec


@dataclass
class Group:
    """Layers that get one format; ``act_choice``: every member owns its input quantizer, so
    the activation width can be chosen."""

    layers: list[Layer]
    act_choice: bool
    why: str = ""
    macs: float = 0.0  # multiply-accumulates per example, summed over the members
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [layer.name for layer in self.layers]

    @property
    def name(self) -> str:
        more = len(self.names) - 1
        return self.names[0] + (f" (+{more})" if more else "")

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)


@dataclass(frozen=True, order=True)
class Candidate:
    """A weight width and an activation width (None: the base activations, not chosen)."""

    w: int
    a: int | None = None

    @property
    def wlabel(self) -> str:
        return {1: "binary", 2: "ternary"}.get(self.w, f"int{self.w}")

    @property
    def label(self) -> str:
        """``int4``, ``ternary``, ``int8/a4`` (weights / activations)."""
        return self.wlabel + (f"/a{self.a}" if self.a is not None else "")


def weight_format(base: QuantSpec, bits: int) -> QuantSpec:
    """The weight spec of width ``bits`` derived from ``base`` (granularity, observer and
    estimator kept where the mode allows): 1 binary, 2 ternary, 3-8 integer."""
    if bits in (1, 2):
        est = base.estimator if base.estimator in _STE else "ste"
        mode = "binary" if bits == 1 else "ternary"
        return base.replace(bits=bits, mode=mode, symmetric=True, signed=True,
                            narrow_range=False, estimator=est)
    if not 3 <= bits <= 8:
        raise ValueError(f"weight width {bits} is invalid: allowed 1 (binary), 2 (ternary), 3-8")
    est = base.estimator if base.mode == "int" else "clipped_ste"
    return base.replace(bits=bits, mode="int", estimator=est)


def act_format(base: QuantSpec, bits: int) -> QuantSpec:
    """The activation spec of width ``bits`` derived from ``base``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation width {bits} is invalid: allowed 2-8")
    return base.replace(bits=bits)


def candidates(group: Group, weight_bits: Sequence[int],
               act_bits: Sequence[int]) -> list[Candidate]:
    """Every (weight, activation) pair the group can take."""
    acts: Sequence[int | None] = act_bits if group.act_choice else (None,)
    return [Candidate(w, a) for w in sorted(set(weight_bits)) for a in acts]


def _input_quantizer(module: nn.Module) -> FakeQuantizer | None:
    return module.activation_quantizers().get("input") if isinstance(module, QuantModule) \
        else None


def find_layers(model: nn.Module) -> list[Layer]:
    """The layers of a prepared model, in ``named_modules`` order."""
    modules = dict(model.named_modules())
    layers = []
    for name, module in quant_layers(model):
        ws = list(module.weight_quantizers().items())
        if not ws:
            continue
        own = _input_quantizer(module)
        act = own.spec if own is not None else None
        if own is None and not isinstance(module, nn.Embedding):
            parent = _feeding_parent(modules, name)
            act = _input_quantizer(parent).spec if parent is not None else None
        layers.append(Layer(name, module, ws, own, act))
    return layers


def _feeding_parent(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The nearest ancestor that owns an input quantizer (it quantizes what the layer reads)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        m = modules.get(".".join(parts[:i]))
        if m is not None and _input_quantizer(m) is not None:
            return m
    return None


def group_layers(model: nn.Module, layers: list[Layer],
                 patterns: Sequence[str] = ()) -> list[Group]:
    """Union of the layers that must agree (see the module docstring), in model order."""
    index = {layer.name: i for i, layer in enumerate(layers)}
    parent = list(range(len(layers)))
    why = [""] * len(layers)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(names: Sequence[str], reason: str) -> None:
        ids = [index[n] for n in names if n in index]
        for j in ids[1:]:
            a, b = find(ids[0]), find(j)
            if a != b:
                parent[b] = a
                why[a] = why[a] or why[b] or reason

    for tie in shared_inputs(model):
        union(tie, "shared input quantizer")
    modules = dict(model.named_modules())
    by_parent: dict[int, list[str]] = {}
    for layer in layers:
        if layer.input_quant is None and not isinstance(layer.module, nn.Embedding):
            p = _feeding_parent(modules, layer.name)
            if p is not None:
                by_parent.setdefault(id(p), []).append(layer.name)
    for names in by_parent.values():
        union(names, "input quantized by their parent")
    for pat in patterns:
        hits = [n for n in index if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"autoquant groups pattern {pat!r} matches no quantizable layer")
        union(hits, f"pattern {pat!r}")
    members: dict[int, list[Layer]] = {}
    for i, layer in enumerate(layers):
        members.setdefault(find(i), []).append(layer)
    groups = []
    for root, ls in members.items():
        choice = all(layer.input_quant is not None for layer in ls)
        groups.append(Group(ls, choice, why[root]))
    return groups
