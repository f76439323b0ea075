"""Task metrics against direct NumPy/SciPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from qat.data.metrics import main_metric, task_metrics
from qat.data.tasks import TASKS, get_task


def _mcc(y: np.ndarray, p: np.ndarray) -> float:
    tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
    fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
    return float((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))


@pytest.fixture
def binary() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 2, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    logits[y == 1, 1] += 0.8  # better than chance
    return logits, y, logits.argmax(1).numpy(), y.numpy()


def test_cola_mcc_and_accuracy(binary) -> None:
    logits, y, p, yn = binary
    m = task_metrics("cola")
    for i in range(0, 200, 50):  # batched updates
        m.update(logits[i : i + 50], y[i : i + 50])
    out = m.compute()
    assert set(out) == {"accuracy", "mcc"}
    assert float(out["mcc"]) == pytest.approx(_mcc(yn, p), abs=1e-5)
    assert float(out["accuracy"]) == pytest.approx(float(np.mean(p == yn)), abs=1e-6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_positive_class_f1(binary, task: str) -> None:
    logits, y, p, yn = binary
    m = task_metrics(task, prefix="val/")
    m.update(logits, y)
    out = m.compute()
    tp = np.sum((p == 1) & (yn == 1))
    f1 = 2 * tp / (np.sum(p == 1) + np.sum(yn == 1))
    assert float(out["val/f1"]) == pytest.approx(f1, abs=1e-5)
    assert float(out["val/accuracy"]) == pytest.approx(float(np.mean(p == yn)), abs=1e-6)


def test_stsb_correlations() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.rand(300, generator=g) * 5
    preds = (target + torch.randn(300, generator=g)).unsqueeze(1)  # (B, 1) model output
    m = task_metrics("stsb")
    m.update(preds, target)
    out = m.compute()
    x, t = preds.squeeze(1).numpy(), target.numpy()
    assert float(out["pearson"]) == pytest.approx(stats.pearsonr(x, t)[0], abs=1e-4)
    assert float(out["spearman"]) == pytest.approx(stats.spearmanr(x, t)[0], abs=1e-4)


def test_newsgroups_macro_f1() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 20, (500,), generator=g)
    logits = torch.randn(500, 20, generator=g)
    logits[torch.arange(500), y] += 1.5
    m = task_metrics("20newsgroups")
    m.update(logits, y)
    out = m.compute()
    p, yn = logits.argmax(1).numpy(), y.numpy()
    f1s = []
    for c in range(20):
        tp, fp, fn = (np.sum((p == c) & (yn == c)), np.sum((p == c) & (yn != c)),
                      np.sum((p != c) & (yn == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert float(out["macro_f1"]) == pytest.approx(float(np.mean(f1s)), abs=1e-5)
    assert float(out["accuracy"]) == pytest.approx(float(np.mean(p == yn)), abs=1e-6)


def test_mnli_three_way_and_fresh_collections() -> None:
    m1, m2 = task_metrics("mnli"), task_metrics("mnli")
    m1.update(torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]]), torch.tensor([0, 1, 1]))
    assert float(m1.compute()["accuracy"]) == pytest.approx(2 / 3)
    m2.update(torch.tensor([[3.0, 0, 0]]), torch.tensor([1]))
    assert float(m2.compute()["accuracy"]) == 0.0  # independent state


def test_every_task_monitors_one_of_its_metrics() -> None:
    for name, info in TASKS.items():
        assert main_metric(name) in task_metrics(info)
        assert get_task(name) is info
        assert (info.num_labels == 1) == info.is_regression
        assert len(info.label_names) == (0 if info.is_regression else info.num_labels)
