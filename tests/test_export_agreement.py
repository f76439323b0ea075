"""Every estimator x symmetry QuantSpec accepts: the fake-quant model is the exported model.

A Linear-Tanh-Linear net (Tanh gives activations of both signs) is trained a few QAT steps with
the spec on its weights and activations (learned scales and offsets move), frozen, then exported
three ways. The integer checkpoint must reproduce the fake-quant outputs bit for bit; ONNX QDQ
(onnxruntime) and the int8 PyTorch path compute the same integer grids with other kernels, so
they may differ where a value lies within float rounding of a rounding tie (one code): that is
a code or two of the hidden activation, and rare (2 % of outputs at most).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import qat
from qat.export import export_onnx, load_int_checkpoint, make_session, save_int_checkpoint, to_int8
from qat.quant import freeze

pytestmark = pytest.mark.usefixtures("one_thread")

COMBOS = [(e, sym) for e in ("ste", "clipped_ste", "lsq", "lsq_plus", "pact")
          for sym in (True, False) if not (e == "lsq_plus" and sym)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _config(estimator: str, symmetric: bool, act_signed: bool) -> dict:
    gran = "tensor" if estimator == "pact" else "channel"
    weight = {"bits": 8, "estimator": estimator, "symmetric": symmetric, "signed": True,
              "granularity": gran}
    act = {"bits": 8, "estimator": estimator, "symmetric": symmetric, "signed": act_signed,
           "observer": "minmax"}
    return {"weight": weight, "activation": act}


def _trained(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    pm, _ = qat.prepare(Net(), cfg)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, generator=g)
    for _ in range(25):
        x = torch.randn(64, 8, generator=g) * 1.5
        loss = nn.functional.mse_loss(pm(x), torch.tanh(x @ w))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(pm).eval()


def _check_close(got: torch.Tensor, want: torch.Tensor, step: float, what: str) -> None:
    diff = (got - want).abs()
    off = float((diff > 1e-5).float().mean())
    assert off <= 0.02 and float(diff.max()) <= 2 * step, (
        f"{what}: {off:.1%} of outputs differ, max |diff| {float(diff.max()):.3g}")


@pytest.mark.parametrize("act_signed", [False, True])
@pytest.mark.parametrize(("estimator", "symmetric"), COMBOS)
def test_exports_agree_with_fake_quant(estimator: str, symmetric: bool, act_signed: bool) -> None:
    cfg = _config(estimator, symmetric, act_signed)
    pm = _trained(cfg)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(7)) * 1.5
    with torch.no_grad():
        want = pm(x)
    # one code of the hidden activation moves the output by at most its scale * max|W2| row sum
    s_act = float(pm.fc2.input_quant.qparams()[0])
    step = s_act * float(pm.fc2.weight.abs().max()) + 1e-6

    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    torch.manual_seed(0)
    loaded = load_int_checkpoint(buf, Net(), config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)

    proto = export_onnx(pm, (x[:2],), io.BytesIO())
    sess = make_session(proto, threads=1)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    _check_close(got, want, step, "onnx")

    with torch.no_grad():
        got8 = to_int8(pm)(x)
    _check_close(got8, want, step, "int8")
