"""Magnitude pruning masks: computed from an absolute target sparsity, stored as buffers.

Conventions:

* A mask is a bool buffer ``<param>_mask`` (True = keep) registered on the module that owns the
  parameter, so it is part of ``state_dict`` (checkpoints, export and convert see it).
* Masks are applied **in place** (``param.data.mul_(mask)``): before every forward of the owning
  module (a forward pre-hook, so weight fake-quantizers observe pruned weights) and whenever
  :func:`apply_masks` is called (the callback calls it after every optimizer step). In-place
  keeps the storage, so ``nn.LSTM`` flat weights stay valid. A gradient hook zeroes the gradient
  of pruned elements so optimizer moments do not accumulate there (unless
  :func:`keep_raw_gradients` asks for the whole gradient: movement scores read it, and the
  callback zeroes the pruned part before the optimizer step).
* :func:`compute_masks` recomputes every mask from the **absolute** target sparsity and the
  current weights (not as a fraction of the survivors of the previous step). Pruned weights are
  exactly zero, so they score lowest and stay pruned: masks are monotone in practice.
* Scores: unstructured uses ``|w|`` (``criterion="magnitude"``) or, given ``scores``, a score
  per element (``criterion="movement"``: :class:`qat.prune.movement.MovementScores`, which
  also brings back the values of pruned elements that rank among the kept again); structured
  groups (rows, LSTM hidden units, heads) use the L1 or L2 norm of their weight elements
  divided by the element count (mean ``|w|`` / RMS), so groups of different sizes compare
  under ``scope="global"``. Biases follow their group's mask
  but are not scored and not counted in the sparsity.
* ``scope="layer"``: every unit (tensor, LSTM layer, attention module) gets ``round(s * groups)``
  groups pruned. ``scope="global"``: one ranking over all units; unstructured prunes exactly
  ``round(s * total)`` elements, structured the prefix of lowest groups whose element count is
  closest to ``s * total``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..nn.base import check_prunable
from .groups import STRUCTURES, Part, Target, Unit, build_units

__all__ = [
    "SCOPES",
    "CRITERIA",
    "keep_raw_gradients",
    "NORMS",
    "compute_masks",
    "register_masks",
    "apply_masks",
    "mask_gradients",
    "masked_parameters",
    "remove_masks",
    "SparsityRow",
    "sparsity_report",
    "format_sparsity",
    "total_sparsity",
]

SCOPES = ("layer", "global")
NORMS = ("l1", "l2")
CRITERIA = ("magnitude", "movement")
_HANDLES = "_qat_prune_handles"
_RAW_GRADS = "_qat_raw_gradients"


# ---- mask buffers and hooks ----------------------------------------------------------------
def _masks_of(module: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(param name, param, mask) for every masked parameter owned directly by ``module``."""
    out = []
    for bname, mask in module._buffers.items():
        if mask is None or not bname.endswith("_mask"):
            continue
        p = module._parameters.get(bname[:-5])
        if isinstance(p, Tensor):
            out.append((bname[:-5], p, mask))
    return out


def _tracing() -> bool:
    """Inside torch.compile / torch.export / jit tracing (in-place ``.data`` writes break them;
    the weights are already masked there)."""
    c = torch.compiler
    return c.is_compiling() or getattr(c, "is_exporting", lambda: False)() or \
        torch.jit.is_tracing()


def _apply_module(module: nn.Module, *_: object) -> None:
    """Forward pre-hook: zero the pruned elements of ``module``'s own parameters in place."""
    if _tracing():
        return
    for _, p, mask in _masks_of(module):
        p.data.mul_(mask)


def _grad_hook(module: nn.Module, mask_name: str, grad: Tensor) -> Tensor:
    if module.__dict__.get(_RAW_GRADS):
        return grad
    return grad * getattr(module, mask_name)


def keep_raw_gradients(model: nn.Module, on: bool = True) -> None:
    """Leave the gradients of the pruned elements of ``model``'s masked modules in place during
    backward (``on``) or zero them there (the default); :func:`mask_gradients` zeroes them."""
    for m in model.modules():
        if _masks_of(m):
            m.__dict__[_RAW_GRADS] = bool(on)


def _ensure_hooks(module: nn.Module) -> None:
    """Install (once per module / parameter object) the forward pre-hook and gradient hooks."""
    handles = module.__dict__.setdefault(_HANDLES, {})
    if not any(h is _apply_module for h in module._forward_pre_hooks.values()):
        handles["pre"] = (id(module), module.register_forward_pre_hook(_apply_module))
    for pname, p, _ in _masks_of(module):
        key = f"grad:{pname}"
        if p.requires_grad and (key not in handles or handles[key][0] != id(p)):
            handles[key] = (id(p), p.register_hook(partial(_grad_hook, module, f"{pname}_mask")))


