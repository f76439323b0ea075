"""Run every row of the results table (``scripts/sweep.yaml``), resumably; then report.

Each row is a recipe and its seeds. A row's run lives in ``<output>/<recipe>/<run id>`` (run id
``seed<seed>``, plus a hash of the extra overrides, as :func:`qat.upstream.float_run_id` names
the float run a quantized recipe starts from). A run is skipped when its ``results.json`` (in
the output folder, or archived in ``results/runs`` by the report) was made by the current code
and config (same numerics fingerprint, a saved config equal to what
the job composes now, a float run that is current and older than it:
:func:`qat.provenance.stale_reason`), resumed from ``last.ckpt`` when it stopped half-way with
the current code and config (or code changed since only by changes that left every number as it
was: :data:`qat.provenance.NEUTRAL`), and redone otherwise. Float
recipes run first, so the quantized recipes (``init_from=recipe:<float recipe>``) find their
float run; ``--workers N`` runs N jobs at once (a GPU host), each with its own log, in file
order, a quantized job as soon as its float job has finished.

Usage::

    python scripts/sweep.py                    # every row, one job at a time (2-core CPU)
    python scripts/sweep.py --only '20ng_textcnn_*' --dry-run
    python scripts/sweep.py --only '*minilm*' --workers 8 -- trainer=gpu   # extra overrides
    python scripts/report.py                   # table, plots, README section
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qat.provenance import (  # noqa: E402
    changed_parts,
    config_reason,
    legacy_fingerprint,
    numerics_fingerprint,
    numerics_parts,
    saved_config,
    stale_reason,
)
from qat.upstream import float_run_id  # noqa: E402

__all__ = ["Job", "jobs_of", "state_of", "state_and_reason", "with_needed_floats", "main"]


@dataclass(frozen=True)
class Job:
    recipe: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def run_id(self) -> str:
        return float_run_id(self.seed, self.overrides)

    def run_dir(self, output: Path) -> Path:
        return output / self.recipe / self.run_id

    def argv(self) -> list[str]:
        return [f"recipe={self.recipe}", f"seed={self.seed}", f"run_id={self.run_id}",
                *self.overrides]

    @property
    def is_float(self) -> bool:
        return self.recipe.endswith("_fp32")


def jobs_of(spec: dict, extra: tuple[str, ...]) -> list[Job]:
    """The jobs of a sweep file: ``rows: [{recipe, seeds: [..], overrides: [..]}]``."""
    out = []
    for row in spec.get("rows", []):
        seeds = row.get("seeds") or [42]
        for s in seeds:
            out.append(Job(row["recipe"], int(s), (*row.get("overrides", ()), *extra)))
    return out


# where scripts/report.py archives every run's results.json (the repository's record)
ARCHIVE = ROOT / "results" / "runs"


def state_of(job: Job, output: Path, numerics: str | None, cache: dict | None = None,
             parts: dict | None = None, archive: Path | None = None) -> str:
    """``done`` (results of the current code and config), ``archived`` (done, but only in
    ``archive``: no checkpoint here), ``partial`` (resumable), ``stale`` or ``new``
    (:func:`state_and_reason`)."""
    return state_and_reason(job, output, numerics, cache, parts, archive)[0]


def state_and_reason(job: Job, output: Path, numerics: str | None, cache: dict | None = None,
                     parts: dict | None = None,
                     archive: Path | None = None) -> tuple[str, str | None]:
    """The job's state and, for a finished run that is stale, why
    (:func:`qat.provenance.stale_reason`; ``parts``: :func:`qat.provenance.numerics_parts` of
    now). A partial run resumes under the same ``numerics`` (the whole code's fingerprint), or
    when each part of the code it runs changed since only by :data:`qat.provenance.NEUTRAL` changes.
    A run missing from ``output`` whose archived ``results.json`` (``archive``, e.g. results/runs
    on a new machine) is current is ``archived``: nothing to rerun, unless a quantized job needs
    its float checkpoint."""
    run = job.run_dir(output)
    if (run / "results.json").is_file():
        why = stale_reason(run, parts, job.argv(), cache)
        return ("stale" if why else "done"), why
    if (run / "checkpoints" / "last.ckpt").is_file():
        made, made_parts = read_stamp(run)
        if made == legacy_fingerprint():  # stamped before numerics_version 2, by this code
            made = numerics_fingerprint()
        saved = saved_config(run)
        if config_reason(run, job.argv(), cache, saved):
            return "stale", None
        if made == str(numerics):
            return "partial", None
        if made_parts and saved is not None and not changed_parts(  # code changed since, by
                made_parts, numerics_parts() if parts is None else parts, saved):  # neutral changes
            return "partial", None
        return "stale", None
    kept = archive / job.recipe / job.run_id if archive is not None else None
    if (kept is not None and (kept / "results.json").is_file()
            and stale_reason(kept, parts, job.argv(), cache) is None):
        return "archived", None
    return "new", None


def write_stamp(run: Path, numerics: str | None, parts: dict[str, str | None]) -> None:
    """Record in ``run``/numerics.txt the code a run starts with: the whole fingerprint, then
    one ``<part> <fingerprint>`` line per part (:func:`qat.provenance.numerics_parts`)."""
    lines = [str(numerics), *(f"{k} {v}" for k, v in parts.items())]
    (run / "numerics.txt").write_text("\n".join(lines) + "\n")


def read_stamp(run: Path) -> tuple[str | None, dict[str, str | None]]:
    """What :func:`write_stamp` recorded (a stamp of one line, from before the parts: no parts);
    (None, {}) without a stamp."""
    stamp = run / "numerics.txt"
    if not stamp.is_file():
        return None, {}
    first, *rest = stamp.read_text().splitlines() or [""]
    parts = dict(line.split(" ", 1) for line in rest if " " in line)
    return first.strip() or None, {k: (None if v == "None" else v) for k, v in parts.items()}


def _run(job: Job, output: Path, numerics: str | None, python: str, log_dir: Path) -> int:
    run = job.run_dir(output)
    state = state_of(job, output, numerics)  # (archived: runs, for its checkpoint)
    if state == "done":  # finished meanwhile (another sweep over the same outputs)
        print(f"[sweep] skip {job.recipe} seed={job.seed}: done meanwhile", flush=True)
        return 0
    if state == "stale":
        shutil.rmtree(run)
    argv = job.argv() + (["ckpt_path=last"] if state == "partial" else [])
    run.mkdir(parents=True, exist_ok=True)
    write_stamp(run, numerics, numerics_parts())
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{job.recipe}__{job.run_id}.log"
    env = {**os.environ, "QAT_OUTPUT_DIR": str(output),
           "QAT_CONCURRENT_JOBS": os.environ.get("QAT_CONCURRENT_JOBS", "1")}
    cmd = [python, "-c", "from qat.cli import train; train()", *argv]  # logs: progress lines
    t0 = time.time()
    print(f"[sweep] start {job.recipe} seed={job.seed} ({state}): qat-train {' '.join(argv)}",
          flush=True)
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"[sweep] {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} {job.recipe} "
          f"seed={job.seed} in {time.time() - t0:.0f}s", flush=True)
    return rc


def float_job_of(job: Job, jobs: list[Job]) -> Job | None:
    """The float job a quantized job starts from (same seed and overrides), if in ``jobs``."""
    if job.is_float:
        return None
    base = job.recipe.split("_")[:2]
    for j in jobs:
        if j.is_float and j.seed == job.seed and j.recipe.split("_")[:2] == base:
            return j
    return None


def with_needed_floats(jobs: list[Job], states: dict[Job, str]) -> dict[Job, str]:
    """``states`` with each archived float job that a quantized job to run starts from set to
    ``new``: its checkpoint is needed, and retraining it gives the archived numbers again (the
    same code, config and seed)."""
    out = dict(states)
    for j in jobs:
        dep = float_job_of(j, jobs)
        if dep is not None and states[j] not in ("done", "archived") \
                and states[dep] == "archived":
            out[dep] = "new"
    return out


def schedule(todo: list[Job], output: Path, numerics: str | None, args: argparse.Namespace,
             t0: float) -> int:
    """Run ``todo`` on ``args.workers`` workers in file order; a quantized job waits for its
    float job. No job starts after ``args.stop_after`` seconds. Returns the number failed."""
    import threading

    lock = threading.Condition()
    pending, done, failed_jobs, running = list(todo), set(), set(), set()

    def ready(j: Job) -> bool:
        dep = float_job_of(j, todo)
        return dep is None or dep in done

    def worker() -> None:
        while True:
            with lock:
                while True:
                    if args.stop_after and time.time() - t0 > args.stop_after:
                        return
                    for j in list(pending):
                        dep = float_job_of(j, todo)
                        if dep in failed_jobs:  # its float run failed: it cannot start
                            pending.remove(j)
                            failed_jobs.add(j)
                    job = next((j for j in pending if ready(j)), None)
                    if job is not None:
                        pending.remove(job)
                        running.add(job)
                        break
                    if not pending or not running:
                        return
                    lock.wait(timeout=5)
            rc = _run(job, output, numerics, args.python, output / "sweep_logs")
            with lock:
                running.discard(job)
                (done if rc == 0 else failed_jobs).add(job)
                lock.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(max(args.workers, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if pending:
        print(f"[sweep] {len(pending)} jobs not started (--stop-after)")
    return len(failed_jobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=str(ROOT / "scripts" / "sweep.yaml"))
    p.add_argument("--only", action="append", default=[],
                   help="recipe name patterns (fnmatch); repeatable")
    p.add_argument("--output", default=os.environ.get("QAT_OUTPUT_DIR", str(ROOT / "outputs")))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their state")
    p.add_argument("--stop-after", type=float, default=0,
                   help="start no job after this many seconds (0: no limit)")
    p.add_argument("--archive", default=str(ARCHIVE),
                   help="archived results.json files that count as done (report.py's "
                        "results/runs); 'none' to rerun what is not in --output")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("extra", nargs="*", help="overrides added to every job (after --)")
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.rows).read_text())
    jobs = jobs_of(spec, tuple(args.extra))
    if args.only:
        jobs = [j for j in jobs if any(fnmatch.fnmatchcase(j.recipe, pat) for pat in args.only)]
    output = Path(args.output).resolve()
    # recorded by each job; set it higher when other work shares the machine with the sweep
    shared = int(os.environ.get("QAT_CONCURRENT_JOBS", "1"))
    os.environ["QAT_CONCURRENT_JOBS"] = str(max(args.workers, shared, 1))
    numerics = numerics_fingerprint()
    cache: dict = {}
    parts = numerics_parts()
    archive = None if args.archive == "none" else Path(args.archive).resolve()
    states, whys = {}, {}
    for j in jobs:
        states[j], whys[j] = state_and_reason(j, output, numerics, cache, parts, archive)
    states = with_needed_floats(jobs, states)
    for j in jobs:
        print(f"{states[j]:>8}  {j.recipe:<40} seed={j.seed}  {j.run_dir(output)}")
        if whys[j]:
            print(f"          {whys[j]}")
    todo = [j for j in jobs if states[j] not in ("done", "archived")]
    print(f"{len(todo)} of {len(jobs)} jobs to run (numerics {numerics})", flush=True)
    if args.dry_run or not todo:
        return 0
    failed = schedule(todo, output, numerics, args, time.time())
    print(f"[sweep] {len(todo) - failed} ran, {failed} failed; next: python scripts/report.py")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
