"""Training system: every recipe composes and runs on a few batches; resume; sweeps; loggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_cfg
from omegaconf import DictConfig, open_dict

from qat.train import run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))



pytestmark = pytest.mark.usefixtures("train_env")


def test_recipes_exist():
    names = set(RECIPES)
    for need in ["20ng_textcnn_fp32", "20ng_textcnn_ptq-w8a8", "20ng_textcnn_w8a8",
                 "20ng_textcnn_w4a8", "20ng_bilstm_fp32", "20ng_bilstm_w8a8",
                 "20ng_transformer_fp32", "20ng_transformer_w8a8", "20ng_embbag_fp32",
                 "20ng_embbag_w8a8", "20ng_minilm_fp32", "20ng_minilm_w8a8", "sst2_bilstm_fp32",
                 "sst2_bilstm_w8a8"] + [
                     f"{t}_minilm_{s}" for t in ("sst2", "cola", "mrpc", "stsb", "rte")
                     for s in ("fp32", "w8a8")]:
        assert need in names, need


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: the MiniLM recipes' code path, fast."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from qat.data import minilm_path

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe, tmp_path, tiny_bert):
    extra = [f"model.name_or_path={tiny_bert}", f"data.tokenizer={tiny_bert}"] if (
        "minilm" in recipe) else []
    if "bands" in recipe:  # bounds for the tiny vocabulary (~1.3k words) instead of 50k
        extra.append("quant.embedding_bands.bounds=[100,300]")
    cfg = compose_cfg([f"recipe={recipe}", "trainer.max_epochs=1", *TINY, *extra], tmp_path)
    _smoke(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sst2_minilm_w8a8", "stsb_minilm_fp32"])
def test_recipe_smoke_real_minilm(recipe, tmp_path):
    _smoke(compose_cfg([f"recipe={recipe}", "trainer.max_epochs=1", *TINY], tmp_path))


def _smoke(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.baseline_epochs = min(cfg.baseline_epochs, 1)
    res = run(cfg)
    assert res["stages"], res
    for metrics in res["stages"].values():
        assert any(k.startswith("test") for k in metrics), metrics
        assert all(v == v for v in metrics.values())  # no NaN
    stage = list(res["stages"])[-1]
    assert stage == cfg.quant.mode
    if cfg.quant.mode != "fp32":
        assert res["size"]["quantized_bytes"] < 0.5 * res["size"]["fp32_bytes"]
    assert set(res["timing"]) == {"fp32_step_s", "quant_step_s", "step_time_ratio",
                                  "concurrent_jobs"}


def _final_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_gives_identical_weights(tmp_path):
    base = ["recipe=20ng_textcnn_w8a8", "baseline_epochs=0", "scheduler=constant", *TINY,
            "quant.log_every_n_steps=2"]
    run(compose_cfg([*base, "trainer.max_epochs=2", "run_id=straight"], tmp_path))
    run(compose_cfg([*base, "trainer.max_epochs=1", "run_id=resumed"], tmp_path))
    run(compose_cfg([*base, "trainer.max_epochs=2", "run_id=resumed", "ckpt_path=last"],
                    tmp_path))
    a = _final_state(tmp_path / "straight/checkpoints/last.ckpt")
    b = _final_state(tmp_path / "resumed/checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    assert any("weight_quant" in k for k in a)  # quantizer state is part of the checkpoint
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, equal_nan=True, msg=k)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = compose_cfg(["recipe=20ng_textcnn_w8a8", "baseline_epochs=0", *TINY,
                       "ckpt_path=last", "run_id=nothing"], tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        run(cfg)


def test_wandb_offline_logger_writes_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["recipe=20ng_textcnn_fp32", "logger=wandb_offline", "trainer.max_epochs=1",
                       *TINY], tmp_path)
    run(cfg)
    runs = list((tmp_path / cfg.run_id / "wandb").glob("offline-run-*"))
    assert runs, list((tmp_path / cfg.run_id).rglob("*"))[:20]


def test_bf16_autocast_with_fake_quant(tmp_path):
    cfg = compose_cfg(["recipe=20ng_textcnn_w8a8", "baseline_epochs=0", "trainer.max_epochs=1",
                       "trainer.precision=bf16-mixed", *TINY], tmp_path)
    res = run(cfg)
    assert res["stages"]["qat"]["test/accuracy"] >= 0.0


def test_multirun_makes_one_dir_per_job(tmp_path, data_dir):
    env = {**os.environ, "QAT_DATA_DIR": str(data_dir), "QAT_OUTPUT_DIR": str(tmp_path),
           "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-c", "from qat.cli import train; train()", "-m",
           "recipe=20ng_textcnn_w8a8", "quant=w8a8_per_tensor,w4a8_per_channel_lsq",
           "baseline_epochs=0", "trainer.max_epochs=1", "run_id=sweep", "test=false",
           "logger=none", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "multirun/sweep").iterdir()
                  if p.is_dir())
    assert jobs == ["0", "1"], jobs
    for j in jobs:
        assert (tmp_path / "multirun/sweep" / j / ".hydra/config.yaml").is_file()
    # each job is named by the override that sets it apart (both were "20ng_textcnn_w8a8")
    names = [json.loads((tmp_path / "multirun/sweep" / j / "results.json").read_text())["name"]
             for j in jobs]
    assert names == ["20ng_textcnn_w8a8 quant=w8a8_per_tensor",
                     "20ng_textcnn_w8a8 quant=w4a8_per_channel_lsq"], names


def test_cli_bad_value_is_one_line(tmp_path, data_dir):
    env = {**os.environ, "QAT_DATA_DIR": str(data_dir), "QAT_OUTPUT_DIR": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-c", "from qat.cli import train; train()",
           "quant.weight.bits=12", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "quant.weight" in proc.stderr and "bits=12" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_results_record_step_time_of_both_stages(tmp_path):
    cfg = compose_cfg(["recipe=20ng_textcnn_w8a8", "baseline_epochs=1", "trainer.max_epochs=1",
                       *TINY, "trainer.limit_train_batches=8", "test=false"], tmp_path)
    timing = run(cfg)["timing"]
    assert timing["fp32_step_s"] > 0 and timing["quant_step_s"] > 0
    assert timing["step_time_ratio"] == pytest.approx(
        timing["quant_step_s"] / timing["fp32_step_s"])