def _set_mask(module: nn.Module, pname: str, keep: Tensor) -> None:
    check_prunable(module, pname)
    bname = f"{pname}_mask"
    p = getattr(module, pname)
    keep = keep.to(device=p.device, dtype=torch.bool).reshape(p.shape)
    old = module._buffers.get(bname)
    if isinstance(old, Tensor) and old.shape == p.shape:
        old.copy_(keep)
    else:
        module.register_buffer(bname, keep.clone(memory_format=torch.contiguous_format))
    _ensure_hooks(module)


def masked_parameters(model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(qualified name, parameter, mask) for every masked parameter of ``model``."""
    out = []
    for mname, m in model.named_modules():
        for pname, p, mask in _masks_of(m):
            out.append((f"{mname}.{pname}" if mname else pname, p, mask))
    return out


@torch.no_grad()
def apply_masks(model: nn.Module) -> nn.Module:
    """Zero every pruned weight in place (and re-install hooks lost by a deepcopy)."""
    for m in model.modules():
        if _masks_of(m):
            _apply_module(m)
            _ensure_hooks(m)
    return model


@torch.no_grad()
def mask_gradients(model: nn.Module) -> nn.Module:
    """Zero the gradients of pruned elements in place (idempotent with the gradient hooks)."""
    for _, p, mask in masked_parameters(model):
        if p.grad is not None:
            p.grad.mul_(mask)
    return model


def remove_masks(model: nn.Module, keep_buffers: bool = False) -> nn.Module:
    """Bake the masks into the weights and remove the hooks (and the buffers, by default)."""
    apply_masks(model)
    for m in model.modules():
        for _, handle in m.__dict__.pop(_HANDLES, {}).values():
            handle.remove()
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _apply_module]:
            del m._forward_pre_hooks[key]  # copies of the hook made by deepcopy
        if not keep_buffers:
            for pname, _, _ in _masks_of(m):
                del m._buffers[f"{pname}_mask"]
    return model


# ---- computing masks -----------------------------------------------------------------------
def _check(scope: str, structure: str, norm: str, sparsity: float) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: allowed {list(SCOPES)}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: allowed {list(STRUCTURES)}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: allowed {list(NORMS)}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")


def _count(s: float, n: int) -> int:
    return min(int(math.floor(s * n + 0.5)), n)


def _group_scores(unit: Unit, norm: str) -> tuple[Tensor, Tensor]:
    """Per-group normalised norm and weight-element count of a structured unit."""
    dev = unit.parts[0].tensor.device
    total = torch.zeros(unit.groups, dtype=torch.float64, device=dev)
    size = torch.zeros(unit.groups, dtype=torch.float64, device=dev)
    for part in unit.parts:
        if not part.counts:
            continue
        w = part.tensor.detach().float()
        ax = part.axis % w.dim()
        v = w.abs() if norm == "l1" else w * w
        others = [d for d in range(w.dim()) if d != ax]
        per = (v.sum(dim=others) if others else v).double()  # (shape[ax],)
        ids = part.ids(w.shape[ax], w.device)
        sel = ids >= 0
        total.index_add_(0, ids[sel], per[sel])
        size.index_add_(0, ids[sel], torch.full_like(per[sel], w.numel() / w.shape[ax]))
    mean = total / size.clamp_min(1)
    return (mean if norm == "l1" else mean.sqrt()), size


def _write_group_masks(unit: Unit, keep: Tensor) -> None:
    for part in unit.parts:
        w = part.tensor
        ax = part.axis % w.dim()
        ids = part.ids(w.shape[ax], w.device)
        k = keep.to(w.device)[ids.clamp_min(0)] | (ids < 0)  # (shape[ax],)
        view = [1] * w.dim()
        view[ax] = -1
        _set_mask(part.module, part.param, k.view(view).expand(w.shape))  # (n,) -> w.shape


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest entries of a 1-D tensor (exactly k, ties by index)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    return ~keep


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    targets: Sequence[Target],
    sparsity: float,
    scope: str = "layer",
    structure: str = "unstructured",
    norm: str = "l1",
    exclude: Sequence[Target] = (),
    scores: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Recompute the masks of ``targets`` (less the modules ``exclude`` selects) for an
    absolute ``sparsity`` and apply them. ``scores`` ({qualified parameter name: tensor of its
    shape}, higher = keep; unstructured only) replace ``|w|``; with them a pruned element may
    rank among the kept again (its weight stays zero: :class:`MovementScores` restores it).

    Returns {qualified parameter name: bool mask (True = keep)}.
    """
    _check(scope, structure, norm, sparsity)
    if scores is not None and structure != "unstructured":
        raise ValueError(f"scores (criterion='movement') need structure='unstructured', "
                         f"got {structure!r}")
    units = build_units(model, targets, structure, exclude)
    s = float(sparsity)
    if structure == "unstructured":
        parts = [u.parts[0] for u in units]

        def score(p: Part) -> Tensor:  # (numel,) float
            w = p.tensor.detach().reshape(-1)
            if scores is None:
                return w.abs().float()
            if p.name not in scores:
                raise KeyError(f"no score for {p.name!r}")
            return scores[p.name].detach().to(w.device, torch.float32).reshape(-1)

        if scope == "layer":
            for p in parts:
                _set_mask(p.module, p.param, ~_lowest(score(p), _count(s, p.tensor.numel())))
        else:
            flat = torch.cat([score(p) for p in parts])
            pruned = _lowest(flat, _count(s, flat.numel()))
            for p, chunk in zip(parts, pruned.split([p.tensor.numel() for p in parts]),
                                strict=True):
                _set_mask(p.module, p.param, ~chunk)
    else:
        stats = [_group_scores(u, norm) for u in units]
        if scope == "layer":
            for u, (score, _) in zip(units, stats, strict=True):
                _write_group_masks(u, ~_lowest(score, _count(s, u.groups)))
        else:
            scores = torch.cat([sc for sc, _ in stats])
            sizes = torch.cat([sz for _, sz in stats])
            order = torch.argsort(scores, stable=True)
            cum = torch.cat([sizes.new_zeros(1), sizes[order].cumsum(0)])  # (G + 1,)
            m = int(torch.argmin((cum - s * float(sizes.sum())).abs()))
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[order[:m]] = False
            for u, chunk in zip(units, keep.split([u.groups for u in units]), strict=True):
                _write_group_masks(u, chunk)
    apply_masks(model)
    return {name: mask for name, _, mask in masked_parameters(model)
            if name in {p.name for u in units for p in u.parts}}


@torch.no_grad()
def register_masks(
    model: nn.Module, targets: Sequence[Target], structure: str = "unstructured",
    exclude: Sequence[Target] = (),
) -> list[str]:
    """Register all-ones masks on ``targets`` less ``exclude`` (existing masks are kept), so
    that a pruned checkpoint loads into the model. Returns the masked parameter names."""
    names = []
    for u in build_units(model, targets, structure, exclude):
        for p in u.parts:
            if f"{p.param}_mask" not in p.module._buffers:
                _set_mask(p.module, p.param, torch.ones_like(p.tensor, dtype=torch.bool))
            else:
                _ensure_hooks(p.module)
            names.append(p.name)
    return names


# ---- reporting -----------------------------------------------------------------------------
class SparsityRow(NamedTuple):
    name: str
    numel: int
    zeros: int
    sparsity: float


@torch.no_grad()
def sparsity_report(model: nn.Module) -> list[SparsityRow]:
    """One row per masked parameter: element count, exact zeros and their fraction."""
    rows = []
    for name, p, _ in masked_parameters(model):
        zeros = int((p == 0).sum())
        rows.append(SparsityRow(name, p.numel(), zeros, zeros / max(p.numel(), 1)))
    return rows


def total_sparsity(rows: Sequence[SparsityRow], weights_only: bool = True) -> float:
    """Fraction of zeros over all rows (by default biases are left out)."""
    sel = [r for r in rows if not weights_only or "bias" not in r.name.rsplit(".", 1)[-1]]
    n = sum(r.numel for r in sel)
    return sum(r.zeros for r in sel) / n if n else 0.0


def format_sparsity(rows: Sequence[SparsityRow]) -> str:
    """The report as an aligned text table with a total line (weights only)."""
    head = f"{'parameter':<56} {'numel':>10} {'zeros':>10} {'sparsity':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name[-56:]:<56} {r.numel:>10} {r.zeros:>10} {r.sparsity:>8.4f}")
    w = [r for r in rows if "bias" not in r.name.rsplit(".", 1)[-1]]
    lines.append("-" * len(head))
    lines.append(f"{'total (weights)':<56} {sum(r.numel for r in w):>10} "
                 f"{sum(r.zeros for r in w):>10} {total_sparsity(rows):>8.4f}")
    return "\n".join(lines)
