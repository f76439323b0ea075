"""Movement pruning (Sanh et al. 2020, hard movement): keep the weights that training moves away
from zero.

Every element has a score ``S`` whose gradient is ``dL/dS = grad * w`` (the straight-through
estimator of the paper), for the pruned elements too: their gradient is the whole one
(``keep_raw_gradients``: the loss's slope at the pruned, zero, weight) and their ``w`` the
value they had when pruned, kept aside. The scores take Adam steps, as the paper trains them
(its scores are parameters of AdamW): a weight scores by how steadily training pushes it away
from zero, not by ``|grad * w|``, which at a trained model is noise as large as the weight (plain
sums ``-sum grad * w`` pruned 19 % of MiniLM's largest weights at 5 % sparsity and its STS-B
validation Pearson fell from 0.83 to 0.04). At each mask update the top ``1 - s`` scores are
kept, so a pruned weight whose score climbs back comes back with its old value. Unstructured
only. The paper measured it on large tasks (MNLI, QQP, SQuAD); on STS-B (5.7k examples) MiniLM
did worse with it than with magnitude, and than with a random choice (README, Results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .groups import Target
from .masks import compute_masks, masked_parameters

__all__ = ["MovementScores"]


class MovementScores:
    """Movement scores, their Adam moments and the values of the pruned weights, per masked
    parameter of a model (names relative to it). ``steps``: optimizer steps scored so far.
    ``betas`` / ``eps``: Adam's; the step size does not change a ranking (1)."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12) -> None:
        self.betas, self.eps = betas, eps
        self.scores: dict[str, Tensor] = {}
        self.moments: dict[str, tuple[Tensor, Tensor]] = {}  # Adam's m and v of grad * w
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
        """One Adam step of every masked parameter's scores along ``-grad * w`` (the whole
        gradient: call before :func:`mask_gradients`); False, nothing changed, when a gradient
        is not finite (an fp16 step the scaler skips)."""
        moves = [(name, p, p.grad.float() * self._dense(name, p, mask).float())
                 for name, p, mask in masked_parameters(model) if p.grad is not None]
        if not all(bool(torch.isfinite(m).all()) for _, _, m in moves):
            return False
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps  # bias corrections
        for name, p, u in moves:
            sc = self.scores.get(name)
            if sc is None or sc.shape != p.shape:
                sc = self.scores[name] = torch.zeros_like(p, dtype=torch.float32)
                self.moments[name] = (torch.zeros_like(sc), torch.zeros_like(sc))
            elif sc.device != p.device:
                sc = self.scores[name] = sc.to(p.device)
                self.moments[name] = tuple(t.to(p.device) for t in self.moments[name])
            m, v = self.moments[name]
            m.mul_(b1).add_(u, alpha=1 - b1)
            v.mul_(b2).addcmul_(u, u, value=1 - b2)
            sc.sub_((m / c1) / ((v / c2).sqrt_().add_(self.eps)))
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
                "moments": {k: (m.cpu(), v.cpu()) for k, (m, v) in self.moments.items()},
                "dense": {k: v.cpu() for k, v in self.dense.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.steps = int(state.get("steps", 0))  # type: ignore[call-overload]
        self.scores = {k: v.clone() for k, v in dict(state.get("scores", {})).items()}
        self.moments = {k: (m.clone(), v.clone())
                        for k, (m, v) in dict(state.get("moments", {})).items()}
        self.dense = {k: v.clone() for k, v in dict(state.get("dense", {})).items()}
