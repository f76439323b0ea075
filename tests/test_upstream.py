"""init_from=recipe:<float recipe>: a quantized run starts from its float recipe's run (trained
first when missing, reused after), whose test metrics are the float row and whose model is the
KD teacher; results.json records commit, numerics fingerprint and hardware."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, compose_cfg

from qat.train import run
from qat.upstream import float_run_id, upstream

pytestmark = pytest.mark.usefixtures("one_thread")

QUANT = ["recipe=20ng_textcnn_w8a8", "init_from=recipe:20ng_textcnn_fp32", "baseline_epochs=0",
         "trainer.max_epochs=1", *TINY]


def test_quantized_run_trains_then_reuses_its_float_run(tmp_path):
    res = run(compose_cfg([*QUANT, "run_id=q1"], tmp_path))
    up = res["float_run"]
    run_dir = tmp_path / "20ng_textcnn_fp32" / float_run_id(42, TINY)
    assert up["run_dir"] == str(run_dir) and up["recipe"] == "20ng_textcnn_fp32"
    float_res = json.loads((run_dir / "results.json").read_text())
    # the float row is the float run's own test result, not a warm-up stage of this run
    assert res["stages"]["fp32"] == float_res["stages"]["fp32"]
    assert "test/accuracy" in res["stages"]["qat"]
    assert float_res["command"].startswith("qat-train recipe=20ng_textcnn_fp32 ")
    assert f"run_id={run_dir.name}" in float_res["command"]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    # a second quantized run (another scheme, another lr) reuses the same float run
    res2 = run(compose_cfg([*QUANT, "run_id=q2", "quant=w4a8_per_channel_lsq", "optimizer.lr=1e-4"],
                           tmp_path))
    assert res2["float_run"]["run_dir"] == str(run_dir)
    assert ckpt.stat().st_mtime_ns == stamp
    for r in (res, res2, float_res):
        assert r["numerics"] and r["hardware"]["cpu_count"] >= 1 and "commit" in r


def test_quantized_run_starts_from_the_float_weights(tmp_path):
    cfg = compose_cfg([*QUANT, "run_id=q", "trainer.limit_train_batches=1",
                       "optimizer.lr=1e-12", "scheduler=constant", "test=false"], tmp_path)
    res = run(cfg)
    best = torch.load(res["float_run"]["checkpoint"], weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "q/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for k in ("model.classifier.weight", "model.convs.0.weight"):
        torch.testing.assert_close(last[k], best[k], atol=1e-6, rtol=0)


def test_stage_overrides_do_not_change_the_float_run(tmp_path):
    a = compose_cfg([*QUANT, "quant=w4a8_per_channel_lsq", "optimizer.lr=3e-4", "seed=7"], tmp_path)
    b = compose_cfg([*QUANT, "distill=kd", "seed=7", "trainer.max_epochs=5"], tmp_path)
    c = compose_cfg([*QUANT, "seed=7", "data.max_length=64"], tmp_path)
    assert upstream(a).run_dir == upstream(b).run_dir
    assert upstream(a).run_dir.name.startswith("seed7-")
    assert upstream(c).run_dir != upstream(a).run_dir  # the data shape the float model


def test_unknown_float_recipe_is_one_clear_error(tmp_path):
    from qat.config_check import ConfigError, check_config

    cfg = compose_cfg([*QUANT, "init_from=recipe:no_such_recipe"], tmp_path)
    with pytest.raises(ConfigError, match="init_from='recipe:no_such_recipe': no such recipe"):
        check_config(cfg)


def test_sweep_float_job_is_the_run_its_quantized_jobs_start_from(tmp_path):
    from helpers import load_script

    sweep = load_script("sweep", "sweep.py")
    extra = ("trainer.precision=bf16-mixed", "data.max_length=64")
    jobs = sweep.jobs_of({"rows": [
        {"recipe": "20ng_textcnn_fp32", "seeds": [3]},
        {"recipe": "20ng_textcnn_w8a8", "seeds": [3],
         "overrides": ["quant=w4a8_per_channel_lsq", "distill=kd"]},
    ]}, extra)
    fjob, qjob = jobs
    cfg = compose_cfg([*qjob.argv(), "trainer.enable_progress_bar=false"], tmp_path)
    assert upstream(cfg).run_dir == fjob.run_dir(tmp_path)
    assert qjob.run_dir(tmp_path) != fjob.run_dir(tmp_path)
