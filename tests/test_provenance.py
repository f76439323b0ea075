"""qat.provenance: which results are what the current code and configs make. The code
fingerprint covers the numerics code only; a config edit stales the rows it changes and no
other, a model family's code that family's rows; runs stamped before numerics_version 2 are
recognised from their commit; a quantized run is stale when its float run is (or was redone
after it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qat.configs import compose_train
from qat.provenance import (
    CODE_PATHS,
    MODEL_PATHS,
    NUMERICS_VERSION,
    command_overrides,
    config_reason,
    features_of,
    legacy_fingerprint,
    numerics_config,
    numerics_fingerprint,
    numerics_parts,
    provenance,
    row_numerics,
    row_parts,
    stale_reason,
)
from qat.train import _save_config

ROOT = Path(__file__).resolve().parents[1]
CNN = ["recipe=20ng_textcnn_fp32", "seed=42", "run_id=seed42"]
LSTM = ["recipe=20ng_bilstm_fp32", "seed=42", "run_id=seed42"]


NOW = {"core": "c1", "distill": "d1", "prune": "p1", "auto": "a1"}  # code fingerprints, by part


def _run(tmp: Path, name: str, overrides: list[str], **extra) -> Path:
    run = tmp / name
    run.mkdir(parents=True)
    _save_config(compose_train(overrides, tmp / "out"), run)
    results = {"command": "qat-train " + " ".join(overrides), "numerics": "whole",
               "numerics_parts": NOW, "numerics_version": NUMERICS_VERSION, "commit": "abc",
               **extra}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_command_overrides_keeps_values_with_spaces():
    cmd = ("qat-train recipe=a seed=1 +quant.overrides={embedding: {weight: {granularity: "
           "tensor}}} prune.targets=[type:Embedding,type:Linear] trainer.max_epochs=6 "
           "ckpt_path=last")
    assert command_overrides(cmd) == [
        "recipe=a", "seed=1", "+quant.overrides={embedding: {weight: {granularity: tensor}}}",
        "prune.targets=[type:Embedding,type:Linear]", "trainer.max_epochs=6"]
    assert command_overrides("python scripts/baselines.py --tasks rte") is None


def test_numerics_config_ignores_paths_not_numbers(tmp_path):
    a = numerics_config(compose_train(CNN, tmp_path / "a"))
    b = numerics_config(compose_train([*CNN[:2], "run_id=other"], tmp_path / "b"))
    assert a == b  # output folders and run names do not change a number
    assert "paths" not in a and "dirpath" not in a["callbacks"]["model_checkpoint"]
    c = numerics_config(compose_train([*CNN, "optimizer.lr=0.5"], tmp_path / "a"))
    assert c != a and c["optimizer"]["lr"] == 0.5


def test_a_neutral_config_change_keeps_saved_configs_current(tmp_path):
    """best.ckpt's class became qat.callbacks.BestCheckpoint (the same epochs where no schedule
    moves the model): configs saved with Lightning's ModelCheckpoint still compare equal."""
    from omegaconf import OmegaConf

    now = compose_train(CNN, tmp_path / "a")
    assert now.callbacks.model_checkpoint._target_ == "qat.callbacks.BestCheckpoint"
    saved = OmegaConf.to_container(now, resolve=False)
    for key in ("model_checkpoint", "last_checkpoint"):  # as configs saved before it read
        saved["callbacks"][key]["_target_"] = "lightning.pytorch.callbacks.ModelCheckpoint"
    assert numerics_config(OmegaConf.create(saved)) == numerics_config(now)
    saved["callbacks"]["model_checkpoint"]["_target_"] = "my.OwnCheckpoint"
    assert numerics_config(OmegaConf.create(saved)) != numerics_config(now)


@pytest.mark.parametrize("key, default, other", [("exclude", [], "[classifier]"),
                                                   ("criterion", "magnitude", "movement")])
def test_prune_keys_at_their_default_keep_configs_saved_before_them_current(tmp_path, key,
                                                                            default, other):
    """prune.exclude and prune.criterion came later: a config saved without the key compares
    equal to one that has its default; another value does not."""
    from omegaconf import OmegaConf

    now = compose_train([*CNN, "prune=gradual"], tmp_path / "a")
    assert OmegaConf.to_container(now.prune)[key] == default
    saved = OmegaConf.to_container(now, resolve=False)
    del saved["prune"][key]
    assert numerics_config(OmegaConf.create(saved)) == numerics_config(now)
    head = compose_train([*CNN, "prune=gradual", f"prune.{key}={other}"], tmp_path / "b")
    assert numerics_config(head) != numerics_config(now)


