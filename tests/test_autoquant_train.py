"""qat-train with a budget: recipe 20ng_textcnn_auto from a float checkpoint, resume, eval."""

from __future__ import annotations

import pytest
import yaml
from helpers import TINY, compose_cfg
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import qat
from qat.auto import AutoQuantCallback
from qat.config_check import ConfigError, check_config
from qat.nn.base import weight_quantizers
from qat.train import run

pytestmark = pytest.mark.usefixtures("train_env")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir) -> str:
    """The float recipe's best checkpoint (what 20ng_textcnn_auto initialises from)."""
    import os

    os.environ["QAT_DATA_DIR"] = str(data_dir)
    out = tmp_path_factory.mktemp("float")
    run(compose_cfg(["recipe=20ng_textcnn_fp32", "trainer.max_epochs=1", "run_id=teacher",
                     *TINY], out))
    GlobalHydra.instance().clear()
    return str(out / "teacher" / "checkpoints" / "best.ckpt")


def _bits(model) -> dict[str, tuple[int, str]]:  # noqa: ANN001
    return {f"{m}.{p}": (q.spec.bits, q.spec.mode) for m, _, p, q in weight_quantizers(model)}


def test_auto_recipe_trains_to_its_budget_and_restores(teacher, tmp_path) -> None:
    base = ["recipe=20ng_textcnn_auto", f"init_from={teacher}", "trainer.max_epochs=1",
            "quant.budget=0.12", "quant.calibration_batches=2", *TINY]
    cfg = compose_cfg([*base, "run_id=auto"], tmp_path)
    res = run(cfg)
    out = tmp_path / "auto"
    (out / ".hydra").mkdir()  # what qat-train's Hydra writes (qat-eval / qat-export read it)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   out / ".hydra" / "config.yaml")
    assert res["stages"]["qat"]["test/accuracy"] >= 0.0
    assert res["size"]["quantized_bytes"] <= 0.12 * res["size"]["fp32_bytes"]
    node = yaml.safe_load((out / "autoquant.yaml").read_text())
    assert node["_target_"] == "qat.callbacks.QuantizationCallback" and node["overrides"]
    assert "| group |" in (out / "autoquant.md").read_text()
    # the run's checkpoint restores with the formats the run chose (qat-eval / qat-export)
    from qat.evaluate import open_run

    parts = open_run(out / "checkpoints" / "best.ckpt")
    assert isinstance(parts.quant, AutoQuantCallback) and parts.quant.allocated
    restored = parts.restore()
    chosen = AutoQuantCallback(budget=0.12)
    chosen.load(out / "autoquant.yaml")
    from qat.train import build_model

    skeleton = qat.prepare(build_model(parts.cfg, parts.dm), chosen.config)[0]
    assert _bits(restored) == _bits(skeleton)
    assert len(set(_bits(restored).values())) > 1  # mixed precision


def test_resumed_auto_run_reuses_its_choice(teacher, tmp_path, monkeypatch) -> None:
    base = ["recipe=20ng_textcnn_auto", f"init_from={teacher}", "quant.budget=0.12",
            "quant.calibration_batches=1", "scheduler=constant", *TINY, "run_id=r"]
    run(compose_cfg([*base, "trainer.max_epochs=1"], tmp_path))
    first = (tmp_path / "r" / "autoquant.yaml").read_text()

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a resumed run must not allocate again")

    monkeypatch.setattr(AutoQuantCallback, "allocate", boom)
    res = run(compose_cfg([*base, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path))
    assert res["stages"]["qat"]
    assert (tmp_path / "r" / "autoquant.yaml").read_text() == first


@pytest.mark.parametrize("override, match", [
    ("quant.budget=1.5", "quant.budget=1.5 is invalid"),
    ("quant.budget_kind=watts", "quant.budget_kind='watts' is invalid"),
    ("quant.weight_bits=[9]", "quant.weight_bits"),
    ("quant.sensitivity=magic", "quant.sensitivity='magic'"),
])
def test_bad_budget_is_one_config_error(teacher, tmp_path, override, match) -> None:
    cfg = compose_cfg(["recipe=20ng_textcnn_auto", f"init_from={teacher}", override, *TINY],
                      tmp_path)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_auto_recipe_with_embedding_bands(teacher, tmp_path) -> None:
    """Frequency bands: allocated per band, rarest rows dropped, the budget a fraction of the
    whole float model; the written autoquant.yaml trains as it is; eval restores the bands."""
    from qat.auto.bands import BandedEmbedding

    cfg = compose_cfg(["recipe=20ng_textcnn_auto-bands", f"init_from={teacher}",
                       "trainer.max_epochs=1", "quant.budget=0.2", "quant.calibration_batches=1",
                       "quant.embedding_bands.bounds=[40,120]", *TINY, "run_id=bands"], tmp_path)
    res = run(cfg)
    out = tmp_path / "bands"
    assert res["size"]["quantized_bytes"] <= 0.2 * res["size"]["fp32_bytes"]
    node = yaml.safe_load((out / "autoquant.yaml").read_text())
    assert node["_target_"] == "qat.auto.AutoQuantCallback" and node["budget"] is None
    assert node["embedding_bands"] == {"module": "embedding", "bounds": [40, 120]}
    from hydra.utils import instantiate

    from qat.evaluate import open_run
    from qat.train import build_model

    cb = instantiate(OmegaConf.create(node))
    assert cb.allocated and cb.embedding_bands == node["embedding_bands"]
    (out / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   out / ".hydra" / "config.yaml")
    restored = open_run(out / "checkpoints" / "best.ckpt").restore()
    assert isinstance(restored.embedding, BandedEmbedding)
    bits = _bits(restored)
    assert {"embedding.bands.0.weight", "embedding.bands.1.weight"} <= set(bits)
    from qat.export.cli import export_checkpoint

    rec = export_checkpoint(out / "checkpoints" / "best.ckpt", limit=16)
    assert rec["formats"]["int_checkpoint"]["agreement"] == 1.0
    whole = 4 * sum(p.numel() for p in build_model(cfg, open_run(
        out / "checkpoints" / "best.ckpt").dm).parameters())  # the float model, every row
    assert whole <= rec["sizes"]["float_bytes"] < whole + 8192
    GlobalHydra.instance().clear()
    resumed = compose_cfg(["recipe=20ng_textcnn_auto-bands", f"init_from={teacher}",
                           "trainer.max_epochs=2", "quant.budget=0.2",
                           "quant.calibration_batches=1", "quant.embedding_bands.bounds=[40,120]",
                           *TINY, "run_id=bands", "ckpt_path=last"], tmp_path)
    assert run(resumed)["stages"]["qat"]
