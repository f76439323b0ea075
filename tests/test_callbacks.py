"""QuantizationCallback inside a plain Lightning project that knows nothing of qat; PTQ."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.callbacks import QuantizationCallback
from qat.lit import calibrate
from qat.quant import quantizers


class PlainModule(L.LightningModule):
    """A user's LightningModule: its model lives in ``self.net``; nothing qat-specific."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.flags: list[tuple[int, bool, bool]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        q = self.net[0].weight_quant
        self.flags.append((self.global_step, q.is_fake_quant, q.is_observing))
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(cb, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[cb], val_check_interval=4,
                     num_sanity_val_steps=0)


def test_schedule_in_steps_and_observers_paused_for_validation():
    module = PlainModule()
    cb = QuantizationCallback(
        weight={"bits": 4, "estimator": "lsq"}, activation={"bits": 8, "signed": False,
                                                             "symmetric": False},
        unit="step", start=3, freeze_observers=6, model_attr="net", log_every_n_steps=0)
    counts = []

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            counts.append(int(pl_module.net[0].input_quant.observer.count))

        def on_validation_end(self, trainer, pl_module):
            counts.append(int(pl_module.net[0].input_quant.observer.count))

    trainer = _trainer(cb, 10)
    trainer.callbacks.append(Spy())
    trainer.fit(module, _loader(), _loader(32, 1))
    flags = {step: (fq, obs) for step, fq, obs in module.flags}
    assert not flags[0][0] and not flags[2][0] and flags[3][0] and flags[9][0]
    assert flags[5][1] and not flags[6][1]
    assert counts and all(a == b for a, b in zip(counts[::2], counts[1::2], strict=True))
    # the learned scale was created in setup, so the optimizer trained it
    scale = module.net[0].weight_quant.scale
    assert isinstance(scale, nn.Parameter) and scale.grad is not None
    names = [n for n, _ in quantizers(module.net)]
    assert "0.weight_quant" in names and "2.input_quant" in names


def test_callback_prepares_a_module_without_model_attribute():
    class Bare(PlainModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    module = Bare()
    cb = QuantizationCallback(weight={"bits": 8}, activation=None, model_attr="missing",
                              log_every_n_steps=0)
    _trainer(cb, 4).fit(module, _loader(), _loader(16, 1))
    assert any(True for _ in quantizers(module))


def test_ptq_calibration_counts_and_freezes():
    from qat import prepare

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model, _ = prepare(net, {"weight": {"bits": 8}, "activation": {"bits": 8}})

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    wrapped = Wrap(model)
    batches = [{"x": torch.randn(4, 8), "labels": torch.zeros(4)} for _ in range(10)]
    seen = calibrate(wrapped, batches, num_batches=6)
    assert seen == 6
    q = model[0].input_quant
    assert int(q.observer.count) == 6 and q.is_fake_quant and not q.is_observing
    before = q.scale.clone()
    wrapped(torch.randn(4, 8) * 100)
    assert torch.equal(before, q.scale)


class SleepyModule(PlainModule):
    """Each training step takes at least 20 ms."""

    def training_step(self, batch, batch_idx):
        import time

        time.sleep(0.1)
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_step_timer_counts_steps_after_warmup_and_measures_them():
    from qat.callbacks import StepTimer

    timer = StepTimer(warmup=2)
    assert timer.median_s is None
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        limit_val_batches=0)
    trainer.fit(SleepyModule(), _loader())
    assert len(timer.times) == 4
    assert 0.02 <= timer.median_s < 1.0


def test_step_timer_rejects_negative_warmup():
    import pytest

    from qat.callbacks import StepTimer

    with pytest.raises(ValueError, match="warmup"):
        StepTimer(warmup=-1)
    with pytest.raises(ValueError, match="clock"):
        StepTimer(clock="gpu")


def test_step_timer_cpu_clock_counts_work_not_waiting():
    """clock='cpu' (process CPU time) leaves out the 100 ms each step sleeps; wall counts it
    (Lightning's own per-step work, ~10 ms of CPU here, is in both)."""
    from qat.callbacks import StepTimer

    wall, cpu = StepTimer(warmup=1), StepTimer(warmup=1, clock="cpu")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[wall, cpu], limit_val_batches=0)
    trainer.fit(SleepyModule(), _loader())
    assert len(wall.times) == len(cpu.times) == 3
    assert wall.median_s >= 0.1
    assert cpu.median_s < wall.median_s - 0.07