def test_editing_one_recipe_stales_its_rows_only(tmp_path, monkeypatch):
    cnn, lstm = _run(tmp_path, "cnn", CNN), _run(tmp_path, "lstm", LSTM)
    assert stale_reason(cnn, NOW) is None and stale_reason(lstm, NOW) is None
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    recipe = conf / "recipe" / "20ng_textcnn_fp32.yaml"
    recipe.write_text(recipe.read_text() + "\nmodel:\n  dropout: 0.123\n")
    monkeypatch.setenv("QAT_CONFIG_DIR", str(conf))
    why = stale_reason(cnn, NOW)
    assert why and "model.dropout" in why and "0.123" in why
    assert stale_reason(lstm, NOW) is None
    assert config_reason(cnn, CNN) == why


def test_stale_on_other_code_and_on_a_redone_float_run(tmp_path):
    up = _run(tmp_path, "float", CNN)
    q_over = ["recipe=20ng_textcnn_w8a8", "seed=42", "run_id=seed42"]
    q = _run(tmp_path, "quant", q_over, float_run={"run_dir": str(up)})
    assert stale_reason(q, NOW) is None
    assert stale_reason(q, {**NOW, "core": "c2"}) == "numerics code changed since commit abc: core"
    later = (q / "results.json").stat().st_mtime + 10
    os.utime(up / "results.json", (later, later))
    assert "redone after it" in stale_reason(q, NOW)
    os.utime(up / "results.json", (later - 20, later - 20))
    (up / "config.yaml").write_text((up / "config.yaml").read_text().replace(
        "max_epochs:", "max_epochs: 99\n  old_max_epochs:", 1))
    assert "its float run is stale" in stale_reason(q, NOW)


def test_a_command_that_no_longer_composes_is_stale(tmp_path):
    run = _run(tmp_path, "cnn", CNN)
    res = json.loads((run / "results.json").read_text())
    res["command"] = "qat-train recipe=no_such_recipe seed=42"
    (run / "results.json").write_text(json.dumps(res))
    assert "no longer composes" in stale_reason(run, NOW)


def test_legacy_results_are_recognised_from_their_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    legacy = {"commit": commit, "numerics": legacy_fingerprint(commit)}
    assert row_numerics(legacy) == numerics_fingerprint(commit)
    assert row_numerics({**legacy, "numerics": "f" * 12}) is None  # not that commit's code
    assert row_numerics({**legacy, "commit": commit + "+dirty"}) == numerics_fingerprint(commit)
    assert row_parts(legacy) == numerics_parts(commit)
    assert row_parts({**legacy, "numerics": "f" * 12}) is None
    new = provenance()
    assert new["numerics_version"] == NUMERICS_VERSION and row_numerics(new) == new["numerics"]
    assert row_parts(new) == numerics_parts()
    # version 2 recorded coarser parts (all models in the core): its parts come from its commit
    v2 = {**new, "commit": commit, "numerics_version": 2, "numerics": numerics_fingerprint(commit),
          "numerics_parts": {"core": "coarse"}}
    assert row_parts(v2) == numerics_parts(commit) and "model:transformer" in row_parts(v2)


def test_a_feature_change_stales_only_the_runs_that_use_it(tmp_path):
    plain = _run(tmp_path, "w8", ["recipe=20ng_textcnn_w8a8", "seed=42", "run_id=seed42"])
    pruned = _run(tmp_path, "p50", ["recipe=20ng_textcnn_w8a8-prune50", "seed=42",
                                     "run_id=seed42"])
    kd = _run(tmp_path, "kd", ["recipe=20ng_textcnn_w4a8", "seed=42", "run_id=seed42",
                               "distill=kd"])
    auto = _run(tmp_path, "auto", ["recipe=20ng_textcnn_auto", "seed=42", "run_id=seed42"])
    runs = {"plain": plain, "pruned": pruned, "kd": kd, "auto": auto}
    uses = {"plain": set(), "pruned": {"prune"}, "kd": {"distill"}, "auto": {"auto", "distill"}}
    for feature in ("prune", "distill", "auto"):
        now = {**NOW, feature: "changed"}
        for name, run in runs.items():
            why = stale_reason(run, now)
            assert (why is not None) == (feature in uses[name]), (feature, name, why)
            if why:
                assert why == f"numerics code changed since commit abc: {feature}"
    for run in runs.values():  # the core runs everywhere
        assert "core" in stale_reason(run, {**NOW, "core": "c2"})


