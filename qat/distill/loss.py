"""Distillation losses: logits (KL or MSE), hidden states and attention maps.

Logit convention (Hinton et al.)::

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * task_loss

with KL averaged over examples (``batchmean``; leading dims beyond the batch count as examples).
The ``T^2`` factor keeps the soft-target gradient magnitude independent of ``T``. For regression
(``regression=True``, e.g. STS-B with one output) the KL term is replaced by
``MSE(student, teacher)`` (no temperature). Without a task loss (``task_loss=None``) the loss is
the distillation term alone (``alpha`` is not applied).

Intermediate terms are added with their own weights: ``hidden_weight * hidden_mse +
attention_weight * attention_mse``. :class:`HiddenStateLoss` owns learned projections (student
width -> teacher width) when the widths differ: they are parameters of the loss module, so the
optimizer must include ``loss.parameters()`` (qat's LightningModule and the
``DistillationCallback`` register the loss as a submodule of the LightningModule for that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["kd_kl_loss", "HiddenStateLoss", "AttentionLoss", "DistillationLoss"]


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over examples (float32)."""
    c = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, c) / temperature  # (..., C) -> (N, C)
    t = teacher_logits.detach().float().reshape(-1, c) / temperature  # (..., C) -> (N, C)
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean",
                  log_target=True)
    return kl * temperature**2


