"""The distillation step shared by qat's LightningModule and the DistillationCallback.

:class:`Distiller` holds the frozen teacher, the loss module, the layer pairs and the optional
logit cache; :func:`distill_step` is the plain-function form::

    loss, logs = distill_step(student, teacher, batch, task_loss_fn, DistillationLoss(2.0, 0.5))

``forward_fn(model, batch)`` calls a model on a batch (default: a mapping batch is passed as
keyword arguments without ``idx``/``label``/``labels``; a tuple batch as its first element);
``task_loss_fn(student_output, batch)`` returns the task loss (or None for pure distillation).
Layer pairs are ``(student_name, teacher_name)`` submodule names; attention pairs may also be
ints indexing ``outputs.attentions`` of a Hugging Face model (see :mod:`qat.distill.capture`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .capture import FeatureCapture, first_tensor
from .loss import DistillationLoss
from .teacher import FrozenTeacher, TeacherCache

__all__ = ["Distiller", "distill_step", "default_forward", "default_mask"]

_NOT_INPUTS = ("idx", "label", "labels")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` without index / label keys, ``model(batch[0])`` or ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def default_mask(args: tuple, kwargs: Mapping[str, Any], batch: Any) -> Tensor | None:
    """(B, T) True = real token, from ``attention_mask`` or a ``*key_padding_mask`` argument."""
    am = kwargs.get("attention_mask")
    if isinstance(am, Tensor) and am.dim() == 2:
        return am != 0
    for key in ("src_key_padding_mask", "key_padding_mask"):
        kpm = kwargs.get(key)
        if isinstance(kpm, Tensor) and kpm.dim() == 2:
            return ~kpm.bool() if kpm.dtype == torch.bool else kpm > -1e4
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"] != 0
    return None


def _pairs(pairs: Sequence[Sequence[Any]], field: str, ints: bool) -> list[tuple[Any, Any]]:
    out = []
    for i, p in enumerate(pairs):
        ok = isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(
            isinstance(x, str) or (ints and isinstance(x, int)) for x in p)
        if not ok:
            kinds = "module names or attention indices" if ints else "module names"
            raise ValueError(f"{field}[{i}]={p!r} must be a (student, teacher) pair of {kinds}")
        out.append((p[0], p[1]))
    return out


class Distiller:
    """Teacher, loss, layer pairs and cache: computes the distillation loss of a batch."""

    def __init__(
        self,
        teacher: nn.Module,
        loss: DistillationLoss,
        hidden_pairs: Sequence[Sequence[str]] = (),
        attention_pairs: Sequence[Sequence[str | int]] = (),
        logits_fn: Callable[[Any], Tensor] = first_tensor,
        teacher_logits_fn: Callable[[Any], Tensor] | None = None,
        mask_fn: Callable[[tuple, Mapping[str, Any], Any], Tensor | None] = default_mask,
        cache: TeacherCache | None = None,
        idx_key: str = "idx",
    ) -> None:
        if not isinstance(loss, DistillationLoss):
            raise ValueError(f"loss must be a DistillationLoss, got {type(loss).__name__}")
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.loss = loss
        self.hidden_pairs = _pairs(hidden_pairs, "hidden_pairs", ints=False)
        self.attention_pairs = _pairs(attention_pairs, "attention_pairs", ints=True)
        if self.hidden_pairs and loss.hidden is None:
            raise ValueError("hidden_pairs given but the loss has no HiddenStateLoss: build "
                             "DistillationLoss(hidden=HiddenStateLoss(widths))")
        if loss.hidden is not None and len(loss.hidden.widths) != len(self.hidden_pairs):
            raise ValueError(f"HiddenStateLoss has {len(loss.hidden.widths)} width pairs but "
                             f"hidden_pairs has {len(self.hidden_pairs)}")
        if cache is not None and (self.hidden_pairs or self.attention_pairs):
            raise ValueError("TeacherCache stores logits only: it cannot be combined with "
                             "hidden_pairs / attention_pairs (the teacher must run)")
        self.logits_fn = logits_fn
        self.teacher_logits_fn = teacher_logits_fn or logits_fn
        self.mask_fn, self.cache, self.idx_key = mask_fn, cache, idx_key
        self._teacher_capture = None
        if self.needs_features:
            self._teacher_capture = FeatureCapture(
                self.teacher.module, [t for _, t in self.hidden_pairs],
                [t for _, t in self.attention_pairs])

    @property
    def needs_features(self) -> bool:
        return bool(self.hidden_pairs or self.attention_pairs)

    def teacher_to(self, device: torch.device) -> None:
        """Move the teacher to ``device`` (no-op when it is there)."""
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != device:
            self.teacher.to(device)

    def student_capture(self, student: nn.Module) -> FeatureCapture:
        """A capture of the student's layers named in the pairs (and of its root call)."""
        return FeatureCapture(student, [s for s, _ in self.hidden_pairs],
                              [s for s, _ in self.attention_pairs])

    def _batch_idx(self, batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or self.idx_key not in batch:
            raise ValueError(f"TeacherCache needs batch[{self.idx_key!r}] (example indices); "
                             "the batch has no such key")
        return batch[self.idx_key]

    def teacher_outputs(
        self, call: Callable[[nn.Module], Any], batch: Any
    ) -> tuple[Tensor, FeatureCapture | None]:
        """Teacher logits (from the cache when possible) and the teacher capture (if any)."""
        run = lambda: self.teacher_logits_fn(call(self.teacher)).detach()
        if self.cache is not None:
            return self.cache.get_or_compute(self._batch_idx(batch), run), None
        if self._teacher_capture is None:
            return run(), None
        with self._teacher_capture as cap:
            logits = run()
        return logits, cap

    def compute(
        self,
        student_output: Any,
        student_cap: FeatureCapture | None,
        call_args: tuple,
        call_kwargs: Mapping[str, Any],
        teacher_call: Callable[[nn.Module], Any],
        task_loss: Tensor | None,
        batch: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its parts for one batch whose student forward is done."""
        t_logits, t_cap = self.teacher_outputs(teacher_call, batch)
        s_logits = self.logits_fn(student_output)
        feats: dict[str, Any] = {}
        if self.needs_features:
            assert student_cap is not None and t_cap is not None
            feats["mask"] = self.mask_fn(call_args, call_kwargs, batch)
            if self.hidden_pairs:
                feats["student_hidden"] = student_cap.hidden_list()
                feats["teacher_hidden"] = t_cap.hidden_list()
            if self.attention_pairs:
                s_att, s_pad = student_cap.attention_list()
                feats["student_attn"], feats["teacher_attn"] = s_att, t_cap.attention_list()[0]
                feats["attn_masks"] = [None if p is None else ~p for p in s_pad]
        if t_cap is not None:
            t_cap.clear()  # drop references to the teacher's tensors
        return self.loss(s_logits, t_logits.to(s_logits.device), task_loss, **feats)

    def step(
        self,
        student: nn.Module,
        batch: Any,
        task_loss_fn: Callable[[Any, Any], Tensor | None] | None,
        forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the student (and the teacher) on ``batch`` and return (loss, logged parts)."""
        self.teacher_to(next(student.parameters()).device)
        cap = self.student_capture(student)
        with cap:
            out = forward_fn(student, batch)
        task = task_loss_fn(out, batch) if task_loss_fn is not None else None
        return self.compute(out, cap, cap.args, cap.kwargs, lambda t: forward_fn(t, batch),
                            task, batch)


def distill_step(
    student: nn.Module,
    teacher: nn.Module | Distiller,
    batch: Any,
    task_loss_fn: Callable[[Any, Any], Tensor | None] | None,
    loss: DistillationLoss | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    **distiller_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One distillation step: ``(loss, logs)``. ``teacher`` may be a prebuilt :class:`Distiller`
    (then ``loss`` and ``distiller_kwargs`` must be omitted); otherwise a Distiller is built
    from ``teacher``, ``loss`` and ``distiller_kwargs`` (pairs, cache, logits_fn, ...)."""
    if isinstance(teacher, Distiller):
        if loss is not None or distiller_kwargs:
            raise ValueError("distill_step: pass loss and options to the Distiller, not both")
        distiller = teacher
    else:
        if loss is None:
            raise ValueError("distill_step: loss (a DistillationLoss) is required")
        distiller = Distiller(teacher, loss, **distiller_kwargs)
    return distiller.step(student, batch, task_loss_fn, forward_fn)