def test_the_parts_add_up_to_the_code():
    from qat.provenance import CORE_PATHS, FEATURE_PATHS

    def files(paths):
        out = set()
        for p in paths:
            q = ROOT / p
            out |= {f for f in q.rglob("*.py")} if q.is_dir() else {q}
        return out

    parts = [CORE_PATHS, *FEATURE_PATHS.values()]
    assert files(CODE_PATHS) == set().union(*map(files, parts))  # every file in one part
    assert sum(len(files(p)) for p in parts) == len(files(CODE_PATHS))  # and in one only
    assert {"model:textcnn", "model:bilstm", "model:transformer", "model:embbag",
            "model:pretrained"} <= set(MODEL_PATHS)
    assert features_of({"quant": {"_target_": "qat.auto.AutoQuantCallback"},
                        "prune": {"_target_": "qat.prune.PruningCallback"}, "distill": {}}) == [
        "prune", "auto"]
    assert features_of({"model": {"_target_": "qat.models.TransformerClassifier"}}) == [
        "model:transformer"]
    assert features_of({"model": {"_target_": "qat.models.NoSuchModel"}}) == list(MODEL_PATHS)
    assert features_of({"model": {"_target_": "mypkg.Model"}}) == []


def test_a_model_change_stales_only_that_family(tmp_path):
    cnn, lstm = _run(tmp_path, "cnn", CNN), _run(tmp_path, "lstm", LSTM)
    tf = _run(tmp_path, "tf", ["recipe=20ng_transformer_w8a8", "seed=42", "run_id=seed42"])
    now = {**NOW, **{k: "m1" for k in MODEL_PATHS}}
    runs = {"textcnn": cnn, "bilstm": lstm, "transformer": tf}
    for run in runs.values():
        (run / "results.json").write_text((run / "results.json").read_text().replace(
            '"numerics_parts": {', '"numerics_parts": {' + ", ".join(
                f'"{k}": "m1"' for k in MODEL_PATHS) + ", "))
        assert stale_reason(run, now) is None
    for family, run in runs.items():
        changed = {**now, f"model:{family}": "m2"}
        assert stale_reason(run, changed) == (
            f"numerics code changed since commit abc: model:{family}")
        assert all(stale_reason(r, changed) is None for f, r in runs.items() if f != family)


def test_configs_are_outside_the_code_fingerprint():
    from qat.provenance import LEGACY_PATHS

    assert not any(p.startswith(("conf", "recipes")) for p in CODE_PATHS)
    assert "qat/auto" in CODE_PATHS and "qat/autoquant" not in CODE_PATHS  # the package's name
    for path in CODE_PATHS:
        assert (ROOT / path).exists(), path
    assert "conf" in LEGACY_PATHS


def test_archived_copies_are_checked_from_the_config_they_carry(tmp_path, monkeypatch):
    import yaml

    up = _run(tmp_path / "out", "20ng_textcnn_fp32/seed42", CNN)
    q = _run(tmp_path / "out", "20ng_textcnn_w8a8/seed42",
             ["recipe=20ng_textcnn_w8a8", "seed=42", "run_id=seed42"],
             float_run={"recipe": "20ng_textcnn_fp32", "run_dir": str(tmp_path / "gone/seed42")})
    archive = tmp_path / "runs"
    for run in (up, q):  # as scripts/report.py archives: results.json with its config inside
        dest = archive / run.parent.name / run.name
        dest.mkdir(parents=True)
        res = json.loads((run / "results.json").read_text())
        res["config"] = yaml.safe_load((run / "config.yaml").read_text())
        (dest / "results.json").write_text(json.dumps(res))
    q_copy = archive / "20ng_textcnn_w8a8" / "seed42"
    assert stale_reason(q_copy, NOW) is None
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    recipe = conf / "recipe" / "20ng_textcnn_fp32.yaml"
    text = recipe.read_text()
    assert "max_epochs: 8\n" in text
    recipe.write_text(text.replace("max_epochs: 8\n", "max_epochs: 77\n"))
    monkeypatch.setenv("QAT_CONFIG_DIR", str(conf))
    why = stale_reason(q_copy, NOW)  # the float run it started from (its archived copy) changed
    assert why and "its float run is stale" in why and "77" in why


