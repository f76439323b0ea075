"""PruningCallback: gradual magnitude or movement pruning for any Lightning project.

Life cycle:

* ``setup``: registers all-ones mask buffers on the targets, so a pruned checkpoint (masks are in
  the model's ``state_dict``) restores into the model; Lightning restores the model after
  ``setup``.
* ``on_train_batch_start``: the target sparsity is ``schedule(trainer.global_step)`` (a pure
  function of the optimizer step); when it differs from the last applied value the masks are
  recomputed from the absolute target. Masks are then applied.
* ``on_before_optimizer_step``: with ``criterion="movement"`` the movement scores are updated
  from the whole gradient (:mod:`qat.prune.movement`); then pruned gradients are zeroed
  (besides the gradient hooks of magnitude pruning).
* ``on_train_batch_end`` (after the optimizer step): masks applied again, so the weights that
  a checkpoint or the next forward sees are exactly zero even with momentum / Adam.

The callback's own state (last applied sparsity, number of updates, movement scores) is saved
in checkpoints.
Until the masks reach the final sparsity, :class:`qat.callbacks.BestCheckpoint` keeps no epoch as
the best one (``final_model_reached``): a pruned row is the model at its final sparsity.
Prune a *prepared* (fake-quant) model after ``qat.prepare``: masks live on the modules that own
the parameters, and a module swap made after pruning would drop them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from .groups import Target
from .masks import (
    CRITERIA,
    NORMS,
    SCOPES,
    apply_masks,
    compute_masks,
    keep_raw_gradients,
    mask_gradients,
    register_masks,
    sparsity_report,
    total_sparsity,
)
from .movement import MovementScores
from .schedule import SparsitySchedule, make_schedule, relative

__all__ = ["PruningCallback"]


class PruningCallback(pl.Callback):
    """Magnitude or movement pruning of ``targets`` following ``schedule``.

    Args:
        schedule: a :class:`SparsitySchedule` or a mapping for :func:`make_schedule`; with
            ``start_fraction`` / ``end_fraction`` the steps are fractions of the fit's optimizer
            steps (``trainer.estimated_stepping_batches``), resolved when training starts.
        targets: module types, name globs or ``"type:ClassName"`` (see ``qat.prune.groups``).
        exclude: modules to leave dense, named as targets are (``["classifier"]``: the output
            head of every qat model); each must match a module, unless it ends with ``?``.
        scope: ``"layer"`` (every tensor / unit to the target) or ``"global"`` (one threshold).
        structure: ``"unstructured"``, ``"rows"`` or ``"heads"``.
        norm: ``"l1"`` or ``"l2"`` group score for structured pruning.
        module: attribute path of the submodule of the LightningModule to prune ("" = all).
        log: log ``prune/target`` every step and ``prune/sparsity`` at every mask update.
        criterion: ``"magnitude"`` (``|w|``) or ``"movement"`` (Sanh et al. 2020: scores take
            Adam steps along ``-grad * w``, the weights that training moves towards zero go
            first and pruned ones may come back; unstructured only; the schedule must leave
            steps before its first pruning step to score them; :mod:`qat.prune.movement`).
    """

    def __init__(
        self,
        schedule: SparsitySchedule | Mapping[str, Any],
        targets: Sequence[Target],
        scope: str = "layer",
        structure: str = "unstructured",
        norm: str = "l1",
        module: str = "",
        log: bool = True,
        verbose: bool = False,
        exclude: Sequence[Target] = (),
        criterion: str = "magnitude",
    ) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: allowed {list(SCOPES)}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: allowed {list(CRITERIA)}")
        if criterion == "movement" and structure != "unstructured":
            raise ValueError(f"criterion='movement' needs structure='unstructured', got "
                             f"{structure!r}")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: allowed {list(NORMS)}")
        self._relative = dict(schedule) if relative(schedule) else None
        # validated now (with a stand-in length); resolved to steps when training starts
        self.schedule = make_schedule(schedule, 1000 if self._relative else None)
        self.targets = [targets] if isinstance(targets, (str, type)) else list(targets)
        self.exclude = [exclude] if isinstance(exclude, (str, type)) else list(exclude)
        self.scope, self.structure, self.norm = scope, structure, norm
        self.module_path, self.log, self.verbose = module, log, verbose
        self.criterion = criterion
        self.movement = MovementScores() if criterion == "movement" else None
        self.last_sparsity: float | None = None
        self.updates = 0

    # ---- helpers --------------------------------------------------------------------------
    def _root(self, pl_module: pl.LightningModule) -> nn.Module:
        root: nn.Module = pl_module
        for part in filter(None, self.module_path.split(".")):
            if not hasattr(root, part):
                raise ValueError(f"PruningCallback.module={self.module_path!r}: no submodule "
                                 f"{part!r} in {type(root).__name__}")
            root = getattr(root, part)
        return root

    def update(self, pl_module: pl.LightningModule, step: int) -> bool:
        """Recompute the masks if the scheduled sparsity at ``step`` changed; True if it did."""
        target = float(self.schedule(step))
        if self.last_sparsity is not None and target == self.last_sparsity:
            return False
        root = self._root(pl_module)
        if self.movement is not None and target > 0:
            if self.movement.steps == 0:
                raise ValueError(
                    f"criterion='movement': the schedule prunes to {target:g} at step {step}, "
                    "before any optimizer step has scored a weight: start it later "
                    "(start_step / start_fraction > 0)")
            self.movement.prune(root, self.targets, target, self.scope, self.exclude)
        else:
            compute_masks(root, self.targets, target, self.scope, self.structure, self.norm,
                          self.exclude)
        self.last_sparsity = target
        self.updates += 1
        if self.log or self.verbose:
            achieved = total_sparsity(sparsity_report(root))
            if self.log:
                pl_module.log("prune/sparsity", achieved, on_step=True, on_epoch=False)
            if self.verbose:
                print(f"[prune] step {step}: target {target:.4f}, achieved {achieved:.4f}")
        return True

    def final_model_reached(self, trainer: pl.Trainer) -> bool:
        """The masks have the schedule's final sparsity (:class:`qat.callbacks.Scheduled`: the
        best checkpoint is chosen among such epochs only)."""
        return self.last_sparsity is not None and self.last_sparsity >= self.schedule.final

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        register_masks(self._root(pl_module), self.targets, self.structure, self.exclude)
        if self.movement is not None:  # scores read the whole gradient (masked before the step)
            keep_raw_gradients(self._root(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._relative is not None:
            self.schedule = make_schedule(self._relative, int(trainer.estimated_stepping_batches))
        apply_masks(self._root(pl_module))  # masks restored from a checkpoint

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.update(pl_module, trainer.global_step)
        apply_masks(self._root(pl_module))
        if self.log:
            pl_module.log("prune/target", float(self.last_sparsity), on_step=True, on_epoch=False)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.movement is not None:
            self.movement.update(self._root(pl_module))
        mask_gradients(self._root(pl_module))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        apply_masks(self._root(pl_module))

    # ---- state ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            targets=[t if isinstance(t, str) else t.__name__ for t in self.targets],
            structure=self.structure, module=self.module_path,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_sparsity": self.last_sparsity, "updates": self.updates}
        if self.movement is not None:
            state["movement"] = self.movement.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_sparsity = state_dict.get("last_sparsity")
        self.updates = int(state_dict.get("updates", 0))
        if self.movement is not None and "movement" in state_dict:
            self.movement.load_state_dict(state_dict["movement"])
