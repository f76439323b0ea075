"""Teachers: a frozen, always-eval wrapper, checkpoint loading and a per-example logit cache."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FrozenTeacher", "load_teacher", "load_state_dict_file", "TeacherCache"]


class FrozenTeacher(nn.Module):
    """Wraps a teacher: parameters frozen, always in eval mode, forward under ``no_grad``.

    ``train(True)`` (e.g. from ``trainer.fit``) is ignored, so dropout stays off.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, FrozenTeacher):
            module = module.module
        self.module = module
        for p in self.module.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def _clean_keys(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep ``prefix``-ed keys (stripped) if there are any; drop torch.compile's ``_orig_mod.``."""
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def load_state_dict_file(
    path: str | Path, map_location: str | torch.device = "cpu", weights_only: bool | None = None
) -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint or a plain state_dict file.

    ``weights_only=None`` tries the safe loader first and falls back to full unpickling (with
    a warning) for checkpoints that hold other objects, e.g. hyper-parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"teacher checkpoint {str(path)!r} does not exist")
    if weights_only is None:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:
            warnings.warn(f"{path}: weights_only load failed ({type(err).__name__}); loading "
                          "with weights_only=False: only do this for files you trust",
                          stacklevel=2)
            obj = torch.load(path, map_location=map_location, weights_only=False)
    else:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds no state_dict (a Lightning checkpoint or a "
                         "mapping of tensors)")
    return dict(state)


def load_teacher(
    ckpt_path: str | Path,
    build_fn: Callable[[], nn.Module],
    prefix: str = "model.",
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    weights_only: bool | None = None,
) -> FrozenTeacher:
    """Build the teacher with ``build_fn()`` and load a checkpoint's weights into it.

    Keys starting with ``prefix`` (a LightningModule's ``self.model``) are kept and stripped
    when present. Pruning masks (``*_mask``) the model does not have are dropped: the weights in
    the checkpoint are already masked.
    """
    model = build_fn()
    if not isinstance(model, nn.Module):
        raise ValueError(f"build_fn returned {type(model).__name__}, expected an nn.Module")
    state = _clean_keys(load_state_dict_file(ckpt_path, map_location, weights_only), prefix)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("_mask")}
    result = model.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        warnings.warn(f"teacher {ckpt_path}: missing {result.missing_keys[:5]}, unexpected "
                      f"{result.unexpected_keys[:5]}", stacklevel=2)
    return FrozenTeacher(model)


class TeacherCache:
    """Teacher outputs stored per example index (``batch["idx"]``, a (B,) long tensor).

    The first time an index is seen its output is stored; a batch whose indices are all stored
    is served from the cache and the teacher is skipped. Only valid when an example always
    reaches the teacher as the same input (no data augmentation, no random masking or cropping)
    and the teacher is deterministic (eval mode). Storage grows to the largest index seen.
    ``device`` (default: where the first outputs were) holds the cache.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._values: Tensor | None = None  # (capacity, *row_shape)
        self._filled: Tensor | None = None  # (capacity,) bool
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return 0 if self._filled is None else int(self._filled.sum())

    def clear(self) -> None:
        self._values = self._filled = None
        self.hits = self.misses = 0

    @staticmethod
    def _check_idx(idx: Tensor) -> Tensor:
        if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point:
            raise ValueError("TeacherCache: batch['idx'] must be a 1-D integer tensor of example "
                             f"indices, got {getattr(idx, 'shape', type(idx))}")
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError("TeacherCache: example indices must be >= 0")
        return idx.long()

    def lookup(self, idx: Tensor) -> Tensor | None:
        """The stored outputs for ``idx`` (on ``idx``'s device) if all are stored, else None."""
        idx = self._check_idx(idx)
        if self._filled is None or idx.numel() == 0 or int(idx.max()) >= self._filled.numel():
            self.misses += 1
            return None
        i = idx.to(self._filled.device)
        if not bool(self._filled[i].all()):
            self.misses += 1
            return None
        self.hits += 1
        return self._values[i].to(idx.device)

    def store(self, idx: Tensor, values: Tensor) -> None:
        """Store one output row per index (rows must keep the same shape across batches)."""
        idx = self._check_idx(idx)
        if values.shape[0] != idx.numel():
            raise ValueError(f"TeacherCache.store: {idx.numel()} indices for "
                             f"{values.shape[0]} output rows")
        values = values.detach()
        dev = self.device or values.device
        need = int(idx.max()) + 1 if idx.numel() else 0
        if self._values is None:
            self._values = torch.zeros((need, *values.shape[1:]), dtype=values.dtype, device=dev)
            self._filled = torch.zeros(need, dtype=torch.bool, device=dev)
        elif values.shape[1:] != self._values.shape[1:]:
            raise ValueError(f"TeacherCache.store: row shape {tuple(values.shape[1:])} differs "
                             f"from the stored {tuple(self._values.shape[1:])}")
        cap = self._values.shape[0]
        if need > cap:
            new = max(need, 2 * cap)
            grown = self._values.new_zeros((new, *self._values.shape[1:]))
            grown[:cap] = self._values
            filled = self._filled.new_zeros(new)
            filled[:cap] = self._filled
            self._values, self._filled = grown, filled
        i = idx.to(self._values.device)
        self._values[i] = values.to(self._values.device, self._values.dtype)
        self._filled[i] = True

    def get_or_compute(self, idx: Tensor, compute: Callable[[], Tensor]) -> Tensor:
        """Cached outputs for ``idx``, or ``compute()`` (then stored)."""
        cached = self.lookup(idx)
        if cached is not None:
            return cached
        out = compute()
        self.store(idx, out)
        return out