def test_a_neutral_change_keeps_the_runs_current(tmp_path, monkeypatch):
    """A change declared numerics-neutral (NEUTRAL, checked by scripts/check_neutral.py) keeps
    the runs made before it current, through a chain of such changes; any other stays stale."""
    import qat.provenance as prov

    run = _run(tmp_path, "w8", ["recipe=20ng_textcnn_w8a8", "seed=42", "run_id=seed42"])
    assert "core" in stale_reason(run, {**NOW, "core": "c3"})
    monkeypatch.setattr(prov, "NEUTRAL", {"core": {"c1": "c2", "c2": "c3", "x": "x"}})
    assert stale_reason(run, {**NOW, "core": "c3"}) is None  # c1 -> c2 -> c3
    assert stale_reason(run, {**NOW, "core": "c2"}) is not None  # c1's numbers are c3's now
    assert "core" in stale_reason(run, {**NOW, "core": "c4"})
    assert prov.settled("core", "x") == "x" and prov.settled("prune", "c1") == "c1"


def test_check_neutral_compares_metrics_sizes_and_every_tensor(tmp_path):
    import torch
    from helpers import load_script

    check = load_script("qat_check_neutral", "check_neutral.py")

    def run(name: str, acc: float, w: torch.Tensor) -> Path:
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"stages": {"qat": {"test/accuracy": acc}},
                                                    "size": {"quantized_bytes": 10}}))
        torch.save({"state_dict": {"w": w, "step": 3}}, d / "checkpoints" / "best.ckpt")
        return d

    w = torch.randn(4, 4)
    w[1, 1] = float("nan")  # a buffer not yet recorded: NaN equals the same NaN
    a = run("a", 0.5, w)
    assert check.compare(a, run("b", 0.5, w.clone())) is None
    assert check.compare(a, run("c", 0.5000001, w)).startswith("stages")
    w2 = w.clone()
    w2[0, 0] = torch.nextafter(w2[0, 0], torch.tensor(10.0))  # one ulp
    assert check.compare(a, run("d", 0.5, w2)) == "tensor best.ckpt:w differs"


def test_a_float_run_redone_since_is_seen_from_its_result_too(tmp_path):
    """An archived copy (no config.yaml, mtimes of the copy) still tells that its float run was
    redone: the float result it started from is not the float run's result now."""
    up = _run(tmp_path, "float", CNN, stages={"fp32": {"test/accuracy": 0.80}})
    q_over = ["recipe=20ng_textcnn_w8a8", "seed=42", "run_id=seed42"]
    q = _run(tmp_path, "quant", q_over, float_run={"run_dir": str(up)},
             stages={"fp32": {"test/accuracy": 0.80}, "qat": {"test/accuracy": 0.81}})
    saved = json.loads((q / "results.json").read_text())
    (q / "config.yaml").unlink()  # an archive: the config travels inside results.json
    (q / "results.json").write_text(json.dumps(saved))
    later = (q / "results.json").stat().st_mtime - 10
    os.utime(up / "results.json", (later, later))  # the float run looks older than the copy
    assert stale_reason(q, NOW) is None
    res = json.loads((up / "results.json").read_text())
    res["stages"]["fp32"]["test/accuracy"] = 0.82  # redone: another float model
    (up / "results.json").write_text(json.dumps(res))
    os.utime(up / "results.json", (later, later))
    assert "redone after it (float result changed)" in stale_reason(q, NOW)


@pytest.mark.slow
def test_check_neutral_end_to_end(data_dir, capsys, monkeypatch):
    """The script itself: a worktree of HEAD against the working tree, one small run each, and
    the worktree removed afterwards."""
    from helpers import load_script

    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))

    check = load_script("qat_check_neutral_e2e", "check_neutral.py")
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    code = check.main(["--base", "HEAD", "--only", "textcnn_w8a8"])
    out = capsys.readouterr().out
    assert "textcnn_w8a8" in out and code in (0, 1)  # 1 only when the working tree's numerics
    assert ("same" in out) == (code == 0)            # code differs from HEAD
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before
