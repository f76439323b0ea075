"""The Trainer flags people override most need no `+`, reach the Trainer, and every debug
config (conf/debug/, as in lightning-hydra-template) runs a whole job."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_cfg

from qat.config_check import check_config
from qat.train import build_trainer, run

ROOT = Path(__file__).resolve().parents[1]
DEBUG = sorted(p.stem for p in (ROOT / "conf" / "debug").glob("*.yaml"))
# two training batches, one evaluation batch; a one-epoch float stage before the QAT stage
SMALL = ["data.limit_train=16", "data.limit_eval=8", "data.batch_size=8", "data.max_length=32",
         "trainer.enable_model_summary=false", "baseline_epochs=1"]

FLAGS = {  # override -> (Trainer attribute, expected value)
    "trainer.fast_dev_run=true": ("fast_dev_run", True),
    "trainer.limit_train_batches=5": ("limit_train_batches", 5),
    "trainer.limit_val_batches=0.5": ("limit_val_batches", 0.5),
    "trainer.limit_test_batches=3": ("limit_test_batches", 3),
    "trainer.limit_predict_batches=2": ("limit_predict_batches", 2),
    "trainer.max_steps=7": ("max_steps", 7),
    "trainer.precision=bf16-mixed": ("precision", "bf16-mixed"),
    "trainer.accumulate_grad_batches=4": ("accumulate_grad_batches", 4),
    "trainer.val_check_interval=0.25": ("val_check_interval", 0.25),
    "trainer.overfit_batches=2": ("overfit_batches", 2),
    "trainer.detect_anomaly=true": ("_detect_anomaly", True),
}


pytestmark = pytest.mark.usefixtures("train_env")


def _value(trainer, attr: str):
    if attr == "precision":
        return trainer.precision
    if attr == "max_steps":
        return trainer.max_steps
    if attr == "fast_dev_run":
        return bool(trainer.fast_dev_run)
    return getattr(trainer, attr)


@pytest.mark.parametrize("override", list(FLAGS))
@pytest.mark.parametrize("trainer_cfg", ["default", "cpu", "gpu", "ddp"])
def test_common_flags_need_no_plus(override, trainer_cfg, tmp_path):
    """`qat-train trainer.fast_dev_run=true` composes (it needed `+trainer...`), passes the
    config checks and reaches the Trainer, with every trainer config."""
    cfg = compose_cfg([f"trainer={trainer_cfg}", override], tmp_path)
    check_config(cfg)
    if trainer_cfg != "default":
        return  # gpu / ddp need the hardware or processes to build a Trainer
    attr, expected = FLAGS[override]
    trainer = build_trainer(cfg, tmp_path, [], monitor="val/accuracy")
    assert _value(trainer, attr) == expected, (attr, _value(trainer, attr))


@pytest.mark.parametrize("debug", DEBUG)
def test_debug_config_runs_a_whole_job(debug, tmp_path):
    assert {"default", "fdr", "limit", "overfit", "profiler"} <= set(DEBUG)
    short = ["trainer.max_epochs=2"] if debug == "overfit" else []  # its 20 epochs: too long here
    cfg = compose_cfg(["recipe=20ng_textcnn_w8a8", f"debug={debug}", *SMALL, *short], tmp_path)
    check_config(cfg)
    assert cfg.get("logger") is None or "_target_" not in cfg.logger  # debug runs log nothing
    assert "/debug/" in cfg.hydra.run.dir
    res = run(cfg)
    assert set(res["stages"]) == {"fp32", "qat"}, res["stages"]
    for metrics in res["stages"].values():
        assert "test/accuracy" in metrics
