"""The command line as a user meets it: one error report and one exit status for qat-train,
qat-eval and qat-export, and no import cycle between the entry points and the modules they run."""

from __future__ import annotations

import ast
import logging
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


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("QAT_FULL_ERROR", "0")
    yield
    GlobalHydra.instance().clear()


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
