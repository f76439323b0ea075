"""The command line as a user meets it: one error report and one exit status for qat-train,
qat-eval and qat-export, and no import cycle between the entry points and the modules they run."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from qat import cli
from qat.errors import EXIT_ERROR
from qat.evaluate import main as eval_main
from qat.export.cli import main as export_main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


pytestmark = pytest.mark.usefixtures("cli_env")


def _imports(path: Path) -> set[str]:
    """The qat modules ``path`` imports, at module level or inside functions."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qat")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("qat"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def test_no_module_imports_the_entry_points():
    """qat.cli holds entry points only: nothing in the package imports it (it used to be
    imported back by qat.evaluate and qat.export.cli for its error helpers: a cycle)."""
    importers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "qat").rglob("*.py")
                       if p.name != "cli.py" or p.parent.name != "qat"
                       if "qat.cli" in _imports(p))
    assert importers == [], importers


def _exit_code(fn, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    handlers = list(logging.getLogger().handlers)
    try:
        with pytest.raises(SystemExit) as exc:
            if fn is cli.train:
                monkeypatch.setattr(sys, "argv", ["qat-train", *args, *QUIET])
                fn()
            else:
                fn(args)
    finally:
        GlobalHydra.instance().clear()
        logging.getLogger().handlers[:] = handlers
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("entry", ["train", "eval", "export"])
def test_one_report_and_exit_status_for_every_command(entry, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "best.ckpt"
    fn, args = {"train": (cli.train, [f"init_from={missing}"]),
                "eval": (eval_main, [str(missing)]),
                "export": (export_main, [str(missing)])}[entry]
    code, err = _exit_code(fn, args, monkeypatch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_ERROR, (code, err)
    assert len(lines) == 1 and lines[0].startswith("qat: error: "), err
    assert str(missing) in lines[0]


# ---- item: errors keep their whole cause; a failed call leaves no empty run folder -------------
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_error_keeps_the_whole_cause(monkeypatch, capsys):
    """The recipe list of an unknown recipe is whole (it was cut at 600 characters)."""
    code, err = _exit_code(cli.train, ["recipe=does_not_exist"], monkeypatch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_ERROR and len(lines) == 1, err  # stderr is no terminal: one line
    assert "..." not in lines[0]
    for name in RECIPES:
        assert name in lines[0], name


def test_error_wraps_on_a_terminal(monkeypatch, capsys):
    """On a terminal the report is wrapped to its width, every word kept; in a file, one line."""
    from qat.errors import fail, format_error

    words = [f"/data/folder{i}/file.tsv" for i in range(40)]
    err = FileNotFoundError("not found in any of: " + " ".join(words))
    flat = format_error(err)
    assert "\n" not in flat and flat.endswith(words[-1])

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("COLUMNS", "70")
    with pytest.raises(SystemExit):
        fail(err)
    lines = tty.text.rstrip("\n").split("\n")
    assert len(lines) > 5 and all(len(ln) <= 70 for ln in lines), lines
    assert lines[0].startswith("qat: error: ") and all(ln.startswith("  ") for ln in lines[1:])
    assert " ".join(ln.strip() for ln in lines) == flat


def _qat_train(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "qat-train"
    head = [str(script)] if script.is_file() else [
        sys.executable, "-c", "from qat.cli import train; train()"]
    return subprocess.run(head + args, env=env, capture_output=True, text=True, timeout=300)


def _env_for(out: Path, data: Path) -> dict[str, str]:
    env = {**os.environ, "QAT_OUTPUT_DIR": str(out), "QAT_DATA_DIR": str(data),
           "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_FULL_ERROR", None)
    return env


def test_failed_call_leaves_no_run_folder(tmp_path):
    """Missing data: the run folder Hydra made (only .hydra/ and the job log) is removed, and so
    is outputs/<recipe>/, which held nothing else; so is the folder of the float run the main
    job trains first (init_from=recipe:20ng_textcnn_fp32), which failed on the same data."""
    out, empty = tmp_path / "out", tmp_path / "no_data"
    empty.mkdir()
    proc = _qat_train(["run_id=x"], _env_for(out, empty))
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert "20 Newsgroups not found" in proc.stderr
    assert not (out / "20ng_textcnn_w8a8").exists(), sorted(out.rglob("*"))
    assert not (out / "20ng_textcnn_fp32").exists(), sorted(out.rglob("*"))


def test_failed_call_keeps_a_started_run_and_logs_why(tmp_path, data_dir):
    """A run folder holding work (here a previous run's checkpoint) is kept; the error is written
    to its cli.log."""
    out = tmp_path / "out"
    run_dir = out / "20ng_textcnn_w8a8" / "r1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    proc = _qat_train(["run_id=r1", "ckpt_path=last"], _env_for(out, data_dir))
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    log = (run_dir / "cli.log").read_text()
    assert log.startswith("qat: error: ") and "ckpt_path" in log, log


# ---- item: progress without a terminal ----------------------------------------------------------
TINY = ["data.limit_train=48", "data.limit_eval=24", "data.batch_size=8", "data.max_length=32",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_model_summary=false"]
PROGRESS = re.compile(
    r"^\[(?P<stage>float|qat)\] epoch (?P<epoch>\d)/2(?P<done> done)?  step (?P<step>\d+)/8 "
    r"\(\d+%\)  loss \d+\.\d{4}  val/accuracy (?P<val>-|\d\.\d{4})  elapsed \d:\d\d:\d\d  "
    r"eta \d:\d\d:\d\d$")


def test_progress_lines_without_a_terminal(tmp_path, data_dir):
    """Output to a pipe: a plain line every N steps and at each epoch end, for both stages, with
    stage, epoch, step / total, loss, main metric, elapsed and ETA; a line per test run; no
    terminal control codes, W&B's included (its end-of-run summary had them); no known-harmless
    notice, the real warnings kept; no empty cli.log in the run folder."""
    out = tmp_path / "out"
    env = {**_env_for(out, data_dir), "WANDB_MODE": "offline"}
    proc = _qat_train([*TINY, "init_from=null", "baseline_epochs=2", "trainer.max_epochs=2",
                       "run_id=p",
                       "callbacks.progress_bar.every_n_steps=3", "logger=wandb_offline"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [m.groupdict() for m in map(PROGRESS.match, proc.stdout.splitlines()) if m]
    steps = [(d["stage"], d["epoch"], d["step"], bool(d["done"])) for d in found]
    # every 3 steps (not on an epoch's last step: its epoch line follows), and each epoch end
    per_stage = [("1", "3", False), ("1", "4", True), ("2", "6", False), ("2", "8", True)]
    assert steps == [(s, *x) for s in ("float", "qat") for x in per_stage], proc.stdout
    assert all(d["val"] != "-" for d in found if d["done"])  # validated at each epoch end
    assert proc.stdout.count("] test: 1 batches in ") == 2
    everything = proc.stdout + proc.stderr
    assert "\x1b[" not in everything
    # known-harmless notices are gone (qat/quiet.py), real warnings stay
    assert "LeafSpec" not in everything and "litlogger" not in everything
    assert "is smaller than the logging interval" in everything  # 4 batches, log every 20
    run_dir = out / "20ng_textcnn_w8a8" / "p"
    assert (run_dir / "results.json").is_file()
    assert all(p.stat().st_size for p in run_dir.rglob("*.log")), list(run_dir.rglob("*.log"))


@pytest.mark.parametrize(("style", "tty", "expect"), [
    ("auto", True, "RichProgressBar"), ("auto", False, "LineProgressBar"),
    ("rich", False, "RichProgressBar"), ("lines", True, "LineProgressBar")])
def test_progress_bar_follows_the_output(style, tty, expect, monkeypatch):
    from qat.callbacks import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    assert type(progress_bar(style=style)).__name__ == expect
    with pytest.raises(ValueError, match="style='tqdm'"):
        progress_bar(style="tqdm")


# ---- item: scheme names say what they are -------------------------------------------------------
QUANT = sorted(p.stem for p in (ROOT / "conf" / "quant").glob("*.yaml"))


@pytest.mark.parametrize("option", QUANT)
def test_quant_option_names_state_bits_granularity_and_estimator(option, tmp_path):
    """`quant=w8a8` used to be per-tensor while the recipes' W8A8 was per-channel: every option
    now names its bit widths, its weight granularity and a learned-scale estimator."""
    from helpers import compose_cfg
    from omegaconf import OmegaConf

    q = OmegaConf.to_container(compose_cfg([f"quant={option}"], tmp_path).quant, resolve=True)
    if q["mode"] == "fp32":
        assert option == "fp32"
        return
    w, a = q["weight"], q["activation"]
    if q.get("budget") is not None:  # qat.autoquant chooses the widths per layer: auto_...
        assert option.startswith("auto_")
    else:
        assert f"w{w['bits']}a{a['bits']}" in option
    assert f"per_{w.get('granularity', 'tensor')}" in option
    assert ("lsq" in option) == (w.get("estimator") in ("lsq", "lsq_plus"))
    assert ("mse" in option) == (w.get("observer") == "mse")
    assert option.startswith("ptq_") == (q["mode"] == "ptq")
    for mode in ("ternary", "binary"):
        assert (mode in option) == (w.get("mode") == mode)


# ---- item: qat-train --help ---------------------------------------------------------------------
def test_help_names_the_program_recipes_and_examples(tmp_path):
    from qat.usage import EXAMPLES, describe_file

    env = _env_for(tmp_path, tmp_path)
    proc = _qat_train(["--help"], env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("qat-train: ") and "powered by Hydra" not in text
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        desc = describe_file(path)
        assert desc and not desc.startswith("@package"), path
        assert re.search(rf"^  {re.escape(path.stem)} +{re.escape(desc)}$", text, re.M), path
    for path in sorted((ROOT / "conf" / "quant").glob("*.yaml")):
        assert re.search(rf"^  {re.escape(path.stem)} +\S", text, re.M), path
    assert len(EXAMPLES) >= 2
    for _, cmd in EXAMPLES:
        assert f"\n  {cmd}\n" in text
    assert not list(tmp_path.rglob("*.yaml"))  # --help runs nothing


@pytest.mark.parametrize("index", [0, 1])
def test_help_examples_compose(index, tmp_path):
    """The example commands of --help are valid: each job of them composes and passes the
    config checks."""
    import itertools

    from helpers import compose_cfg

    from qat.config_check import check_config
    from qat.usage import EXAMPLES

    args = EXAMPLES[index][1].split()[1:]
    args = [a for a in args if a != "-m"]
    choices = [[f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args]
    for job in itertools.product(*choices):
        check_config(compose_cfg(list(job), tmp_path))
        GlobalHydra.instance().clear()


# ---- item: W&B, one run per stage ----------------------------------------------------------------
def test_wandb_one_run_per_stage_in_the_run_folder(tmp_path, monkeypatch, data_dir):
    """Each stage is its own W&B run (the QAT stage reused the float stage's), named
    <job>/<stage>, grouped by the run id, written under <run dir>/wandb (was <run>/float/wandb)."""
    import wandb
    from helpers import TINY as SMALL
    from helpers import compose_cfg

    from qat.train import run

    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls: list[dict] = []
    real = wandb.init

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    cfg = compose_cfg(["recipe=20ng_textcnn_w8a8", "init_from=null", "logger=wandb_offline",
                       "baseline_epochs=1",
                       "trainer.max_epochs=1", "run_id=wb", *SMALL], tmp_path)
    run(cfg)
    run_dir = tmp_path / "wb"
    assert [c["job_type"] for c in calls] == ["float", "qat"], calls
    assert [c["name"] for c in calls] == ["20ng_textcnn_w8a8/float", "20ng_textcnn_w8a8/qat"]
    assert {c["group"] for c in calls} == {"wb"}
    assert {c["dir"] for c in calls} == {str(run_dir)}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert not (run_dir / "float" / "wandb").exists()
    assert wandb.run is None  # the last stage's run is closed too


# ---- item: disk ----------------------------------------------------------------------------------
def test_best_checkpoint_holds_weights_only(tmp_path, monkeypatch, data_dir):
    """best.ckpt (evaluation, export, init_from) keeps the weights and the vocabulary, not the
    optimizer state: a third of last.ckpt (which resumes); resuming from it is a clear error."""
    import torch
    from helpers import TINY as SMALL
    from helpers import compose_cfg

    from qat.config_check import ConfigError
    from qat.train import run

    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    base = ["recipe=20ng_textcnn_w8a8", "baseline_epochs=0", "trainer.max_epochs=1", *SMALL]
    run(compose_cfg([*base, "run_id=d"], tmp_path))
    best, last = tmp_path / "d/checkpoints/best.ckpt", tmp_path / "d/checkpoints/last.ckpt"
    b = torch.load(best, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in b and "state_dict" in b
    assert "NewsgroupsDataModule" in b  # the vocabulary evaluation needs
    assert "optimizer_states" in torch.load(last, map_location="cpu", weights_only=True)
    assert best.stat().st_size < 0.5 * last.stat().st_size
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match=r"holds model weights only .* ckpt_path=last"):
        run(compose_cfg([*base, "run_id=e", f"ckpt_path={best}"], tmp_path))


# ---- item: noise ------------------------------------------------------------------------------
def test_only_the_known_notices_are_silenced():
    import warnings

    from qat.quiet import silence_known_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("some other future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other future change"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def passes(msg: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg,
                                                    None, None)))

    assert not passes("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
    assert passes("GPU available: False, used: False")


# ---- item: README -----------------------------------------------------------------------------
def test_readme_python_snippets_import_only_what_they_use():
    """The snippet imported QuantSpec and never used it."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            m = re.match(r"\s*(?:from \S+ )?import (.+)", line)
            if not m:
                continue
            names = [n.split(" as ")[-1].strip().split(".")[0] for n in m.group(1).split(",")]
            rest = block.replace(line, "")
            for name in names:
                assert re.search(rf"\b{re.escape(name)}\b", rest), (name, line)