def _masked_mean(sq: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``sq`` over the positions where ``valid`` (broadcast) is True."""
    if valid is None:
        return sq.mean()
    w = valid.to(sq.dtype).expand_as(sq)
    return (sq * w).sum() / w.sum().clamp_min(1.0)


def _position_mask(mask: Tensor | None, feat: Tensor) -> Tensor | None:
    """A (B, T) validity mask shaped to broadcast over features (..., D)."""
    if mask is None or feat.dim() < 3:
        return None
    lead = feat.shape[:-1]
    if mask.shape == lead:
        return mask.bool().unsqueeze(-1)  # (B, T) -> (B, T, 1)
    if mask.dim() == 2 and mask.t().shape == lead:
        return mask.bool().t().unsqueeze(-1)  # (B, T) -> (T, B, 1) for sequence-first features
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not match features {tuple(lead)}")


class HiddenStateLoss(nn.Module):
    """Mean over layer pairs of MSE(proj(student_hidden), teacher_hidden).

    ``widths``: one (student width, teacher width) per pair; a pair of different widths gets a
    learned ``nn.Linear(student, teacher)`` projection (identity otherwise). Features are
    (..., D) with the feature dimension last; padding positions are excluded with ``mask``.
    """

    def __init__(self, widths: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        if not widths:
            raise ValueError("HiddenStateLoss.widths is empty: give one (student, teacher) pair")
        for i, pair in enumerate(widths):
            if len(pair) != 2 or min(int(pair[0]), int(pair[1])) < 1:
                raise ValueError(f"HiddenStateLoss.widths[{i}]={pair!r} must be two widths >= 1")
        self.widths = [(int(a), int(b)) for a, b in widths]
        self.proj = nn.ModuleList(
            nn.Linear(a, b) if a != b else nn.Identity() for a, b in self.widths
        )

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None
    ) -> Tensor:
        if len(student) != len(self.proj) or len(teacher) != len(self.proj):
            raise ValueError(f"HiddenStateLoss expects {len(self.proj)} feature pairs, got "
                             f"{len(student)} student / {len(teacher)} teacher tensors")
        terms = []
        for proj, s, t in zip(self.proj, student, teacher, strict=True):
            s = proj(s.float())
            t = t.detach().float()
            if s.shape != t.shape:
                raise ValueError(f"hidden state shapes differ after projection: student "
                                 f"{tuple(s.shape)}, teacher {tuple(t.shape)}")
            terms.append(_masked_mean((s - t).pow(2), _position_mask(mask, s)))
        return torch.stack(terms).mean()


class AttentionLoss(nn.Module):
    """Mean over layer pairs of the MSE between attention probability maps (B, H, T, S).

    Only (query, key) pairs where both positions are real tokens count (``mask``: (B, T) True =
    token). Student and teacher must have the same number of heads unless ``average_heads``
    (then the head-averaged maps are compared).
    """

    def __init__(self, average_heads: bool = False) -> None:
        super().__init__()
        self.average_heads = average_heads

    def forward(
        self,
        student: Sequence[Tensor],
        teacher: Sequence[Tensor],
        masks: Sequence[Tensor | None] | Tensor | None = None,
    ) -> Tensor:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"AttentionLoss expects matching non-empty lists, got "
                             f"{len(student)} student / {len(teacher)} teacher maps")
        if masks is None or isinstance(masks, Tensor):
            masks = [masks] * len(student)
        terms = []
        for s, t, m in zip(student, teacher, masks, strict=True):
            s, t = s.float(), t.detach().float()
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(f"attention maps must be (B, H, T, S), got {tuple(s.shape)} "
                                 f"and {tuple(t.shape)}")
            if self.average_heads:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)  # (B, H, T, S) -> H=1
            if s.shape != t.shape:
                raise ValueError(f"attention map shapes differ: student {tuple(s.shape)}, "
                                 f"teacher {tuple(t.shape)} (average_heads=True compares "
                                 "head-averaged maps)")
            valid = None
            if m is not None:
                m = m.bool()
                valid = m[:, None, :, None] & m[:, None, None, :]  # (B, T) -> (B, 1, T, S)
            terms.append(_masked_mean((s - t).pow(2), valid))
        return torch.stack(terms).mean()


class DistillationLoss(nn.Module):
    """Logit distillation mixed with the task loss, plus optional intermediate terms.

    ``forward(student_logits, teacher_logits, task_loss, ...) -> (loss, parts)`` where ``parts``
    holds detached values: ``kd``, ``task``, ``hidden``, ``attention`` (those computed) and
    ``loss``.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        regression: bool = False,
        hidden: HiddenStateLoss | None = None,
        attention: AttentionLoss | None = None,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
        for name, w in (("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
            if float(w) < 0:
                raise ValueError(f"{name}={w!r} must be >= 0")
        self.temperature, self.alpha, self.regression = float(temperature), float(alpha), regression
        self.hidden, self.attention = hidden, attention
        self.hidden_weight, self.attention_weight = float(hidden_weight), float(attention_weight)

    def logit_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T^2 KL (classification) or MSE (regression) between student and teacher outputs."""
        if self.regression:
            s, t = student_logits.float().reshape(-1), teacher_logits.detach().float().reshape(-1)
            if s.shape != t.shape:
                raise ValueError(f"regression outputs differ: {tuple(student_logits.shape)} vs "
                                 f"{tuple(teacher_logits.shape)}")
            return F.mse_loss(s, t)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, "
                             f"teacher {tuple(teacher_logits.shape)}")
        return kd_kl_loss(student_logits, teacher_logits, self.temperature)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        task_loss: Tensor | None = None,
        *,
        student_hidden: Sequence[Tensor] = (),
        teacher_hidden: Sequence[Tensor] = (),
        student_attn: Sequence[Tensor] = (),
        teacher_attn: Sequence[Tensor] = (),
        mask: Tensor | None = None,
        attn_masks: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        kd = self.logit_term(student_logits, teacher_logits)
        parts = {"kd": kd.detach()}
        if task_loss is None:
            loss = kd
        else:
            loss = self.alpha * kd + (1.0 - self.alpha) * task_loss.float()
            parts["task"] = task_loss.detach()
        if student_hidden or teacher_hidden:
            if self.hidden is None:
                raise ValueError("hidden states given but DistillationLoss.hidden is None")
            h = self.hidden(student_hidden, teacher_hidden, mask)
            loss = loss + self.hidden_weight * h
            parts["hidden"] = h.detach()
        if student_attn or teacher_attn:
            att = self.attention if self.attention is not None else AttentionLoss()
            masks = [mask] * len(student_attn) if attn_masks is None else [
                m if m is not None else mask for m in attn_masks]
            a = att(student_attn, teacher_attn, masks)
            loss = loss + self.attention_weight * a
            parts["attention"] = a.detach()
        parts["loss"] = loss.detach()
        return loss, parts
