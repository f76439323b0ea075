"""Knowledge distillation settings (the ``distill`` config group of qat-train) and the Distiller
they build."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["KDConfig", "build_distiller"]


@dataclass
class KDConfig:
    """Distillation settings (the ``distill`` config group).

    ``teacher``: ``"float_stage"`` (the float model this run trained or loaded before
    quantization: the usual QAT teacher) or the path of a checkpoint whose model has the
    ``teacher_model`` architecture (a Hydra ``_partial_`` model config; default: the student's).
    """

    temperature: float = 2.0
    alpha: float = 0.5
    teacher: str = "float_stage"
    teacher_model: Any = None
    hidden_pairs: Sequence[Sequence[str]] = field(default_factory=list)
    attention_pairs: Sequence[Sequence[str | int]] = field(default_factory=list)
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    cache_teacher_logits: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise ValueError(f"distill.temperature={self.temperature!r}: allowed a number > 0")
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"distill.alpha={self.alpha!r}: allowed a number in [0, 1]")
        if not self.teacher:
            raise ValueError("distill.teacher is empty: allowed 'float_stage' or a checkpoint path")


def _teacher_from_checkpoint(cfg: KDConfig, student_factory: Callable[[], nn.Module]) -> nn.Module:
    from .teacher import load_teacher

    build = student_factory
    if cfg.teacher_model is not None:
        build = cfg.teacher_model
    return load_teacher(cfg.teacher, build)


def build_distiller(cfg: KDConfig, float_model: nn.Module | None, regression: bool,
                    student_factory: Callable[[], nn.Module], example: dict[str, torch.Tensor]):
    """The :class:`qat.distill.Distiller` for ``cfg``: frozen teacher, loss, layer pairs."""
    from .capture import feature_widths
    from .loss import AttentionLoss, DistillationLoss, HiddenStateLoss
    from .step import Distiller
    from .teacher import TeacherCache

    if cfg.teacher == "float_stage":
        if float_model is None:
            raise ValueError("distill.teacher='float_stage' needs a float stage: set "
                             "baseline_epochs > 0 or init_from, or give a teacher checkpoint")
        teacher = copy.deepcopy(float_model)
    else:
        teacher = _teacher_from_checkpoint(cfg, student_factory)
    hidden = None
    if cfg.hidden_pairs:
        inputs = {k: v for k, v in example.items() if k not in ("labels", "idx")}
        s_w = feature_widths(student_factory(), [s for s, _ in cfg.hidden_pairs], **inputs)
        t_w = feature_widths(teacher, [t for _, t in cfg.hidden_pairs], **inputs)
        hidden = HiddenStateLoss(list(zip(s_w, t_w, strict=True)))
    loss = DistillationLoss(
        temperature=cfg.temperature, alpha=cfg.alpha, regression=regression, hidden=hidden,
        attention=AttentionLoss() if cfg.attention_pairs else None,
        hidden_weight=cfg.hidden_weight, attention_weight=cfg.attention_weight,
    )
    return Distiller(
        teacher, loss, hidden_pairs=cfg.hidden_pairs, attention_pairs=cfg.attention_pairs,
        cache=TeacherCache() if cfg.cache_teacher_logits else None,
    )
