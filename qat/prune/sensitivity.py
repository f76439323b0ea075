"""Pruning sensitivity: a trained model's metric with one group of layers pruned at a time.

Each group (by default the layers that share a name once their indices are replaced by ``*``:
every ``encoder.layer.*.attention.self.query``) is pruned one-shot by magnitude to each
sparsity with :func:`compute_masks`, the model is evaluated and its weights are restored bit for
bit before the next probe (Distiller's sensitivity analysis). Probe on validation: the groups
that lose most are those to prune less or leave dense (``prune.exclude``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .groups import Target, _inside, excluded_names, match_modules
from .masks import compute_masks, masked_parameters, remove_masks

__all__ = ["SensitivityRow", "layer_groups", "prune_sensitivity", "format_sensitivity"]


class SensitivityRow(NamedTuple):
    group: str
    sparsity: float
    metric: float


def layer_groups(model: nn.Module, targets: Sequence[Target],
                 exclude: Sequence[Target] = ()) -> dict[str, list[str]]:
    """{pattern: module names}: the modules ``targets`` select, less those inside the modules
    ``exclude`` selects (as ``prune.exclude`` does), grouped by their name with every index
    replaced by ``*`` (``layer.3.output.dense`` -> ``layer.*.output.dense``)."""
    dense = excluded_names(model, exclude)
    groups: dict[str, list[str]] = {}
    for name, _ in match_modules(model, targets, label="sensitivity target"):
        if not _inside(name, dense):
            key = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)
            groups.setdefault(key, []).append(name)
    return groups


@torch.no_grad()
def prune_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    groups: Mapping[str, Sequence[str]],
    sparsities: Sequence[float],
    scope: str = "layer",
) -> list[SensitivityRow]:
    """``evaluate(model)`` with each group pruned to each sparsity (magnitude, unstructured),
    one group at a time; a first row (group ``"none"``, sparsity 0) is the model as it is. The
    model's parameters and buffers are restored exactly after every probe. A model that
    carries pruning masks already is refused (probe the dense model it came from)."""
    if masked_parameters(model):
        raise ValueError("prune_sensitivity: the model carries pruning masks already; probe "
                         "the dense model it came from")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [SensitivityRow("none", 0.0, float(evaluate(model)))]
    try:
        for group, names in groups.items():
            for s in sparsities:
                compute_masks(model, list(names), float(s), scope=scope)
                remove_masks(model)
                rows.append(SensitivityRow(group, float(s), float(evaluate(model))))
                model.load_state_dict(saved, strict=True)
    finally:
        remove_masks(model)
        model.load_state_dict(saved, strict=True)
    return rows


def format_sensitivity(rows: Sequence[SensitivityRow], metric: str = "metric") -> str:
    """A table: one line per group, one column per sparsity (the metric, and its change)."""
    base = next((r.metric for r in rows if r.group == "none"), float("nan"))
    sparsities = sorted({r.sparsity for r in rows if r.group != "none"})
    groups = list(dict.fromkeys(r.group for r in rows if r.group != "none"))
    width = max([len(g) for g in groups] + [len("group")])
    head = f"{'group':<{width}}" + "".join(f"  {f'{s:g}':>16}" for s in sparsities)
    lines = [f"{metric} of the unpruned model: {base:.4f}", head, "-" * len(head)]
    value = {(r.group, r.sparsity): r.metric for r in rows}
    for g in groups:
        cells = []
        for s in sparsities:
            v = value.get((g, s))
            cells.append(f"  {'':>16}" if v is None else f"  {v:>8.4f} ({v - base:+.4f})")
        lines.append(f"{g:<{width}}" + "".join(cells))
    return "\n".join(lines)
