"""scripts/sweep.py: job states (done / stale / partial / new) and the scheduler (a quantized job
starts only after its float job, not at all when that failed; file order otherwise)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import pytest
from helpers import load_script

from qat.provenance import NUMERICS_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    yield load_script("qat_sweep", "sweep.py")
    sys.modules.pop("qat_sweep", None)


SPEC = {"rows": [{"recipe": "a_m_fp32", "seeds": [1, 2]}, {"recipe": "a_m_w8a8", "seeds": [1, 2]},
                 {"recipe": "b_m_fp32"}, {"recipe": "b_m_w8a8", "overrides": ["quant=x"]}]}


def test_states(sweep, tmp_path):
    job = sweep.jobs_of(SPEC, ())[0]
    parts = {"core": "c1"}
    assert sweep.state_of(job, tmp_path, "n1", parts=parts) == "new"
    run = job.run_dir(tmp_path)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("x")
    (run / "numerics.txt").write_text("n1\n")
    assert sweep.state_of(job, tmp_path, "n1", parts=parts) == "partial"
    assert sweep.state_of(job, tmp_path, "n2", parts=parts) == "stale"
    (run / "results.json").write_text(json.dumps({"numerics": "n1", "numerics_parts": parts,
                                                  "numerics_version": NUMERICS_VERSION}))
    assert sweep.state_of(job, tmp_path, "n1", parts=parts) == "done"
    assert sweep.state_of(job, tmp_path, "n1", parts={"core": "c2"}) == "stale"


def test_partial_runs_resume_across_neutral_changes_only(sweep, tmp_path, monkeypatch):
    """A half-done run stamped by code whose parts changed since only by NEUTRAL changes resumes
    (``partial``); a real change to a part it runs, or a one-line stamp from before the parts,
    makes it ``stale``; the stamp reads back what was written."""
    import qat.provenance as prov

    job = sweep.jobs_of(SPEC, ())[0]
    run = job.run_dir(tmp_path)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("x")
    (run / "config.yaml").write_text("{}\n")
    sweep.write_stamp(run, "n0", {"core": "c0", "prune": "p0", "auto": None})
    assert sweep.read_stamp(run) == ("n0", {"core": "c0", "prune": "p0", "auto": None})
    now = {"core": "c1", "prune": "p9"}
    assert sweep.state_of(job, tmp_path, "n1", parts=now) == "stale"
    monkeypatch.setattr(prov, "NEUTRAL", {"core": {"c0": "c1"}})
    # the prune part changed for real, but a run without pruning does not run it
    assert sweep.state_of(job, tmp_path, "n1", parts=now) == "partial"
    assert sweep.state_of(job, tmp_path, "n1", parts={"core": "c2"}) == "stale"
    monkeypatch.setattr(sweep, "config_reason", lambda *a, **k: None)  # (no such recipe)
    (run / "config.yaml").write_text("prune: {_target_: qat.prune.X}\n")
    assert sweep.state_of(job, tmp_path, "n1", parts={**now, "prune": "p0"}) == "partial"
    assert sweep.state_of(job, tmp_path, "n1", parts=now) == "stale"
    (run / "numerics.txt").write_text("n0\n")  # before the parts were stamped
    (run / "config.yaml").write_text("{}\n")
    assert sweep.read_stamp(run) == ("n0", {})
    assert sweep.state_of(job, tmp_path, "n1", parts=now) == "stale"
    assert sweep.state_of(job, tmp_path, "n0", parts=now) == "partial"


def test_archived_runs_count_as_done_and_floats_rerun_when_needed(sweep, tmp_path):
    """On a new machine (empty output folder) a job whose archived results.json is current is
    ``archived``, not run; a stale archive or a resumable run here is not; an archived float is
    retrained only when a quantized job to run needs its checkpoint."""
    jobs = sweep.jobs_of(SPEC, ())
    parts, out, arch = {"core": "c1"}, tmp_path / "out", tmp_path / "runs"
    fl = jobs[0]  # a_m_fp32 seed 1
    kept = arch / fl.recipe / fl.run_id
    kept.mkdir(parents=True)
    (kept / "results.json").write_text(json.dumps({"numerics": "n1", "numerics_parts": parts,
                                                   "numerics_version": NUMERICS_VERSION}))
    assert sweep.state_of(fl, out, "n1", parts=parts) == "new"  # no archive given
    assert sweep.state_of(fl, out, "n1", parts=parts, archive=arch) == "archived"
    assert sweep.state_of(fl, out, "n1", parts={"core": "c2"}, archive=arch) == "new"
    (fl.run_dir(out) / "checkpoints").mkdir(parents=True)
    (fl.run_dir(out) / "checkpoints" / "last.ckpt").write_text("x")
    (fl.run_dir(out) / "numerics.txt").write_text("n1\n")
    assert sweep.state_of(fl, out, "n1", parts=parts, archive=arch) == "partial"

    quant = next(j for j in jobs if j.recipe == "a_m_w8a8" and j.seed == fl.seed)
    other = next(j for j in jobs if j.recipe == "a_m_fp32" and j.seed != fl.seed)
    states = {j: "archived" for j in jobs}
    assert sweep.with_needed_floats(jobs, states) == states  # nothing to run: nothing retrained
    states[quant] = "new"
    needed = sweep.with_needed_floats(jobs, states)
    assert needed[fl] == "new" and needed[other] == "archived"
    assert {j for j in jobs if needed[j] != states[j]} == {fl}


def test_scheduler_waits_for_float_and_skips_after_failure(sweep, tmp_path, monkeypatch):
    jobs = sweep.jobs_of(SPEC, ())
    started, lock = [], threading.Lock()
    finished = set()

    def fake_run(job, output, numerics, python, log_dir):
        with lock:
            dep = sweep.float_job_of(job, jobs)
            assert dep is None or dep in finished  # its float run is complete
            started.append((job.recipe, job.seed))
        rc = 1 if job.recipe == "b_m_fp32" else 0
        with lock:
            finished.add(job)
        return rc

    monkeypatch.setattr(sweep, "_run", fake_run)
    args = argparse.Namespace(workers=3, stop_after=0, python=sys.executable)
    failed = sweep.schedule(jobs, tmp_path, "n", args, 0.0)
    assert failed == 2  # b's float run and the W8A8 run that needed it
    assert ("b_m_w8a8", 42) not in started
    assert sorted(started) == [("a_m_fp32", 1), ("a_m_fp32", 2), ("a_m_w8a8", 1),
                               ("a_m_w8a8", 2), ("b_m_fp32", 42)]
    assert sweep.float_job_of(jobs[2], jobs) == jobs[0]  # a_m_w8a8 seed 1 -> a_m_fp32 seed 1


def test_a_job_done_meanwhile_is_not_trained_again(sweep, tmp_path, monkeypatch, capsys):
    """Two sweeps over one output folder: the second finds the job done when its turn comes."""
    job = sweep.jobs_of(SPEC, ())[0]
    run = job.run_dir(tmp_path)
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    monkeypatch.setattr(sweep, "state_of", lambda *a, **k: "done")

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a done job must not be started")

    monkeypatch.setattr(sweep.subprocess, "run", boom)
    assert sweep._run(job, tmp_path, "n1", sys.executable, tmp_path / "logs") == 0
    assert (run / "results.json").read_text() == "{}"
    assert "done meanwhile" in capsys.readouterr().out
