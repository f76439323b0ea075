"""TF-IDF + linear baselines on the same splits as the neural rows (needs scikit-learn:
``pip install "torch==2.13.0" -e ".[baselines]"``).

Word 1-2-grams (the tokenizer of the word-level models), sublinear tf; a linear SVM (classes)
or ridge regression (STS-B) whose regularisation is chosen on the validation split; the test
metric is computed with the task's own metrics (:mod:`qat.data.metrics`). Pairs are encoded as
``[tfidf(a), tfidf(b), tfidf(a) * tfidf(b), cos(a, b)]``. Each task writes
``<output>/<task>_tfidf_linear/seed<seed>/results.json`` in the format of ``qat-train``'s runs,
so ``scripts/report.py`` shows it beside them.

Usage: ``python scripts/baselines.py [--tasks 20newsgroups sst2 cola mrpc stsb rte]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qat.data import GlueDataModule, NewsgroupsDataModule  # noqa: E402
from qat.data.vocab import tokenize  # noqa: E402
from qat.provenance import provenance  # noqa: E402

TASKS = ("20newsgroups", "sst2", "cola", "mrpc", "stsb", "rte")
GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


def _features(vec, split, fit: bool = False):
    from scipy.sparse import hstack

    a = vec.fit_transform(split.texts_a) if fit else vec.transform(split.texts_a)
    if split.texts_b is None:
        return a
    b = vec.transform(split.texts_b)
    ab = a.multiply(b)
    cos = np.asarray(ab.sum(axis=1))  # rows are L2-normalised: the cosine similarity
    return hstack([a, b, ab, cos]).tocsr()


def _score(dm, y_pred: np.ndarray, y: list) -> dict[str, float]:
    metrics = dm.metrics()
    pred = torch.tensor(y_pred, dtype=torch.float32)
    if not dm.is_regression:  # one-hot scores: argmax gives the class
        pred = torch.nn.functional.one_hot(torch.tensor(y_pred).long(), dm.num_labels).float()
    target = torch.tensor(y, dtype=torch.float32 if dm.is_regression else torch.long)
    metrics.update(pred, target)
    return {k: float(v) for k, v in metrics.compute().items()}


def run_task(task: str, data_dir: str | None, seed: int, output: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.svm import LinearSVC

    dm = (NewsgroupsDataModule(data_dir, seed=seed) if task == "20newsgroups"
          else GlueDataModule(task, data_dir, seed=seed))
    dm.setup("fit")
    tr, va, te = (dm.splits[k][0] for k in ("train", "val", "test"))
    vec = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                          ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    if tr.texts_b is None:
        x_tr = vec.fit_transform(tr.texts_a)
    else:
        vec.fit(tr.texts_a + tr.texts_b)
        x_tr = _features(vec, tr)
    x_va, x_te = _features(vec, va), _features(vec, te)
    main = dm.main_metric
    best = None
    for c in GRID:
        clf = (Ridge(alpha=1.0 / c) if dm.is_regression else LinearSVC(C=c)).fit(x_tr, tr.labels)
        val = _score(dm, clf.predict(x_va), va.labels)[main]
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    test = _score(dm, clf.predict(x_te), te.labels)
    coef = np.asarray(clf.coef_)
    name = f"{dm.task_name}_tfidf_linear".replace("20newsgroups", "20ng")
    res = {
        "name": name, "command": f"python scripts/baselines.py --tasks {task} --seed {seed}",
        **provenance(), "data": dm.describe(), "model": "tfidf-linear",
        "selected": {"C": c, f"val/{main}": val, "features": int(x_tr.shape[1])},
        "monitor": f"val/{main}", "stages": {"fp32": {f"test/{k}": v for k, v in test.items()}},
        "size": {"fp32_bytes": int(coef.size * 4), "quantized_bytes": None},
    }
    out = output / name / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=os.environ.get("QAT_DATA_DIR"))
    p.add_argument("--output", default=os.environ.get("QAT_OUTPUT_DIR", str(ROOT / "outputs")))
    args = p.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit('scripts/baselines.py needs scikit-learn: pip install "torch==2.13.0" '
                         '-e ".[baselines]"') from None
    for task in args.tasks:
        t0 = time.time()
        res = run_task(task, args.data_dir, args.seed, Path(args.output))
        metric = res["monitor"].split("/")[-1]
        print(f"{res['name']}: test {metric} {res['stages']['fp32'][f'test/{metric}']:.4f} "
              f"(C={res['selected']['C']}, val {res['selected'][f'val/{metric}']:.4f}, "
              f"{res['selected']['features']:,} features, {time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
