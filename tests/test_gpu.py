"""CUDA: fake quant bit-exact against PyTorch's fused CUDA kernels and against the CPU, and a
QAT training step on the GPU. Marked ``gpu``; skipped on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.quant import FakeQuantizer, QuantSpec
from qat.quant import functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = [
    QuantSpec(bits=8, granularity="tensor"),
    QuantSpec(bits=8, symmetric=False, signed=False, granularity="tensor"),
    QuantSpec(bits=8, granularity="channel", axis=0),
    QuantSpec(bits=4, symmetric=False, signed=False, granularity="channel", axis=0),
    QuantSpec(bits=4, granularity="group", group_size=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-"
                         f"{'sym' if s.symmetric else 'asym'}")
def test_fake_quant_equals_fused_cuda_kernels(spec):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 96, device="cuda", generator=g) * 3
    q = FakeQuantizer(spec, tuple(x.shape)).cuda()
    q.observe(x * 0.5)  # a range that x exceeds: values clip
    q.enable_observer(False)
    scale, zp = q.qparams()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ours = q(xa)
    ref = F.fake_quantize_affine_fused(xb, scale, zp, spec)
    assert torch.equal(ours, ref)
    dy = torch.randn_like(x)
    ours.backward(dy)
    ref.backward(dy)
    assert torch.equal(xa.grad, xb.grad)  # clipped STE: the same mask


@pytest.mark.parametrize("spec", SPECS[:4], ids=str)
def test_cuda_equals_cpu(spec):
    x = torch.randn(64, 96) * 3
    cpu = FakeQuantizer(spec, tuple(x.shape))
    gpu = FakeQuantizer(spec, tuple(x.shape)).cuda()
    for _ in range(3):  # observers accumulate the same way
        a, b = cpu(x), gpu(x.cuda())
        assert torch.equal(a, b.cpu())
    for name, t in cpu.state_dict().items():
        torch.testing.assert_close(t, gpu.state_dict()[name].cpu(), rtol=0, atol=0,
                                   equal_nan=True, msg=name)


def test_qat_training_step_on_cuda():
    import qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.TransformerEncoderLayer(16, 2, 32,
                                                                           batch_first=True),
                          nn.Flatten(), nn.Linear(16 * 8, 3))
    qmodel, report = qat.prepare(model, {"weight": {"bits": 4, "estimator": "lsq"}})
    qmodel = qmodel.cuda().train()
    opt = torch.optim.AdamW(qmodel.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 8), device="cuda")
    y = torch.randint(0, 3, (4,), device="cuda")
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(qmodel(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and all(l == l for l in losses)  # noqa: E741
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert qmodel(ids).isfinite().all()
