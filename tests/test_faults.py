"""Faults: a run killed mid-epoch (SIGKILL) resumes to the same weights; SIGTERM saves a
checkpoint first; a non-finite loss stops the run with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qat.callbacks import (
    MidEpochResume,
    NonFiniteError,
    NonFiniteGuard,
    RNGStateCallback,
    SigtermCheckpoint,
)
from qat.data.batching import BucketBatchSampler

ROOT = Path(__file__).resolve().parents[1]


class Stall(L.Callback):
    """Test helper (used through Hydra by the subprocess runs): at ``global_step == at_step``
    write ``marker`` and sleep ``seconds`` before the batch, so a signal lands mid-epoch."""

    def __init__(self, at_step: int, seconds: float, marker: str) -> None:
        self.at_step, self.seconds, self.marker, self.done = at_step, seconds, marker, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and not self.done:
            self.done = True
            Path(self.marker).write_text(str(trainer.global_step))
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                time.sleep(0.05)


# ---- toy Lightning setup: fast, in-process checks of the callbacks --------------------------
class _Seq(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class _Toy(L.LightningModule):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
        self.nan_at, self.seen = nan_at, []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append(idx.tolist())
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        ds = _Seq(40)
        bs = BucketBatchSampler.from_lengths([1 + i % 5 for i in range(40)], 4, seed=3,
                                             bucket_batches=2)
        # a private generator, as qat's data modules use: making an iterator must not draw
        # from the global RNG (dropout), or no resumed run could match
        return DataLoader(ds, batch_sampler=bs, generator=torch.Generator().manual_seed(0))


class _Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("crash")  # like a kill: the process state is lost after this


def _toy_trainer(tmp: Path, *extra: L.Callback, every: int = 2, epochs: int = 3) -> L.Trainer:
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, filename="last", monitor=None,
                                               every_n_train_steps=every,
                                               enable_version_counter=False)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", deterministic=True, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[ckpt, MidEpochResume(), RNGStateCallback(), *extra],
                     default_root_dir=tmp)


@pytest.mark.parametrize("crash_at", [13, 20, 23])  # mid-epoch 1, epoch boundary, mid-epoch 2
def test_mid_epoch_resume_is_exact_toy(tmp_path, crash_at):
    L.seed_everything(0)
    straight = _Toy()
    _toy_trainer(tmp_path / "a").fit(straight)
    L.seed_everything(0)
    crashed = _Toy()
    with pytest.raises(RuntimeError, match="crash"):
        _toy_trainer(tmp_path / "b", _Crash(crash_at)).fit(crashed)
    saved = torch.load(tmp_path / "b/last.ckpt", weights_only=True)["global_step"]
    assert saved == crash_at - crash_at % 2
    L.seed_everything(1)  # the checkpoint must restore everything that matters
    resumed = _Toy()
    _toy_trainer(tmp_path / "b").fit(resumed, ckpt_path=tmp_path / "b/last.ckpt")
    # the batches the resumed run trained are exactly those the straight run trained after
    # the checkpoint, in the same order
    assert resumed.seen == straight.seen[saved:]
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "weights differ after resume"


def test_nonfinite_loss_stops_with_step_and_value(tmp_path):
    L.seed_everything(0)
    model = _Toy(nan_at=3)
    trainer = _toy_trainer(tmp_path, NonFiniteGuard())
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 3 .*stop_on_nonfinite"):
        trainer.fit(model)
    assert trainer.global_step == 3  # the NaN step was not applied


def test_nonfinite_loss_can_train_on(tmp_path, caplog):
    L.seed_everything(0)
    trainer = _toy_trainer(tmp_path, NonFiniteGuard(stop_on_nonfinite=False), epochs=1)
    trainer.fit(_Toy(nan_at=3))
    assert trainer.global_step == 10
    with pytest.raises(ValueError, match="stop_on_nonfinite"):
        NonFiniteGuard(stop_on_nonfinite="yes")  # type: ignore[arg-type]


class _SelfTerm(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_in_process(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    L.seed_everything(0)
    guard = SigtermCheckpoint()
    trainer = _toy_trainer(tmp_path, guard, _SelfTerm(), every=0)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        trainer.fit(_Toy())
    assert guard.saved == tmp_path / "last.ckpt"
    ckpt = torch.load(guard.saved, weights_only=True)
    assert ckpt["global_step"] == 6  # saved at the end of the batch that saw the signal
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


# ---- the real CLI, as a subprocess ----------------------------------------------------------
TINY = [
    "recipe=20ng_textcnn_w8a8-prune50", "baseline_epochs=0", "init_from=null",
    "trainer.max_epochs=2",
    "data.limit_train=48", "data.limit_eval=24", "data.batch_size=8", "data.max_length=32",
    "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null", "callbacks.last_checkpoint.every_n_train_steps=2",
    "prune.schedule.end_fraction=0.8", "prune.schedule.frequency=2", "quant.log_every_n_steps=2",
]  # 6 steps per epoch, 12 in all (pruning ends at step 10); sparsity and scales change after the
# resume point


def _cli(args: list[str], env: dict[str, str]) -> list[str]:
    script = Path(sys.executable).parent / "qat-train"
    head = [sys.executable, str(script)] if script.is_file() else [
        sys.executable, "-c", "from qat.cli import train; train()"]
    return head + args


def _env(data_dir: Path, out: Path) -> dict[str, str]:
    env = {**os.environ, "QAT_DATA_DIR": str(data_dir), "QAT_OUTPUT_DIR": str(out),
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_FULL_ERROR", None)
    return env


@pytest.fixture
def cli_env(data_dir, tmp_path):
    return _env(data_dir, tmp_path)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint and test metrics."""
    out = tmp_path_factory.mktemp("straight")
    _run_ok([*TINY, "run_id=straight"], _env(data_dir, out))
    return _final(out / "20ng_textcnn_w8a8-prune50/straight")


