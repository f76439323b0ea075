"""qat-export: a tiny qat-train run exported to an integer checkpoint, ONNX QDQ and int8; the
exports agree with the fake-quant model; bad inputs give one line naming the file, exit 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY, compose_cfg, load_script
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qat.errors import EXIT_ERROR
from qat.export.cli import main
from qat.train import run


def _train(recipe: str, out: Path, data_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """Train ``recipe`` for one tiny QAT epoch; returns the run folder (with .hydra/config.yaml,
    which qat-train's Hydra writes and an in-process run does not)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QAT_DATA_DIR", str(data_dir))
        mp.setenv("WANDB_MODE", "disabled")
        cfg = compose_cfg([f"recipe={recipe}", "baseline_epochs=0", "trainer.max_epochs=1",
                           "test=true", "run_id=tiny", *TINY, *extra], out)
        run(cfg)
        rd = Path(cfg.hydra.runtime.output_dir)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(task)
        (rd / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(task, rd / ".hydra" / "config.yaml")
        GlobalHydra.instance().clear()
    assert (rd / "checkpoints" / "best.ckpt").is_file()
    return rd


@pytest.fixture(scope="module")
def textcnn_run(tmp_path_factory, data_dir) -> Path:
    return _train("20ng_textcnn_w8a8", tmp_path_factory.mktemp("export_cli"), data_dir)


@pytest.fixture(autouse=True)
def _env(data_dir, monkeypatch):
    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("QAT_FULL_ERROR", "0")


def test_export_all_formats(textcnn_run, capsys):
    ckpt = textcnn_run / "checkpoints" / "best.ckpt"
    main([str(ckpt), "--onnx", "--int8", "--limit", "64"])
    printed = capsys.readouterr().out
    out = textcnn_run / "export"
    for name in ("model.int.pt", "model.onnx", "export.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "export.json").read_text())
    sizes, formats = record["sizes"], record["formats"]
    assert sizes["int_bytes"] == (out / "model.int.pt").stat().st_size
    assert sizes["int_bytes"] < 0.3 * sizes["float_bytes"], sizes
    assert set(formats) == {"int_checkpoint", "onnx_qdq", "torch_int8"}
    n = formats["int_checkpoint"]["n"]
    assert 0 < n <= 64 and record["examples"] == n
    assert formats["int_checkpoint"]["agreement"] == 1.0
    assert formats["int_checkpoint"]["max_abs_diff"] < 1e-4
    for name in ("onnx_qdq", "torch_int8"):
        assert formats[name]["n"] == n and formats[name]["agreement"] >= 0.99, formats[name]
        assert formats[name]["acc_fake_quant"] is not None
    assert "int_checkpoint" in printed and "onnx_qdq" in printed and "100.00%" in printed
    print(printed)


def test_out_dir_and_default_formats(textcnn_run, tmp_path, capsys):
    main([str(textcnn_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "x"),
          "--limit", "8"])
    record = json.loads((tmp_path / "x" / "export.json").read_text())
    assert set(record["formats"]) == {"int_checkpoint"} and record["examples"] == 8
    assert not (tmp_path / "x" / "model.onnx").exists()
    total = record["split_examples"]
    assert total > 8
    assert f"the first 8 of {total} test examples (--limit 8: not the whole split)" in \
        capsys.readouterr().out


def test_default_compares_on_the_whole_split(textcnn_run, tmp_path, capsys):
    """Without --limit every test example is compared, and the output says so (it compared 512
    examples without a word)."""
    main([str(textcnn_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "all")])
    record = json.loads((tmp_path / "all" / "export.json").read_text())
    from qat.evaluate import open_run

    dm = open_run(textcnn_run / "checkpoints" / "best.ckpt").dm
    n = sum(len(b["labels"]) for b in dm.test_dataloader())
    assert record["examples"] == record["split_examples"] == n
    assert f"compared on all {n} test examples" in capsys.readouterr().out


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == EXIT_ERROR
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qat: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "nope" / "best.ckpt"
    line = _error([str(path)], capsys)
    assert str(path) in line and "no such file" in line


def test_float_stage_checkpoint_is_refused(textcnn_run, capsys):
    path = textcnn_run / "float" / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(textcnn_run / "checkpoints" / "best.ckpt", path)
    line = _error([str(path)], capsys)
    assert str(path) in line and "float stage" in line


def test_not_a_qat_run_is_one_line(textcnn_run, tmp_path, capsys):
    path = tmp_path / "best.ckpt"
    shutil.copy(textcnn_run / "checkpoints" / "best.ckpt", path)
    line = _error([str(path)], capsys)
    assert str(path) in line and ".hydra/config.yaml" in line


def test_bilstm_onnx(tmp_path, data_dir, capsys):
    # the LSTM is slow on a shared CPU: a small one (random embeddings: GloVe rows are 50-d)
    small = ("model=bilstm", "model.embed_dim=16", "model.hidden_size=16",
             "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    rd = _train("20ng_bilstm_w8a8", tmp_path, data_dir, small)
    main([str(rd / "checkpoints" / "best.ckpt"), "--onnx", "--limit", "32"])
    formats = json.loads((rd / "export" / "export.json").read_text())["formats"]
    assert formats["int_checkpoint"]["agreement"] == 1.0
    assert formats["onnx_qdq"]["agreement"] >= 0.99, formats["onnx_qdq"]
    capsys.readouterr()


def test_pruned_run_evaluates_and_exports_with_its_zeros(tmp_path, data_dir, capsys):
    """A pruning run's checkpoint holds mask buffers: qat-eval and qat-export rebuild them, and the
    integer checkpoint keeps the pruned weights at exactly zero."""
    import torch

    from qat.evaluate import evaluate_checkpoint
    from qat.export import read_int_weights

    rd = _train("20ng_textcnn_w8a8-prune50", tmp_path, data_dir,
                ("prune.schedule.end_fraction=0.5", "prune.schedule.frequency=1"))
    ckpt = rd / "checkpoints" / "best.ckpt"
    assert evaluate_checkpoint(ckpt)["metrics"]
    main([str(ckpt), "--limit", "16"])
    assert json.loads((rd / "export" / "export.json").read_text())["formats"][
        "int_checkpoint"]["agreement"] == 1.0
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    masks = {k[len("model."):-len("_mask")]: v for k, v in state.items() if k.endswith("_mask")}
    assert masks
    ints = read_int_weights(rd / "export" / "model.int.pt")
    for name, mask in masks.items():
        assert (ints[name].dequantize()[mask == 0] == 0).all(), name
        assert (mask == 0).float().mean() >= 0.45, name  # pruned to the target (50 %)
    capsys.readouterr()


def test_probe_prune_prints_each_group_and_leaves_the_checkpoint_alone(textcnn_run, capsys):
    """scripts/probe_prune.py on a trained run: one line per layer group and ``all``, the head
    left out by default, the metric of the unpruned model first."""
    import sys

    ckpt = textcnn_run / "checkpoints" / "best.ckpt"
    before = ckpt.read_bytes()
    probe = load_script("qat_probe_prune", "probe_prune.py")
    try:
        probe.main([str(ckpt), "--sparsities", "0.5", "0.9", "--limit", "2", "--threads", "1"])
    finally:
        sys.modules.pop("qat_probe_prune", None)
    out = capsys.readouterr()
    assert "quantized run's checkpoint" in out.err
    lines = out.out.splitlines()
    assert lines[1].startswith("val/accuracy of the unpruned model: ")
    groups = [ln.split()[0] for ln in lines[4:]]
    assert "all" in groups and "classifier" not in groups and any("conv" in g for g in groups)
    assert all(len(ln.split()) == 5 for ln in lines[4:])  # two sparsities: value (change) each
    assert ckpt.read_bytes() == before
