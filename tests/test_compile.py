"""torch.compile of fake-quantized models: the traced quantizer path computes what eager mode
computes (bit for bit, checked with Dynamo's eager backend, which runs the captured graph with
the same kernels), untraceable quantizers fall back to eager, and CompileModel inside a
Lightning fit. Inductor itself (fused kernels, its own reduction order) is exercised by the
slow tests only."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qat
from qat.callbacks import CompileModel, QuantizationCallback
from qat.quant import FakeQuantizer, QuantSpec, quantizers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Embedding -> two convolutions reading one tensor (a tied input quantizer) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.convs = nn.ModuleList(nn.Conv1d(8, 6, k) for k in (2, 3))
        self.fc = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)  # (B, T, E) -> (B, E, T): strided
        return self.fc(torch.cat([c(x).amax(-1) for c in self.convs], -1))


CONFIGS = {
    "w8a8-asym-ema": {"activation": {"bits": 8, "symmetric": False, "signed": False,
                                     "observer": "ema", "momentum": 0.3}},
    "w4a4-sym-minmax": {"weight": {"bits": 4, "granularity": "tensor"},
                        "activation": {"bits": 4, "symmetric": True, "observer": "minmax",
                                       "estimator": "ste"}},
}


def _run(model: nn.Module, steps: list[torch.Tensor]) -> list[tuple]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for i, ids in enumerate(steps):
        if i == 4:  # frozen observers from here on: the flags change between compiled calls
            qat.quant.disable_observers(model)
        for _, q in quantizers(model):
            q.sync_flags()
        opt.zero_grad()
        y = model(ids)
        y.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        out.append((y.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_traced_quantizers_equal_eager_bit_for_bit(name):
    torch.manual_seed(0)
    model, _ = qat.prepare(Net(), CONFIGS[name])
    ids = [torch.randint(0, 50, (4, t)) for t in (9, 7, 9, 8, 9, 7)]
    model(ids[0])  # the first forward ties the convolutions' input quantizer
    assert qat.nn.sharing.shared_inputs(model)
    eager = copy.deepcopy(model)
    compiled = copy.deepcopy(model)
    compiled.compile(backend="eager", fullgraph=True, dynamic=False)  # no graph break at all
    for (ye, ge, se), (yc, gc, sc) in zip(_run(eager, ids), _run(compiled, ids), strict=True):
        torch.testing.assert_close(yc, ye, atol=0, rtol=0)
        for a, b in zip(gc, ge, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert se.keys() == sc.keys()
        for k in se:
            torch.testing.assert_close(sc[k], se[k], atol=0, rtol=0, equal_nan=True, msg=k)


def test_traced_observer_skips_non_finite_like_eager():
    """NaN / inf values never enter the statistics; an all-NaN batch changes nothing."""
    spec = QuantSpec(bits=8, symmetric=False, observer="ema", momentum=0.5,
                     granularity="channel", axis=0)
    batches = [torch.randn(3, 5), torch.randn(3, 5), torch.full((3, 5), float("nan")),
               torch.randn(3, 5) * 4]
    batches[1][0, 2], batches[1][2, :] = float("inf"), float("nan")
    eager, traced = FakeQuantizer(spec, (3, 5)), FakeQuantizer(spec, (3, 5))
    fn = torch.compile(traced, backend="eager", fullgraph=True, dynamic=False)
    for x in batches:
        torch.testing.assert_close(fn(x), eager(x), atol=0, rtol=0, equal_nan=True)
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(traced.state_dict()[k], v, atol=0, rtol=0,
                                       equal_nan=True, msg=k)
    assert int(traced.observer.count) == 3  # the all-NaN batch did not count


def test_untraceable_quantizers_run_eagerly_and_agree():
    """LSQ and percentile observers have no traced path: a graph break, the eager result."""
    torch.manual_seed(0)
    cfg = {"weight": {"bits": 4, "estimator": "lsq"},
           "activation": {"bits": 8, "observer": "percentile", "percentile": 99.0}}
    model, _ = qat.prepare(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), cfg)
    x = [torch.randn(8, 6) for _ in range(3)]
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    assert not all(q.traceable for _, q in quantizers(model))
    compiled.compile(backend="eager", dynamic=False)
    for xi in x:
        torch.testing.assert_close(compiled(xi), eager(xi), atol=0, rtol=0)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (32, 9), generator=g)
    return DataLoader(TensorDataset(ids, torch.randint(0, 3, (32,), generator=g)), batch_size=8)


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self.model(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(ids), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(*extra: L.Callback) -> Lit:
    lit = Lit()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=2,
                        callbacks=[QuantizationCallback(unit="step", freeze_observers=5), *extra])
    trainer.fit(lit, _loader(), _loader())
    return lit


def test_compile_model_callback_trains_like_eager():
    """CompileModel compiles after the first (eager) step; with Dynamo's eager backend the
    run equals the uncompiled run bit for bit, observer freeze and validation included."""
    cb = CompileModel(backend="eager")
    compiled, eager = _fit(cb), _fit()
    assert cb.compiled and cb.compile_s is not None and cb.compile_s >= 0
    assert cb.graph_breaks == 0
    for (k, a), (_, b) in zip(compiled.state_dict().items(), eager.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=k)
    assert not any(q.is_observing for _, q in quantizers(compiled.model))


def test_compile_model_rejects_bad_after_steps():
    with pytest.raises(ValueError, match="after_steps"):
        CompileModel(after_steps=-1)


@pytest.mark.slow
def test_inductor_compiled_qat_model_trains_close_to_eager():
    """Inductor (C++ kernels on CPU): compile time reported, results close to eager (fused
    reductions round differently: not bit for bit)."""
    cb = CompileModel()
    compiled, eager = _fit(cb), _fit()
    assert cb.compiled and cb.compile_s > 0
    for (k, a), (_, b) in zip(compiled.state_dict().items(), eager.state_dict().items(),
                              strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2, equal_nan=True, msg=k)


def test_qat_train_takes_compile_model_from_the_command_line(data_dir, tmp_path, monkeypatch):
    """``qat-train ... +callbacks.compile._target_=qat.callbacks.CompileModel``: a run whose
    quantized stage is compiled (Dynamo's eager backend here: fast) and tested."""
    from helpers import TINY, compose_cfg
    from hydra.core.global_hydra import GlobalHydra

    from qat.train import run

    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen: list[CompileModel] = []
    monkeypatch.setattr(CompileModel, "on_fit_end", lambda self, t, m: seen.append(self))
    try:
        cfg = compose_cfg(["recipe=20ng_transformer_w8a8", "init_from=null", "trainer.max_epochs=1",
                           "+callbacks.compile._target_=qat.callbacks.CompileModel",
                           "+callbacks.compile.backend=eager", *TINY], tmp_path)
        res = run(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert seen and seen[-1].compiled
    assert any(k.startswith("test") for k in res["stages"]["qat"])
