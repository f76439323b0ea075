"""DistillationCallback: knowledge distillation for a LightningModule that knows nothing of it.

Design. A callback cannot change the loss Lightning back-propagates once ``training_step`` has
returned, so for the duration of ``fit`` the callback wraps the *instance's* ``training_step``
(``pl_module.training_step = wrapper``; the class and other instances are untouched; the
original is restored at ``on_fit_end`` / ``teardown``). The wrapper:

1. attaches forward hooks to the student submodule (``student``: attribute path inside the
   LightningModule, "" = the module itself) that record its last call's inputs and output, and
   the hidden states / attention maps named in the layer pairs;
2. calls the original ``training_step`` and takes its loss (a tensor, or ``out["loss"]``) as the
   task loss;
3. runs the frozen teacher under ``no_grad`` on **the same inputs** the student received
   (``teacher_inputs_fn(args, kwargs, batch)`` can adapt them), or serves its logits from a
   :class:`TeacherCache` keyed by ``batch[idx_key]``;
4. returns ``DistillationLoss(student_logits, teacher_logits, task_loss, ...)`` in place of the
   task loss (a dict output keeps its other keys) and logs ``distill/<part>``.

Requirements: automatic optimization, and a ``training_step`` that calls the student module once
(the last call is used). The loss module is registered on the LightningModule as
``distill_loss`` at ``setup`` (so learned projections are saved in checkpoints and are included
by a ``configure_optimizers`` that uses ``self.parameters()``); ``on_fit_start`` raises if they
are in no optimizer. The teacher stays on the callback: it is neither checkpointed nor optimized.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from .capture import first_tensor
from .loss import DistillationLoss
from .step import Distiller, default_mask
from .teacher import TeacherCache

__all__ = ["DistillationCallback"]


class DistillationCallback(pl.Callback):
    """Distill ``teacher`` into the LightningModule's ``student`` submodule (see module doc)."""

    def __init__(
        self,
        teacher: nn.Module,
        loss: DistillationLoss,
        student: str = "",
        hidden_pairs: Sequence[Sequence[str]] = (),
        attention_pairs: Sequence[Sequence[str | int]] = (),
        logits_fn: Callable[[Any], Tensor] = first_tensor,
        teacher_logits_fn: Callable[[Any], Tensor] | None = None,
        teacher_inputs_fn: Callable[[tuple, dict, Any], tuple[tuple, dict]] | None = None,
        mask_fn: Callable[[tuple, Mapping[str, Any], Any], Tensor | None] = default_mask,
        cache: TeacherCache | None = None,
        idx_key: str = "idx",
        loss_attr: str = "distill_loss",
        log: bool = True,
    ) -> None:
        super().__init__()
        self.distiller = Distiller(teacher, loss, hidden_pairs, attention_pairs, logits_fn,
                                   teacher_logits_fn, mask_fn, cache, idx_key)
        self.student_path, self.teacher_inputs_fn = student, teacher_inputs_fn
        self.loss_attr, self.log = loss_attr, log
        self._module: pl.LightningModule | None = None

    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher

    @property
    def loss(self) -> DistillationLoss:
        return self.distiller.loss

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        mod: nn.Module = pl_module
        for part in filter(None, self.student_path.split(".")):
            if not isinstance(getattr(mod, part, None), nn.Module):
                raise ValueError(f"DistillationCallback.student={self.student_path!r}: "
                                 f"{type(mod).__name__} has no submodule {part!r}")
            mod = getattr(mod, part)
        return mod

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._student(pl_module)  # validate the path early
        current = getattr(pl_module, self.loss_attr, None)
        if current is None:
            pl_module.add_module(self.loss_attr, self.loss)
        elif current is not self.loss:
            raise ValueError(f"DistillationCallback.loss_attr={self.loss_attr!r}: the "
                             "LightningModule already has a different attribute of that name")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("DistillationCallback needs automatic optimization (training_step "
                             "must return the loss)")
        in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups
                  for p in g["params"]}
        missing = [n for n, p in self.loss.named_parameters()
                   if p.requires_grad and id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"the distillation loss parameters {missing[:3]} are in no optimizer: build the "
                f"optimizer from self.parameters() or add self.{self.loss_attr}.parameters()")
        self.distiller.teacher_to(pl_module.device)
        self._wrap(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    # ---- the wrapped training_step -------------------------------------------------------------
    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if self._module is not None:
            return
        original = pl_module.training_step
        student = self._student(pl_module)
        cap = self.distiller.student_capture(student)
        cb = self

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            with cap:
                out = original(*args, **kwargs)
            if out is None:
                return None
            if cap.calls == 0:
                raise RuntimeError(f"training_step never called the student module "
                                   f"{cb.student_path or type(student).__name__!r}")
            task = out if isinstance(out, Tensor) else out["loss"]

            def teacher_call(t: nn.Module) -> Any:
                a, k = cap.args, dict(cap.kwargs)
                if cb.teacher_inputs_fn is not None:
                    a, k = cb.teacher_inputs_fn(a, k, batch)
                return t(*a, **k)

            loss, parts = cb.distiller.compute(cap.output, cap, cap.args, cap.kwargs,
                                               teacher_call, task, batch)
            n = int(first_tensor(cap.output).shape[0])
            cap.clear()  # do not keep this step's tensors alive until the next one
            if cb.log:
                for k, v in parts.items():
                    pl_module.log(f"distill/{k}", v, on_step=True, on_epoch=False, batch_size=n)
            return loss if isinstance(out, Tensor) else {**out, "loss": loss}

        pl_module.training_step = training_step
        self._module = pl_module

    def _unwrap(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None