def _wait(marker: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended before the stall point:\n{err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the stall point")
        time.sleep(0.05)


def _stall(at: int, seconds: float, marker: Path) -> list[str]:
    return ["+callbacks.stall._target_=tests.test_faults.Stall", f"+callbacks.stall.at_step={at}",
            f"+callbacks.stall.seconds={seconds}", f"+callbacks.stall.marker={marker}"]


def _run_ok(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(_cli(args, env), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _final(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    res = json.loads((out / "results.json").read_text())
    return {"ckpt": ckpt, "metrics": res["stages"]["qat"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["ckpt"]["global_step"] == b["ckpt"]["global_step"] == 12
    sa, sb = a["ckpt"]["state_dict"], b["ckpt"]["state_dict"]
    assert sa.keys() == sb.keys()
    assert any(k.endswith("_mask") for k in sa) and any("weight_quant" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, equal_nan=True, msg=k)
    oa, ob = a["ckpt"]["optimizer_states"][0]["state"], b["ckpt"]["optimizer_states"][0]["state"]
    for i in oa:
        for k in oa[i]:
            torch.testing.assert_close(oa[i][k], ob[i][k], atol=0, rtol=0, msg=f"adam {i} {k}")
    assert a["ckpt"]["callbacks"].keys() == b["ckpt"]["callbacks"].keys()
    assert a["metrics"] == b["metrics"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, cli_env, straight):
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(_cli([*TINY, "run_id=killed", *_stall(8, 300, marker)], cli_env),
                            env=cli_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "20ng_textcnn_w8a8-prune50/killed/checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True)
    assert (state["global_step"], state["epoch"]) == (8, 1)  # mid-way through epoch 1
    _run_ok([*TINY, "run_id=killed", "ckpt_path=last"], cli_env)
    base = tmp_path / "20ng_textcnn_w8a8-prune50"
    _assert_same(straight, _final(base / "killed"))


def test_sigterm_saves_checkpoint_then_resume_matches(tmp_path, cli_env, straight):
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(_cli([*TINY, "run_id=termed", *_stall(7, 3, marker)], cli_env),
                            env=cli_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err and "ckpt_path=last" in err
    base = tmp_path / "20ng_textcnn_w8a8-prune50"
    state = torch.load(base / "termed/checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 8  # the batch that was running when the signal came
    _run_ok([*TINY, "run_id=termed", "ckpt_path=last"], cli_env)
    _assert_same(straight, _final(base / "termed"))
