"""Movement pruning (Sanh et al. 2020, hard movement): keep the weights that training moves away
from zero.

Scores accumulate ``S -= grad * w`` at every optimizer step over *every* element, the pruned
ones included: their gradient is the whole one (``keep_raw_gradients``: the loss's slope at the
pruned, zero, weight) and their ``w`` the value they had when pruned, kept aside. At each mask
update the top ``1 - s`` scores are kept, so a pruned weight whose score climbs back comes back
with its old value (the straight-through estimator of the paper, with the masks still applied
in place). Unstructured only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .groups import Target
from .masks import compute_masks, masked_parameters

__all__ = ["MovementScores"]


class MovementScores:
    """Movement scores and the values of the pruned weights, per masked parameter of a model
    (names relative to it). ``steps``: optimizer steps scored so far."""

    def __init__(self) -> None:
        self.scores: dict[str, Tensor] = {}
        self.dense: dict[str, Tensor] = {}  # the weights as if nothing were pruned
        self.steps = 0

    def _dense(self, name: str, p: Tensor, mask: Tensor) -> Tensor:
        """The weight with its pruned elements at the values they had when pruned."""
        d = self.dense.get(name)
        if d is None or d.shape != p.shape:
            d = self.dense[name] = p.detach().clone()
        elif d.device != p.device:
            d = self.dense[name] = d.to(p.device)
        return torch.where(mask, p.detach(), d)

    @torch.no_grad()
    def update(self, model: nn.Module) -> bool:
        """``S -= grad * w`` for every masked parameter of ``model`` that has a gradient (the
        whole gradient: call before :func:`mask_gradients`); False, nothing added, when a
        gradient is not finite (an fp16 step the scaler skips)."""
        moves = [(name, p, p.grad.float() * self._dense(name, p, mask).float())
                 for name, p, mask in masked_parameters(model) if p.grad is not None]
        if not all(bool(torch.isfinite(m).all()) for _, _, m in moves):
            return False
        for name, p, m in moves:
            sc = self.scores.get(name)
            if sc is None or sc.shape != p.shape:
                sc = self.scores[name] = torch.zeros_like(p, dtype=torch.float32)
            elif sc.device != p.device:
                sc = self.scores[name] = sc.to(p.device)
            sc.sub_(m)
        self.steps += 1
        return True

    @torch.no_grad()
    def remember(self, model: nn.Module) -> None:
        """Keep aside the current values of the kept weights (call before the masks change)."""
        for name, p, mask in masked_parameters(model):
            self.dense[name] = self._dense(name, p, mask)

    @torch.no_grad()
    def prune(self, model: nn.Module, targets: Sequence[Target], sparsity: float,
              scope: str = "layer", exclude: Sequence[Target] = ()) -> dict[str, Tensor]:
        """Masks from the scores at ``sparsity``: the newly pruned weights' values are kept
        aside, the weights pruned before that rank among the kept again get theirs back."""
        self.remember(model)
        masks = compute_masks(model, targets, sparsity, scope, "unstructured", "l1", exclude,
                              scores=self.scores)
        for name, p, mask in masked_parameters(model):
            if name in masks:
                p.data.copy_(torch.where(mask, self.dense[name], torch.zeros_like(p)))
        return masks

    def state_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "scores": {k: v.cpu() for k, v in self.scores.items()},
                "dense": {k: v.cpu() for k, v in self.dense.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.steps = int(state.get("steps", 0))  # type: ignore[call-overload]
        self.scores = {k: v.clone() for k, v in dict(state.get("scores", {})).items()}
        self.dense = {k: v.clone() for k, v in dict(state.get("dense", {})).items()}
