"""Agreement between an exported model and the fake-quant model it came from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Agreement", "compare_predictions", "ort_predict", "torch_predict"]

Predict = Callable[[Mapping[str, Tensor]], np.ndarray]


@dataclass
class Agreement:
    """Prediction agreement and accuracies (``None`` without labels) over ``n`` examples;
    ``max_abs_diff`` is the largest logit difference."""

    n: int
    agree: float
    acc_reference: float | None
    acc_candidate: float | None
    max_abs_diff: float

    @property
    def acc_delta(self) -> float | None:
        if self.acc_reference is None or self.acc_candidate is None:
            return None
        return self.acc_candidate - self.acc_reference

    def ok(self, min_agree: float = 0.995, max_acc_delta: float = 0.001) -> bool:
        """Agreement at least ``min_agree`` and |accuracy delta| at most ``max_acc_delta``."""
        delta = self.acc_delta
        return self.agree >= min_agree and (delta is None or abs(delta) <= max_acc_delta)

    def __str__(self) -> str:
        acc = "" if self.acc_delta is None else (
            f", accuracy {self.acc_reference:.4f} -> {self.acc_candidate:.4f}")
        return f"{self.n} examples: agreement {self.agree:.4%}{acc}, max |dlogit| " \
            f"{self.max_abs_diff:.3g}"


def torch_predict(model: nn.Module, keys: Iterable[str] | None = None) -> Predict:
    """Logits of a PyTorch model called with the batch's tensors (``keys``: which ones)."""
    keys = tuple(keys) if keys is not None else None

    @torch.no_grad()
    def run(batch: Mapping[str, Tensor]) -> np.ndarray:
        kw = {k: v for k, v in batch.items() if k != "labels" and (keys is None or k in keys)}
        out = model(**kw)
        out = out.logits if hasattr(out, "logits") else out
        return out.float().numpy()

    return run


def ort_predict(session: Any) -> Predict:
    """Logits of an onnxruntime session fed with the batch's tensors named like its inputs."""
    names = [i.name for i in session.get_inputs()]

    def run(batch: Mapping[str, Tensor]) -> np.ndarray:
        missing = [n for n in names if batch.get(n) is None]
        if missing:
            raise ValueError(f"the ONNX model needs inputs {missing} that the batch lacks")
        return session.run(None, {n: batch[n].numpy() for n in names})[0]

    return run


def compare_predictions(reference: Predict, candidate: Predict,
                        batches: Iterable[Mapping[str, Any]]) -> Agreement:
    """Run both predictors on every batch; compare argmax predictions (and with ``labels``,
    accuracies)."""
    n = agree = right_ref = right_cand = 0
    labelled = True
    worst = 0.0
    for batch in batches:
        a, b = reference(batch), candidate(batch)
        worst = max(worst, float(np.abs(a - b).max()))
        pa, pb = a.argmax(-1), b.argmax(-1)
        n += len(pa)
        agree += int((pa == pb).sum())
        labels = batch.get("labels")
        if labels is None or labels.dtype.is_floating_point:
            labelled = False
            continue
        y = labels.numpy()
        right_ref += int((pa == y).sum())
        right_cand += int((pb == y).sum())
    if n == 0:
        raise ValueError("compare_predictions got no examples")
    return Agreement(n, agree / n, right_ref / n if labelled else None,
                     right_cand / n if labelled else None, worst)
