"""Which parameters a pruning target selects, and how their elements form prunable groups.

A *target* is a module type (``nn.Linear``), a glob over qualified module names
(``"encoder.layers.*.linear1"``) or ``"type:ClassName"`` (matches the class or any base class of
that name, so ``"type:Linear"`` also selects a quantized subclass of ``nn.Linear``). A matched
module contributes its own weights; a container with no weight of its own contributes the
Linear / Conv / RNN / attention modules inside it.

A *unit* is what ``scope="layer"`` prunes to the target sparsity on its own: one weight tensor
(unstructured, rows), one LSTM layer and direction (rows: a hidden unit's gate rows in
``weight_ih`` and ``weight_hh`` together) or one attention module (heads). Each part of a unit
maps its elements to group ids (-1 = not pruned by this structure).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Target", "Part", "Unit", "STRUCTURES", "match_modules", "excluded_names",
           "build_units"]

Target = str | type
STRUCTURES = ("unstructured", "rows", "heads")
_LEAF_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase, nn.MultiheadAttention)


@dataclass
class Part:
    """One parameter of a unit. Structured parts group the slices of the parameter along
    ``axis`` (0: rows, -1: columns): ``ids(n, device)`` gives the group of each of the ``n``
    slices (-1 = not pruned by this structure). Unstructured parts have ``axis=None``."""

    module: nn.Module
    module_name: str
    param: str
    axis: int | None = None
    ids: Callable[[int, torch.device], Tensor] | None = None
    counts: bool = True  # a weight (scored, counted in sparsity); biases only follow the mask

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)


@dataclass
class Unit:
    name: str
    parts: list[Part]
    groups: int  # number of prunable groups; 0 = unstructured (every element is a group)


# ---- matching ------------------------------------------------------------------------------
def _type_matches(module: nn.Module, cls_name: str) -> bool:
    short = cls_name.rsplit(".", 1)[-1]
    return any(c.__name__ == short for c in type(module).__mro__)


def _matches(name: str, module: nn.Module, target: Target) -> bool:
    if isinstance(target, type):
        return isinstance(module, target)
    if target.startswith("type:"):
        return _type_matches(module, target[5:])
    return name == target or fnmatch.fnmatchcase(name, target)


def match_modules(model: nn.Module, targets: Sequence[Target], label: str = "pruning target",
                  required: bool = True) -> list[tuple[str, nn.Module]]:
    """Modules selected by any target, in ``named_modules`` order; a target matching nothing
    raises ValueError naming it (``label``), unless it ends with ``?`` (optional: generic configs
    list every type); no module matched at all raises too when ``required``."""
    if isinstance(targets, (str, type)):
        targets = [targets]
    if not targets:
        raise ValueError("targets is empty: give module types or name patterns")
    for t in targets:
        if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
            raise ValueError(f"target {t!r} must be a name pattern or an nn.Module subclass")
    named = list(model.named_modules())
    out, seen = [], set()
    for t in targets:
        optional = isinstance(t, str) and t.endswith("?")
        pattern = t[:-1] if optional else t
        hits = [(n, m) for n, m in named if _matches(n, m, pattern)]
        if not hits and not optional:
            raise ValueError(f"{label} {t!r} matched no module of {type(model).__name__}"
                             " (end it with '?' if it may match none)")
        for n, m in hits:
            if id(m) not in seen:
                seen.add(id(m))
                out.append((n, m))
    if not out and required:
        raise ValueError(f"pruning targets {list(targets)} matched no module of "
                         f"{type(model).__name__}")
    order = {id(m): i for i, (_, m) in enumerate(named)}
    return sorted(out, key=lambda nm: order[id(nm[1])])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _expand(name: str, module: nn.Module, leaf: Callable[[nn.Module], bool]):
    """The module itself if ``leaf`` accepts it, otherwise the accepted modules inside it."""
    if leaf(module):
        yield name, module
        return
    for sub_name, sub in module.named_modules():
        if sub is not module and leaf(sub):
            yield _join(name, sub_name), sub


# ---- slice -> group maps ------------------------------------------------------------------
def _rows(period: int | None = None, div: int = 1) -> dict[str, Any]:
    """Row r belongs to group (r % period) // div."""

    def ids(n: int, device: torch.device) -> Tensor:
        r = torch.arange(n, device=device)
        return (r % period if period else r) // div

    return {"axis": 0, "ids": ids}