def test_step_timer_waits_for_a_cuda_module_and_not_for_a_cpu_one(monkeypatch):
    """A CUDA step is timed to its last kernel: each reading synchronizes that module's device
    (mocked here: no GPU needed); a CPU module is never synchronized."""
    from types import SimpleNamespace

    from qat.callbacks import StepTimer

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timer = StepTimer(warmup=0)
    cpu_module = SimpleNamespace(device=torch.device("cpu"))
    timer.on_train_batch_start(None, cpu_module, None, 0)
    timer.on_train_batch_end(None, cpu_module, None, None, 0)
    assert calls == [] and len(timer.times) == 1
    cuda_module = SimpleNamespace(device=torch.device("cuda", 0))
    timer.on_train_batch_start(None, cuda_module, None, 0)
    timer.on_train_batch_end(None, cuda_module, None, None, 0)
    assert calls == [torch.device("cuda", 0)] * 2 and len(timer.times) == 2


class LSTMModule(L.LightningModule):
    """A BiLSTM classifier; the callback quantizes its cell (full path)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.ModuleDict({"lstm": nn.LSTM(8, 6, batch_first=True, bidirectional=True),
                                  "fc": nn.Linear(12, 3)})

    def forward(self, x):
        return self.net["fc"](self.net["lstm"](x.view(x.shape[0], 2, 4).repeat(1, 1, 2))[0][:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_clip_tracking_only_on_logging_steps(monkeypatch):
    """Bug: after the first logging step track_clipping stayed on for good (the context manager
    restored True), so every forward recorded clip fractions, every step logged them and the
    LSTM full path left its fused backward for the autograd engine."""
    import qat.nn.lstm as qlstm

    engines: list[tuple[int, str]] = []
    fused = qlstm.fused_sequence
    step = {"now": -1}

    def spy(*args, **kwargs):
        engines.append((step["now"], "fused"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(qlstm, "fused_sequence", spy)

    class Step(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step["now"] = trainer.global_step

    module = LSTMModule()
    cb = QuantizationCallback(overrides={"lstm": {"slots": {"gates": {}, "hidden": {}}}},
                              unit="step", model_attr="net", log_every_n_steps=3)
    logged: list[tuple[int, int]] = []

    class Flags(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            on = sum(q.track_clipping for _, q in quantizers(pl_module.net))
            logged.append((trainer.global_step, on))

    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Step(), cb, Flags()], num_sanity_val_steps=0)
    trainer.fit(module, _loader())
    assert module.net["lstm"].path == "full"
    assert logged and all(on == 0 for _, on in logged)  # off after every step, logging or not
    assert not any(q.track_clipping for _, q in quantizers(module.net))
    fused_steps = {s for s, _ in engines}
    # steps 3 and 6 record clipped fractions (autograd engine); every other step runs fused
    # (step 0 too: the cell slots have no statistics yet, so they only observe)
    assert fused_steps == {0, 1, 2, 4, 5, 7}, sorted(fused_steps)


def test_learnable_quantizers_do_not_start_from_the_sanity_check_batch():
    """Bug: the first fake-quantized forward fed the observer whatever its flag said, so
    Lightning's sanity-check validation batch (observers paused) set LSQ / PACT scales."""
    scales = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):  # after the sanity check
            for name, q in quantizers(pl_module.net):
                scales[f"start/{name}"] = (int(q.initialized[0]), int(q.observer.count))

    g = torch.Generator().manual_seed(3)
    xv = torch.randn(16, 8, generator=g) * 100.0  # validation inputs 100x the training ones
    val = DataLoader(TensorDataset(xv, torch.zeros(16, dtype=torch.long)), batch_size=8)
    for est in ("lsq", "lsq_plus", "pact"):
        module = PlainModule()
        act = {"bits": 8, "estimator": est, "symmetric": False, "signed": False}
        cb = QuantizationCallback(weight={"bits": 8, "estimator": "lsq"}, activation=act,
                                  model_attr="net", log_every_n_steps=0)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cb, Probe()],
                            num_sanity_val_steps=1, limit_val_batches=1)
        trainer.fit(module, _loader(), val)
        assert all(v == (0, 0) for k, v in scales.items() if k.startswith("start/")), scales
        q = module.net[0].input_quant
        scale, _ = q.qparams()
        # initialised from the first training batch (|x| < 5), not the validation one (~300)
        assert int(q.initialized[0]) == 1 and float(scale) * 255 < 10.0, (est, float(scale))


def test_callbacks_package_exports_pruning_and_distillation_and_old_paths_work():
    import qat.callbacks as cbs
    from qat.distill import DistillationCallback, KDConfig
    from qat.lit.kd import KDConfig as OldKD
    from qat.lit.ptq import calibrate as old_calibrate
    from qat.prune import PruningCallback
    from qat.quant import calibrate as new_calibrate

    assert cbs.PruningCallback is PruningCallback
    assert cbs.DistillationCallback is DistillationCallback
    assert {"PruningCallback", "DistillationCallback"} <= set(cbs.__all__)
    assert OldKD is KDConfig and old_calibrate is new_calibrate is calibrate
