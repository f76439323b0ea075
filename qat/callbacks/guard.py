"""Callbacks that keep a run from training on garbage or losing work.

* :class:`NonFiniteGuard`: stops the run with :class:`NonFiniteError` (naming the step and the
  value) as soon as the training loss is NaN or infinite, before it is back-propagated.
* :class:`SigtermCheckpoint`: on SIGTERM (a scheduler's pre-emption, ``kill``), saves
  ``last.ckpt`` at the next batch boundary and stops, so ``ckpt_path=last`` resumes there.
* :class:`MidEpochResume`: a run resumed from a checkpoint written in the middle of an epoch
  continues with the batches that epoch had left (in the order the uninterrupted run used),
  instead of starting the epoch's data over.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

__all__ = ["NonFiniteGuard", "NonFiniteError", "SigtermCheckpoint", "MidEpochResume"]

log = logging.getLogger("qat")


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class NonFiniteGuard(L.Callback):
    """Raise :class:`NonFiniteError` when the loss is not finite (``stop_on_nonfinite``), else
    warn once. Under DDP the ranks agree (one all-reduce of a flag), so all stop together."""

    def __init__(self, stop_on_nonfinite: bool = True) -> None:
        super().__init__()
        if not isinstance(stop_on_nonfinite, bool):
            raise ValueError(f"stop_on_nonfinite={stop_on_nonfinite!r} is invalid: allowed true "
                             "or false")
        self.stop_on_nonfinite = stop_on_nonfinite
        self._warned = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        if _world() > 1:
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag)  # SUM: > 0 if any rank saw a bad loss
            bad = flag[0] > 0
        if not bool(bad):
            return
        value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else math.nan
        msg = (f"training loss is {value} at step {trainer.global_step} (epoch "
               f"{trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx + 1}"
               f"{'' if math.isfinite(value) or _world() == 1 else ', on some rank'}): "
               "lower optimizer.lr, check the data or the quantizer ranges; "
               "callbacks.guard.stop_on_nonfinite=false trains on")
        if self.stop_on_nonfinite:
            raise NonFiniteError(msg)
        if not self._warned:
            log.warning("%s", msg)
            self._warned = True


def _last_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives: the dirpath of a ModelCheckpoint named ``last``, else
    ``<default_root_dir>/checkpoints``."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.filename == "last" and cb.dirpath:
            return Path(cb.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class SigtermCheckpoint(Checkpoint):
    """On SIGTERM: save ``last.ckpt`` at the next training batch boundary and stop the run.

    A handler installed while training sets a flag and calls the previous one (Lightning's,
    which raises ``SIGTERMException`` after that batch); the checkpoint is the one
    ``every_n_train_steps`` would write there, so resuming is exact. A SIGTERM during
    validation saves on the way out.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.filename = filename
        self.received = False
        self.saved: Path | None = None
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        prev = self._previous
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(signum, frame)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning installed its handlers (chained, and restored when the fit ends)
        self.received, self.saved = False, None
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handler)
            self._installed = True

    def _restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            prev = self._previous
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
            self._installed, self._previous = False, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _save(self, trainer: L.Trainer) -> None:
        path = _last_path(trainer).with_name(self.filename)
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning("SIGTERM: saved %s at step %d; resume with ckpt_path=last", path,
                    trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if (self.received or trainer.received_sigterm) and self.saved is None:
            self._save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.saved is None and trainer.training:
            self._save(trainer)
        self._restore()  # no teardown hook on this path


class MidEpochResume(L.Callback):
    """Checkpoints record how far into its epoch the run was; a run resumed from such a
    checkpoint skips the batches already trained (the training batch sampler must offer
    ``skip_batches(n)``, as :class:`qat.data.BucketBatchSampler` does)."""

    def __init__(self) -> None:
        super().__init__()
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, int]:
        t = self._trainer
        if t is None or not t.training:
            return {}
        total = t.num_training_batches
        return {"epoch": int(t.current_epoch),
                "batches": int(t.fit_loop.epoch_loop.batch_progress.current.ready),
                "total": int(total) if math.isfinite(total) else -1}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._pending = dict(state_dict) or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state or not 0 < state["batches"] < state["total"]:
            return  # a fresh run, or a checkpoint taken at an epoch boundary
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if not hasattr(sampler, "skip_batches") or fetcher is None:
            log.warning("mid-epoch resume: the training batch sampler cannot skip batches; "
                        "this epoch's data starts over")
            return
        sampler.set_epoch(state["epoch"])
        sampler.skip_batches(state["batches"])
        rng = torch.get_rng_state()  # a loader without its own generator draws a seed here
        iter(fetcher)  # a fresh iterator over the remaining batches (replaces the prefetched one)
        torch.set_rng_state(rng)