def _cols(div: int) -> dict[str, Any]:
    """Column c belongs to group c // div."""
    return {"axis": -1, "ids": lambda n, device: torch.arange(n, device=device) // div}


def _bias_rows(start: int, stop: int) -> dict[str, Any]:
    """Element i in [start, stop) belongs to group i - start; the others to none."""

    def ids(n: int, device: torch.device) -> Tensor:
        i = torch.arange(n, device=device)
        return torch.where((i >= start) & (i < stop), i - start, -1)

    return {"axis": 0, "ids": ids}


# ---- prunable weights -----------------------------------------------------------------------
def _has(module: nn.Module, pname: str) -> bool:
    return isinstance(module._parameters.get(pname), Tensor)


def _weights(name: str, module: nn.Module) -> list[Part]:
    """The weights of one module (for unstructured and row pruning)."""
    if isinstance(module, nn.RNNBase):
        return [Part(module, name, p) for p in module._flat_weights_names
                if p.startswith("weight_") and _has(module, p)]
    if isinstance(module, nn.MultiheadAttention):
        own = ["in_proj_weight"] if _has(module, "in_proj_weight") else [
            "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        parts = [Part(module, name, p) for p in own if _has(module, p)]
        return parts + [Part(module.out_proj, _join(name, "out_proj"), "weight")]
    w = module._parameters.get("weight")
    return [Part(module, name, "weight")] if isinstance(w, Tensor) and w.dim() >= 2 else []


def _is_weight_leaf(m: nn.Module) -> bool:
    return isinstance(m, _LEAF_TYPES)


def _row_units(part: Part) -> list[Unit]:
    """Rows (output channels) of one weight, with the matching bias elements."""
    m, p = part.module, part.param
    w = part.tensor
    rows = w.shape[0]
    parts = [Part(m, part.module_name, p, **_rows())]
    if isinstance(m, nn.MultiheadAttention) and _has(m, "in_proj_bias"):
        e = m.embed_dim
        start = {"in_proj_weight": 0, "q_proj_weight": 0, "k_proj_weight": e,
                 "v_proj_weight": 2 * e}[p]
        parts.append(Part(m, part.module_name, "in_proj_bias", **_bias_rows(start, start + rows),
                          counts=False))
    elif p == "weight" and _has(m, "bias") and m.bias.shape[0] == rows:
        parts.append(Part(m, part.module_name, "bias", **_rows(), counts=False))
    return [Unit(part.name, parts, rows)]


def _rnn_row_units(name: str, rnn: nn.RNNBase) -> list[Unit]:
    """One unit per layer and direction: hidden unit j owns rows j, H + j, 2H + j, ..."""
    h = rnn.hidden_size
    units = []
    for pname in rnn._flat_weights_names:
        if not pname.startswith("weight_ih_l") or not _has(rnn, pname):
            continue
        sfx = pname[len("weight_ih_"):]  # e.g. "l0" or "l1_reverse"
        parts = [Part(rnn, name, f"weight_{k}_{sfx}", **_rows(h)) for k in ("ih", "hh")]
        parts += [Part(rnn, name, f"bias_{k}_{sfx}", **_rows(h), counts=False)
                  for k in ("ih", "hh") if _has(rnn, f"bias_{k}_{sfx}")]
        units.append(Unit(_join(name, sfx), parts, h))
    return units


def _is_hf_attention(m: nn.Module) -> bool:
    s, o = getattr(m, "self", None), getattr(m, "output", None)
    return (
        isinstance(s, nn.Module) and all(isinstance(getattr(s, k, None), nn.Linear)
                                         for k in ("query", "key", "value"))
        and hasattr(s, "num_attention_heads")
        and isinstance(getattr(o, "dense", None), nn.Linear)
    )


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or _is_hf_attention(m)


def _head_unit(name: str, m: nn.Module) -> Unit:
    """Heads of nn.MultiheadAttention or a BERT-style attention (``self.query/key/value`` and
    ``output.dense``): q/k/v rows of a head and the output projection's columns."""
    if isinstance(m, nn.MultiheadAttention):
        heads, d, e = m.num_heads, m.head_dim, m.embed_dim
        if _has(m, "in_proj_weight"):
            parts = [Part(m, name, "in_proj_weight", **_rows(e, div=d))]
        else:
            parts = [Part(m, name, p, **_rows(div=d))
                     for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
        if _has(m, "in_proj_bias"):
            parts.append(Part(m, name, "in_proj_bias", **_rows(e, div=d), counts=False))
        parts += [Part(m, name, p, **_cols(d), counts=False)
                  for p in ("bias_k", "bias_v") if _has(m, p)]
        parts.append(Part(m.out_proj, _join(name, "out_proj"), "weight", **_cols(d)))
        return Unit(name, parts, heads)
    s, dense = m.self, m.output.dense
    heads = int(s.num_attention_heads)
    d = int(getattr(s, "attention_head_size", s.query.out_features // heads))
    parts = []
    for k in ("query", "key", "value"):
        lin = getattr(s, k)
        parts.append(Part(lin, _join(name, f"self.{k}"), "weight", **_rows(div=d)))
        if _has(lin, "bias"):
            parts.append(Part(lin, _join(name, f"self.{k}"), "bias", **_rows(div=d),
                              counts=False))
    parts.append(Part(dense, _join(name, "output.dense"), "weight", **_cols(d)))
    return Unit(name, parts, heads)


def excluded_names(model: nn.Module, exclude: Sequence[Target]) -> list[str]:
    """Names of the modules ``exclude`` selects (patterns as for targets; each must match,
    unless it ends with ``?``): they and everything inside them stay dense."""
    if not exclude:
        return []
    return [n for n, _ in match_modules(model, exclude, "prune.exclude:", required=False)]


def _inside(name: str, outer: Sequence[str]) -> bool:
    return any(name == o or name.startswith(o + ".") or o == "" for o in outer)


def build_units(model: nn.Module, targets: Sequence[Target], structure: str,
                exclude: Sequence[Target] = ()) -> list[Unit]:
    """The prunable units selected by ``targets`` under ``structure``, less those inside the
    modules ``exclude`` selects (an output head, say)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: allowed {list(STRUCTURES)}")
    units: list[Unit] = []
    seen: set[tuple[int, str]] = set()
    dense = excluded_names(model, exclude)

    def fresh(parts: Iterable[Part]) -> bool:
        if any(_inside(p.module_name, dense) for p in parts):
            return False
        keys = [(id(p.module), p.param) for p in parts]
        if any(k in seen for k in keys):
            return False
        seen.update(keys)
        return True

    for name, module in match_modules(model, targets):
        if structure == "heads":
            found = list(_expand(name, module, _is_attention))
            if not found:
                raise ValueError(
                    f"structure='heads': target module {name or '<root>'!r} "
                    f"({type(module).__name__}) holds no attention module"
                )
            units += [u for n, m in found if fresh((u := _head_unit(n, m)).parts)]
            continue
        own = bool(_weights(name, module))
        for n, m in [(name, module)] if own else _expand(name, module, _is_weight_leaf):
            if structure == "rows" and isinstance(m, nn.RNNBase):
                units += [u for u in _rnn_row_units(n, m) if fresh(u.parts)]
                continue
            for part in _weights(n, m):
                if structure == "unstructured":
                    if fresh([part]):
                        units.append(Unit(part.name, [part], 0))
                else:
                    units += [u for u in _row_units(part) if fresh(u.parts)]
    if not units:
        raise ValueError(f"pruning targets {list(targets)!r} selected no weight tensor")
    return units
