"""Bad config values fail before any data is read, with one error naming the key, the value
and what is allowed; the CLI prints that as one line and exits non-zero."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_cfg
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qat import cli
from qat.config_check import ConfigError, check_config
from qat.errors import describe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
TINY = ["data.limit_train=48", "data.limit_eval=24", "data.batch_size=8", "data.max_length=32",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.max_epochs=1", "baseline_epochs=0"]


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_passes(recipe, tmp_path):
    check_config(compose_cfg([f"recipe={recipe}"], tmp_path))


@pytest.mark.parametrize("group", ["quant=w4a4_per_channel_lsq",
                                   "quant=mixed_w4a8_per_channel_lsq", "quant=ptq_w8a8_per_channel",
                                   "quant=fp32", "quant=w8a8_per_tensor", "quant=w8a8_per_channel",
                                   "quant=w4a8_per_channel_lsq", "quant=w1a8_binary_per_channel",
                                   "quant=w2a8_ternary_per_channel", "quant=auto_per_channel_lsq",
                                   "prune=one_shot", "prune=gradual", "distill=kd", "trainer=ddp",
                                   "trainer=gpu", "optimizer=sgd", "scheduler=constant",
                                   "logger=wandb_offline",
                                   "model=bilstm", "model=transformer", "model=embbag",
                                   "data=mnli", "callbacks=none", "logger=none"])
def test_every_group_option_passes(group, tmp_path):
    check_config(compose_cfg(["baseline_epochs=1", group], tmp_path))


BAD = [
    (["quant.weight.bits=12"], r"^quant\.weight: QuantSpec\.bits=12 is invalid: allowed an "
                               r"integer from 1 to 8"),
    (["quant.activation.observer=median"], r"quant\.activation: QuantSpec\.observer='median' is "
                                           r"invalid: allowed one of \('minmax'"),
    (["+quant.weight.estimator=magic"], r"quant\.weight: QuantSpec\.estimator='magic'"),
    (["quant=w1a8_binary_per_channel", "+quant.weight.symmetric=false"],
     r"^quant\.weight: QuantSpec\.symmetric=False is invalid: allowed true and signed=true with "
     r"mode='binary'"),
    (["quant.weight.axis=3"], r"quant\.weight\.axis=3 is invalid for per-channel weights"),
    (["+quant.activation.granularity=channel"],
     r"quant\.activation\.granularity='channel' is invalid: allowed 'tensor'"),
    (["quant.mode=int4"], r"quant\.mode='int4' is invalid: allowed \['qat', 'ptq', 'fp32'\]"),
    (["quant.unit=hour"], r"quant\.unit='hour' is invalid"),
    (["+quant.foo=1"], r"^quant: unknown key 'foo' for qat\.callbacks\.QuantizationCallback: "
                       r"allowed \[.*'weight'\]"),
    (["+model.depth=3"], r"^model: unknown key 'depth' for qat\.models\.TextCNN: allowed \["),
    (["+optimizer.betas2=1"], r"^optimizer: unknown key 'betas2' for torch\.optim\.AdamW"),
    (["+trainer.max_epoch=3"], r"^trainer: unknown key 'max_epoch' for lightning\.Trainer"),
    (["+callbacks.guard.stop=false"], r"^callbacks\.guard: unknown key 'stop'"),
    (["model._target_=qat.models.Nope"], r"model\._target_='qat\.models\.Nope' cannot be "
                                         r"imported"),
    (["data=sst2", "data.task=sts3"], r"^data\.task='sts3' is invalid: allowed GLUE tasks "
                                      r"\['cola', 'sst2'"),
    (["data=sst2", "data.task=20newsgroups"], r"^data\.task='20newsgroups' is invalid"),
    (["data.batch_size=0"], r"^data\.batch_size=0 is invalid: must be an integer >= 1"),
    (["data.val_fraction=1.5"], r"^data\.val_fraction=1\.5 is invalid"),
    (["data.tokenizer="], r"^data\.tokenizer='' is invalid"),
    (["prune=gradual", "prune.schedule.final_sparsity=1.0"],
     r"^prune\.schedule: final_sparsity=1\.0 must be in \[0, 1\)"),
    (["prune=one_shot", "prune.schedule.sparsity=-0.1"], r"^prune\.schedule: sparsity=-0\.1"),
    (["prune=gradual", "prune.schedule.kind=exp"], r"^prune\.schedule: schedule kind='exp': "
                                                   r"allowed \['cubic', 'linear', 'one_shot'\]"),
    (["prune=gradual", "prune.scope=model"], r"^prune\.scope='model' is invalid: allowed "
                                             r"\['layer', 'global'\]"),
    (["prune=gradual", "prune.structure=blocks"], r"^prune\.structure='blocks' is invalid"),
    (["prune=gradual", "prune.targets=[]"], r"^prune\.targets=\[\] is invalid"),
    (["prune=gradual", "prune.criterion=movment"], r"^prune\.criterion='movment' is invalid: "
                                                   r"allowed \['magnitude', 'movement'\]"),
    (["prune=gradual", "prune.criterion=movement", "prune.structure=rows"],
     r"^prune\.criterion='movement' cannot be combined with prune\.structure='rows'"),
    (["prune=one_shot", "prune.criterion=movement"],
     r"^prune\.criterion='movement' is invalid with a schedule that prunes at step 0"),
    (["prune=gradual", "quant=w1a8_binary_per_channel"],
     r"^quant\.weight\.mode='binary' cannot be combined with pruning"),
    (["distill=kd_checkpoint"], r"^distill\.teacher is missing"),
    (["distill=kd", "baseline_epochs=0", "init_from=null"],
     r"^distill\.teacher='float_stage' needs a float stage"),
    (["distill=kd", "distill.alpha=2"], r"^distill\.alpha=2"),
    (["trainer.max_epochs=0"], r"^trainer\.max_epochs=0 is invalid: allowed an integer >= 1"),
    (["trainer.precision=8-true"], r"^trainer\.precision='8-true' is invalid: allowed \["),
    (["trainer.accelerator=npu"], r"^trainer\.accelerator='npu' is invalid"),
    (["optimizer.lr=0"], r"^optimizer\.lr=0 is invalid: allowed a number > 0"),
    (["scheduler.warmup_ratio=1.0"], r"^scheduler\.warmup_ratio=1\.0 is invalid"),
    (["seed=-1"], r"^seed=-1 is invalid: allowed an integer >= 0"),
    (["baseline_epochs=1.5"], r"^baseline_epochs=1\.5 is invalid"),
    (["callbacks.last_checkpoint.every_n_train_steps=-2"],
     r"^callbacks\.last_checkpoint\.every_n_train_steps=-2 is invalid"),
]


@pytest.mark.parametrize(("overrides", "pattern"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_names_key_value_and_allowed(overrides, pattern, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=pattern):
        check_config(cfg)


def test_binary_override_with_pruning_names_its_pattern(tmp_path):
    cfg = compose_cfg(["quant=mixed_w4a8_per_channel_lsq", "prune=one_shot"], tmp_path)
    cfg.quant.overrides["*embed*"].weight = {"bits": 1, "mode": "binary"}
    with pytest.raises(ConfigError, match=r"^quant\.overrides\['\*embed\*'\]\.weight\.mode="
                                          r"'binary' cannot be combined with pruning"):
        check_config(cfg)


def test_bad_override_rule_names_its_pattern(tmp_path):
    cfg = compose_cfg(["quant=mixed_w4a8_per_channel_lsq"], tmp_path)
    cfg.quant.overrides["*embed*"].weight.bits = 0
    with pytest.raises(ConfigError, match=r"^quant\.overrides\['\*embed\*'\]\.weight: "
                                          r"QuantSpec\.bits=0 is invalid"):
        check_config(cfg)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["init_from=/no/such/run.ckpt"], r"init_from='/no/such/run\.ckpt': no such file"),
    (["ckpt_path=/no/such/last.ckpt"], r"ckpt_path='/no/such/last\.ckpt': no such file"),
    (["distill=kd_checkpoint", "distill.teacher=/no/teacher.ckpt"],
     r"distill\.teacher='/no/teacher\.ckpt': no such file"),
])
def test_missing_files_are_named(overrides, pattern, tmp_path):
    with pytest.raises(FileNotFoundError, match=pattern):
        check_config(compose_cfg(overrides, tmp_path))


def test_checked_before_any_data_is_read(tmp_path):
    """A bad value wins over a missing data folder: nothing was read yet."""
    from qat.train import run

    cfg = compose_cfg(["quant.weight.bits=0", f"data.data_dir={tmp_path / 'nothing'}",
                       "+data.download=false"], tmp_path)
    with pytest.raises(ConfigError, match="quant.weight"):
        run(cfg)


# ---- the command line ---------------------------------------------------------------------------
def _cli_train(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``qat-train args`` in this process; (exit code, stderr)."""
    quiet = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    monkeypatch.setattr(sys, "argv", ["qat-train", *args, *quiet])
    handlers = list(logging.getLogger().handlers)
    try:
        with pytest.raises(SystemExit) as exc:
            cli.train()
    finally:
        GlobalHydra.instance().clear()
        logging.getLogger().handlers[:] = handlers  # none bound to a closed capture stream
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "needles"), [
    (["quant.weight.bits=12"], ["quant.weight", "bits=12", "allowed an integer from 1 to 8"]),
    (["+quant.colour=red"], ["quant: unknown key 'colour'", "allowed ["]),
    (["quant.colour=red"], ["Could not override 'quant.colour'", "+quant.colour=red",
                            "not in struct", "; keys of quant: activation, attention,"]),
    # a typo: the keys that look like it; a key of another option of its group: those options
    (["trainer.max_epoch=3"], ["trainer.max_epoch", "did you mean trainer.max_epochs"]),
    (["optimizer.lrr=1e-3"], ["did you mean optimizer.lr?"]),
    (["quant.budget=0.1"], ["quant.budget is a key of quant=auto_per_channel_lsq"]),
    (["prune.schedule.final_sparsity=0.5"],
     ["prune.schedule is a key of prune=gradual, prune=one_shot"]),
    (["model=resnet"], ["Could not find 'model/resnet'", "bilstm, bilstm_glove, embbag"]),
    (["prune=gradual", "prune.schedule.end_step=0"], ["prune.schedule", "end_step=0"]),
    # a ramp that ends with the run: no epoch would hold the final sparsity
    (["prune=gradual", "prune.schedule.end_fraction=1.0"],
     ["prune.schedule.end_fraction=1.0 is invalid", "allowed < 1"]),
])
def test_cli_prints_one_line_and_exits_nonzero(args, needles, monkeypatch, capsys):
    code, err = _cli_train(args, monkeypatch, capsys)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qat: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_unwraps_instantiate_errors(monkeypatch, capsys, data_dir):
    """An error raised inside hydra.utils.instantiate (here: Lightning rejects devices=0) is
    printed as its root cause, with the config key Hydra names."""
    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    code, err = _cli_train([*TINY, "trainer.devices=0"], monkeypatch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip().startswith("qat:")]
    assert code == 1 and len(lines) == 1, err
    assert "MisconfigurationException: trainer: " in lines[0] and "devices=0" in lines[0], err
    assert "Traceback" not in err


def test_describe_one_line_from_instantiate():
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"data": {"_target_": "qat.data.GlueDataModule", "task": "nope"}})
    with pytest.raises(Exception) as exc:
        instantiate(cfg.data)
    text = describe(exc.value)
    assert text.startswith("ValueError: data: unknown task 'nope'") and "\n" not in text


def test_full_error_gives_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("QAT_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["qat-train", "quant.weight.bits=12",
                                      "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    with pytest.raises(ConfigError, match="quant.weight"):
        cli.train()


def test_cli_subprocess_one_line(tmp_path):
    """The installed command: exit status 1, one line on stderr, no traceback."""
    env = {**os.environ, "QAT_OUTPUT_DIR": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_FULL_ERROR", None)
    cmd = [sys.executable, "-c", "from qat.cli import train; train()", "+quant.weight.colour=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "quant.weight has no field 'colour'" in lines[0] and "allowed [" in lines[0]
