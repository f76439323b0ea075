"""Bad data and bad checkpoints give one clear error naming the file; checkpoints load with
``weights_only=True``; non-finite values never reach the observers; a diverging run stops."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from qat import cli
from qat.config_check import check_checkpoint

TINY = ["data.limit_train=48", "data.limit_eval=24", "data.batch_size=8", "data.max_length=32",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.progress_bar=null",
        "trainer.max_epochs=1", "baseline_epochs=0"]


# in-process Hydra must not bind logging handlers to pytest's per-test capture streams
HYDRA_QUIET = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _cli(entry, args: list[str], mp: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    """Run ``qat-train`` / ``qat-eval`` in this process: (exit code, stdout, stderr)."""
    hydra_args = HYDRA_QUIET if entry is cli.train else []
    mp.setattr(sys, "argv", ["qat", *args, *hydra_args])
    handlers = list(logging.getLogger().handlers)
    code = 0
    try:
        entry()
    except SystemExit as exc:
        code = exc.code
    finally:
        GlobalHydra.instance().clear()
        logging.getLogger().handlers[:] = handlers  # no handler on a closed capture stream
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("qat: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QAT_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("QAT_FULL_ERROR", "0")


# ---- data --------------------------------------------------------------------------------------
def _qnli(root: Path, glue_layout) -> Path:
    return glue_layout(root, "QNLI", n=12)


def _data_args(root: Path) -> list[str]:
    return ["data=qnli", "data.tokenizer=word", f"data.data_dir={root}", "run_id=data", *TINY]


def test_missing_data_dir_names_the_folder(tmp_path, monkeypatch, capsys):
    code, _, err = _cli(cli.train, _data_args(tmp_path / "nowhere"), monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and "FileNotFoundError: GLUE QNLI not found" in line
    assert str(tmp_path / "nowhere" / "glue" / "QNLI") in line


def test_missing_split_names_the_file(tmp_path, glue_layout, monkeypatch, capsys):
    folder = _qnli(tmp_path, glue_layout)
    (folder / "dev.tsv").unlink()
    code, _, err = _cli(cli.train, _data_args(tmp_path), monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and "'dev.tsv'" in line and str(folder) in line


def test_malformed_row_names_file_and_line(tmp_path, glue_layout, monkeypatch, capsys):
    folder = _qnli(tmp_path, glue_layout)
    rows = (folder / "train.tsv").read_text().splitlines()
    rows[4] = "4\tWhat is four?"  # a field missing
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    code, _, err = _cli(cli.train, _data_args(tmp_path), monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and f"{folder / 'train.tsv'}:5: malformed row with 2 fields" in line


def test_empty_split_names_the_file(tmp_path, glue_layout, monkeypatch, capsys):
    folder = _qnli(tmp_path, glue_layout)
    header = (folder / "dev.tsv").read_text().splitlines()[0]
    (folder / "dev.tsv").write_text(header + "\n")
    code, _, err = _cli(cli.train, _data_args(tmp_path), monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and f"{folder / 'dev.tsv'}: no examples (empty split)" in line


# ---- checkpoints ---------------------------------------------------------------------------------
class _NotATensor:
    pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A finished tiny qat-train run (through the CLI, so .hydra/config.yaml exists)."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"QAT_DATA_DIR": str(data_dir), "QAT_OUTPUT_DIR": str(out),
                     "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
                     "QAT_FULL_ERROR": "0"}.items():
            mp.setenv(k, v)
        mp.setattr(sys, "argv", ["qat-train", *TINY, "run_id=good", "trainer.max_epochs=2",
                                 *HYDRA_QUIET])
        try:
            cli.train()
        finally:
            GlobalHydra.instance().clear()
    run = out / "20ng_textcnn_w8a8" / "good"
    assert (run / "checkpoints/last.ckpt").is_file() and (run / ".hydra/config.yaml").is_file()
    return run


@pytest.fixture(scope="module")
def bad_ckpts(run_dir) -> dict[str, Path]:
    """Broken and foreign checkpoints, inside the run folder (so qat-eval finds its config)."""
    d = run_dir / "checkpoints"
    good = (d / "last.ckpt").read_bytes()
    paths = {k: d / f"bad_{k}.ckpt" for k in ("random", "truncated", "nostate", "unsafe",
                                             "shape", "other", "bare")}
    paths["random"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0))
                                .numpy().tobytes())
    paths["truncated"].write_bytes(good[: len(good) // 2])
    torch.save({"epoch": 3, "weights": {"w": torch.ones(2)}}, paths["nostate"])
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "extra": _NotATensor()},
               paths["unsafe"])
    ckpt = torch.load(d / "last.ckpt", weights_only=True)
    torch.save({"state_dict": dict(ckpt["state_dict"])}, paths["bare"])
    emb = ckpt["state_dict"]["model.embedding.weight"]
    ckpt["state_dict"]["model.embedding.weight"] = emb[:-3]  # another vocabulary
    torch.save(ckpt, paths["shape"])
    torch.save({"state_dict": {"model.lstm.weight_ih_l0": torch.ones(8, 4)},
                "pytorch-lightning_version": ckpt["pytorch-lightning_version"]}, paths["other"])
    return paths


EXPECT = {
    "random": "is not a readable checkpoint (weights_only load failed",
    "truncated": "is not a readable checkpoint (weights_only load failed",
    "nostate": "holds no 'state_dict' (found ['epoch', 'weights'])",
    "unsafe": "is not a readable checkpoint (weights_only load failed",
    "shape": "does not fit this model: embedding.weight has shape",
    "other": "is a checkpoint of another model",
    "bare": "is not a Lightning checkpoint",  # weights only: fine for init_from (tested below)
}


@pytest.mark.parametrize("kind", list(EXPECT))
@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
def test_bad_checkpoint_for_train(kind, key, bad_ckpts, monkeypatch, capsys):
    if kind == "bare" and key == "init_from":
        pytest.skip("a bare state_dict is a valid init_from")
    path = bad_ckpts[kind]
    code, _, err = _cli(cli.train, [*TINY, f"{key}={path}", "run_id=bad"], monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and f"{key}='{path}'" in line and EXPECT[kind] in line, line


@pytest.mark.parametrize("kind", list(EXPECT))
def test_bad_checkpoint_for_eval(kind, bad_ckpts, monkeypatch, capsys):
    code, _, err = _cli(cli.evaluate, [str(bad_ckpts[kind])], monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and str(bad_ckpts[kind].name) in line
    if kind == "shape":  # caught by Lightning's strict load: the mismatch is named
        assert "size mismatch for model.embedding.weight" in line, line
    elif kind == "other":
        assert "Missing key(s) in state_dict" in line, line
    else:
        assert EXPECT[kind] in line, line


def test_init_from_bare_state_dict(bad_ckpts, monkeypatch, capsys):
    code, _, err = _cli(cli.train, [*TINY, f"init_from={bad_ckpts['bare']}", "run_id=init",
                                    "test=false"], monkeypatch, capsys)
    assert code == 0, err


def test_eval_of_a_good_checkpoint(run_dir, monkeypatch, capsys):
    code, out, _ = _cli(cli.evaluate, [str(run_dir / "checkpoints/best.ckpt")], monkeypatch,
                        capsys)
    assert code == 0
    metrics = json.loads(out[out.index("{"):])["metrics"]
    assert "test/accuracy" in metrics


def test_checkpoints_are_weights_only_safe(run_dir):
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "vocab" in ckpt["NewsgroupsDataModule"]  # the datamodule's state
        if name == "best.ckpt":  # weights only: evaluation and export need no training state
            assert "callbacks" not in ckpt and "optimizer_states" not in ckpt
            continue
        cbs = " ".join(ckpt["callbacks"])
        for needed in ("RNGStateCallback", "MidEpochResume", "QuantizationCallback"):
            assert needed in cbs, (name, cbs)
    state = check_checkpoint(run_dir / "checkpoints/last.ckpt", "ckpt_path")
    assert "embedding.weight" in state and not any(k.startswith("model.") for k in state)


def test_resume_from_last_with_weights_only(run_dir, monkeypatch, capsys):
    """ckpt_path=last of a finished run: Lightning restores (weights_only) and finds no epoch
    left; the run ends normally with the same metrics."""
    before = json.loads((run_dir / "results.json").read_text())["stages"]["qat"]
    monkeypatch.setenv("QAT_OUTPUT_DIR", str(run_dir.parents[1]))
    code, _, err = _cli(cli.train, [*TINY, "run_id=good", "trainer.max_epochs=2",
                                    "ckpt_path=last"], monkeypatch, capsys)
    assert code == 0, err
    after = json.loads((run_dir / "results.json").read_text())["stages"]["qat"]
    assert after == before


# ---- non-finite values ---------------------------------------------------------------------------
def test_nan_activations_never_reach_observers():
    from qat.models import TextCNN
    from qat.surgery import QATConfig, prepare

    torch.manual_seed(0)
    model, _ = prepare(TextCNN(vocab_size=20, num_labels=3, embed_dim=8, num_filters=4),
                       QATConfig())
    ids = torch.randint(7, 20, (4, 12))
    model(input_ids=ids)
    with torch.no_grad():
        model.embedding.weight[5] = float("nan")
        model.embedding.weight[6] = float("inf")
    ids[0, :3] = torch.tensor([5, 6, 5])
    y = model(input_ids=ids)
    assert torch.isfinite(y[1:]).all()  # the other examples are untouched
    assert not torch.isfinite(y[0]).all()  # NaN propagates, as in the float model
    for n, q in model.named_modules():
        if hasattr(q, "observer"):
            ob = q.observer
            assert int(ob.count) == 2, n  # the batch was observed (its finite part)
            assert torch.isfinite(ob.min_val).all() and torch.isfinite(ob.max_val).all(), n
            assert torch.isfinite(q.qparams()[0]).all(), n


def test_nan_input_observer_equals_finite_only():
    from qat.nn import QuantLinear
    from qat.nn.config import LayerQuantConfig

    cfg = LayerQuantConfig(input=LayerQuantConfig().input.replace(observer="minmax"))
    a = QuantLinear.from_float(nn.Linear(6, 3), cfg)
    xn = torch.randn(5, 6)
    xn[2] = float("nan")
    xn[3, 1] = float("-inf")
    a(xn)
    finite = xn[torch.isfinite(xn)]
    lo, hi = finite.min(), finite.max()
    assert float(a.input_quant.observer.min_val) == pytest.approx(float(lo))
    assert float(a.input_quant.observer.max_val) == pytest.approx(float(hi))


def test_diverging_run_stops_with_one_line(monkeypatch, capsys):
    code, _, err = _cli(cli.train, [*TINY, "trainer.limit_train_batches=6", "optimizer.lr=1e30",
                                    "scheduler=constant", "trainer.gradient_clip_val=null",
                                    "run_id=nan"], monkeypatch, capsys)
    line = _one_line(err)
    assert code == 1 and "NonFiniteError: training loss is nan at step" in line
    assert "stop_on_nonfinite=false" in line
