"""QuantLSTM: equivalence with nn.LSTM, quantized references for both paths, training, state."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_ulps_close
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from qat.nn.config import LayerQuantConfig, default_act_spec
from qat.nn.lstm import QuantLSTM
from qat.quant import FakeQuantizer, QuantSpec, disable_observers

D_IN, H, T, B = 5, 8, 6, 3
OFF = LayerQuantConfig(weight=None, input=None, output=None)
SIG = QuantSpec(bits=8, signed=False, symmetric=True)  # [0, 1] grid for sigmoid outputs
SYM = QuantSpec(bits=8)
ACT = default_act_spec()
ALL_SLOTS = LayerQuantConfig(output=ACT, slots=dict(hidden=SYM, gates=ACT, sigmoid=SIG, tanh=SYM,
                                                    cell=ACT))
LENGTHS = [6, 3, 4]


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch_first: bool, hx: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, D_IN) if batch_first else (T, B, D_IN), generator=g)
    state = None
    if hx:
        state = tuple(torch.randn(4, B, H, generator=g) for _ in range(2))
    return x, state


def _run(mod, x, state, mode, batch_first):
    """Run ``mod`` on x given as padded / padded+lengths / packed; returns padded out, h, c."""
    lengths = torch.tensor(LENGTHS)
    if mode == "padded":
        out, (h, c) = mod(x, state)
    elif mode == "lengths":
        if isinstance(mod, QuantLSTM):
            out, (h, c) = mod(x, state, lengths=lengths)
        else:  # the float reference: pack, run, pad again
            p = pack_padded_sequence(x, lengths, batch_first, enforce_sorted=False)
            out, (h, c) = mod(p, state)
            out = pad_packed_sequence(out, batch_first, total_length=T)[0]
    else:
        order = torch.argsort(lengths, descending=True)
        xs = x.index_select(0 if batch_first else 1, order) if mode == "sorted" else x
        st = None if state is None else tuple(s[:, order] for s in state)
        st = st if mode == "sorted" else state
        p = pack_padded_sequence(xs, lengths[order] if mode == "sorted" else lengths, batch_first,
                                 enforce_sorted=mode == "sorted")
        out, (h, c) = mod(p, st)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, p.batch_sizes)
        out = pad_packed_sequence(out, batch_first, total_length=T)[0]
    return out, h, c


def _grads(mod, x, state, mode, batch_first):
    """Outputs and gradients (params, input, initial state) for a fixed random upstream grad."""
    x = x.clone().requires_grad_()
    st = None if state is None else tuple(s.clone().requires_grad_() for s in state)
    out, h, c = _run(mod, x, st, mode, batch_first)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (out, h, c))
    params = [p for n, p in mod.named_parameters() if "quant" not in n]
    grads = torch.autograd.grad(loss, params + [x] + ([] if st is None else list(st)))
    return [out, h, c, *grads]


def _float_lstm(bidirectional=True, batch_first=False, layers=2, seed=0):
    torch.manual_seed(seed)
    return nn.LSTM(D_IN, H, layers, bidirectional=bidirectional, batch_first=batch_first)


# ---- every quantizer off: nn.LSTM exactly (fast) or within a few ulps (full) --------------------
# The full path computes the gates as x @ W_ih^T + (b_ih + b_hh) (one matmul for all steps, both
# directions batched) + h @ W_hh^T, PyTorch's fused kernel as (x @ W_ih^T + b_ih) +
# (h @ W_hh^T + b_hh) per direction: float32 sums in another order, whose rounding the
# recurrence carries over the steps. Measured: at most ~3 ulps of each tensor's largest value.
FULL_ULPS = 8
@pytest.mark.parametrize("path", ["fast", "full"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["padded", "lengths", "sorted", "unsorted"])
def test_all_off_matches_nn_lstm(path, bidirectional, batch_first, mode):
    ref = _float_lstm(bidirectional, batch_first)
    q = QuantLSTM(D_IN, H, 2, bidirectional=bidirectional, batch_first=batch_first, qconfig=OFF,
                  force_full=path == "full")
    assert q.load_state_dict(ref.state_dict()).missing_keys == []
    assert q.path == path
    x, state = _inputs(batch_first, hx=mode != "padded" and bidirectional)
    if state is not None and not bidirectional:
        state = tuple(s[:2] for s in state)
    want = _grads(ref, x, state, mode, batch_first)
    got = _grads(q, x, state, mode, batch_first)
    for a, b in zip(want, got, strict=True):
        if path == "fast":
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        else:
            assert_ulps_close(b, a, ulps=FULL_ULPS)


def test_disabled_cell_slot_runs_full_path_like_nn_lstm():
    ref = _float_lstm()
    cfg = OFF.replace(slots={"cell": ACT})
    q = QuantLSTM.from_float(ref, cfg)
    q.cell_quant.enable_fake_quant(False)
    assert q.path == "full" and q.hidden_quant is None
    x, state = _inputs(False, hx=True)
    for a, b in zip(_grads(ref, x, state, "lengths", False), _grads(q, x, state, "lengths", False),
                    strict=True):
        assert_ulps_close(b, a, ulps=FULL_ULPS)
    assert int(q.cell_quant.observer.count) == 1  # observed once per forward


@pytest.mark.parametrize("full", [False, True])
def test_no_bias_one_layer_matches_nn_lstm(full):
    torch.manual_seed(0)
    ref = nn.LSTM(D_IN, H, bias=False, batch_first=True)
    q = QuantLSTM.from_float(ref, OFF, force_full=full)
    x, _ = _inputs(True, hx=False)
    for a, b in zip(_grads(ref, x, None, "lengths", True), _grads(q, x, None, "lengths", True),
                    strict=True):
        if full:
            assert_ulps_close(b, a, ulps=FULL_ULPS)
        else:
            torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_unbatched_input_both_paths():
    ref = _float_lstm()
    x = torch.randn(T, D_IN)
    want = ref(x)
    for full in (False, True):
        out, (h, c) = QuantLSTM.from_float(ref, OFF, force_full=full)(x)
        assert_ulps_close(out, want[0], ulps=FULL_ULPS if full else 0)
        assert_ulps_close(h, want[1][0], ulps=FULL_ULPS if full else 0)
        assert c.shape == want[1][1].shape == (4, H)


# ---- fast path with quantizers: nn.LSTM on fake-quantized weights and input ----------------------
@pytest.mark.parametrize("mode", ["padded", "lengths", "unsorted"])
def test_fast_path_equals_nn_lstm_on_fake_quantized_tensors(mode):
    ref = _float_lstm()
    cfg = LayerQuantConfig(output=ACT)
    q = QuantLSTM.from_float(ref, cfg)
    assert q.path == "fast"
    x, state = _inputs(False, hx=True)
    got = _grads(q, x, state, mode, False)

    class Ref(nn.Module):  # the same arithmetic from fresh FakeQuantizers
        def __init__(self):
            super().__init__()
            self.ref = ref

        def forward(self, inp, st):
            params = {n: FakeQuantizer(cfg.weight, tuple(p.shape))(p) if "weight" in n else p
                      for n, p in ref.named_parameters()}
            iq, oq = FakeQuantizer(cfg.input), FakeQuantizer(cfg.output)
            packed = isinstance(inp, PackedSequence)
            data = iq(inp.data if packed else inp)
            data = inp._replace(data=data) if packed else data
            out, hc = torch.func.functional_call(ref, params, (data, st))
            return (out._replace(data=oq(out.data)) if packed else oq(out)), hc

    want = _grads(Ref(), x, state, mode, False)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


# ---- full path with quantizers: a hand-written step-by-step cell --------------------------------
def _reference_cell(mod: QuantLSTM, x: torch.Tensor, lengths, state):
    """Time-major x (T, B, D_IN); each sequence runs alone over its own length, gate by gate."""
    qz = lambda name, v: v if getattr(mod, f"{name}_quant") is None else getattr(  # noqa: E731
        mod, f"{name}_quant")(v)
    w = {n: getattr(mod, n) for n in mod._flat_weights_names}
    if mod.weight_quant is not None:
        w.update({n: q(w[n]) for n, q in mod.weight_quant.items()})
    layer_in = qz("input", x)
    d = 2 if mod.bidirectional else 1
    hs, cs = [], []
    for layer in range(mod.num_layers):
        outs = []
        for direction in range(d):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            k = layer * d + direction
            seq_out, h_fin, c_fin = [], [], []
            for b in range(x.shape[1]):
                n = int(lengths[b])
                steps = range(n - 1, -1, -1) if direction else range(n)
                h, c = state[0][k, b], state[1][k, b]
                o_seq = [torch.zeros(H)] * x.shape[0]
                for t in steps:
                    xp = w["weight_ih" + sfx] @ layer_in[t, b] + (w["bias_ih" + sfx]
                                                                   + w["bias_hh" + sfx])
                    gates = qz("gates", xp + w["weight_hh" + sfx] @ h)
                    gi, gf, gg, go = gates.chunk(4)
                    sig = qz("sigmoid", torch.sigmoid(torch.cat([gi, gf, go])))
                    i, f, o = sig.chunk(3)
                    g = qz("tanh", torch.tanh(gg))
                    c = qz("cell", f * c + i * g)
                    h = qz("hidden", o * qz("tanh", torch.tanh(c)))
                    o_seq[t] = h
                seq_out.append(torch.stack(o_seq))
                h_fin.append(h)
                c_fin.append(c)
            outs.append(torch.stack(seq_out, 1))
            hs.append(torch.stack(h_fin))
            cs.append(torch.stack(c_fin))
        layer_in = torch.cat(outs, -1)
    return qz("output", layer_in), torch.stack(hs), torch.stack(cs)


def _calibrated(cfg, engine="auto", layers=2):
    q = QuantLSTM.from_float(_float_lstm(layers=layers), cfg)
    q.engine = engine
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        q(torch.randn(T, B, D_IN, generator=g), lengths=torch.tensor(LENGTHS))
    return disable_observers(q)


@pytest.mark.parametrize("engine", ["auto", "fused_eager", "autograd"])
@pytest.mark.parametrize("mode", ["lengths", "unsorted", "padded"])
def test_full_path_equals_reference_cell(engine, mode):
    q = _calibrated(ALL_SLOTS, engine)
    assert q.path == "full"
    for name in ("hidden", "gates", "sigmoid", "tanh", "cell"):  # one observation per forward
        assert int(getattr(q, f"{name}_quant").observer.count) == 3
    x, state = _inputs(False, hx=True, seed=3)
    got = _grads(q, x, state, mode, False)

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.ref = q

        def forward(self, inp, st):
            packed = isinstance(inp, PackedSequence)
            xp, lens = pad_packed_sequence(inp) if packed else (inp, [T] * B)
            if mode == "lengths":
                lens = LENGTHS
            out, h, c = _reference_cell(q, xp, lens, st)
            if packed:
                out = pack_padded_sequence(out, lens, enforce_sorted=False)
            return out, (h, c)

    want = _grads(Ref(), x, state, mode if mode != "lengths" else "padded", False)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_learned_scale_slot_uses_autograd_engine_and_trains_its_scale():
    lsq = QuantSpec(bits=8, estimator="lsq")
    cfg = OFF.replace(slots={"hidden": lsq, "sigmoid": SIG})
    q = _calibrated(cfg)
    assert bool(q.hidden_quant.initialized[0])
    x, state = _inputs(False, hx=True, seed=4)
    got = _grads(q, x, state, "lengths", False)
    out, h, c = _reference_cell(q, x, LENGTHS, state)
    torch.testing.assert_close(got[0], out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], h, atol=2e-5, rtol=1e-4)
    o2, (h2, _) = q(x, state, lengths=torch.tensor(LENGTHS))
    (o2.sum() + h2.sum()).backward()  # LSQ's gradient scale counts the per-step tensor
    assert torch.isfinite(q.hidden_quant.scale.grad).all()
    assert q.hidden_quant.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_cell_observers_see_real_steps_once_per_forward(observer):
    spec = QuantSpec(bits=8, symmetric=False, observer=observer, percentile=99.0)
    slots = ("hidden", "gates", "sigmoid", "tanh", "cell")
    q = QuantLSTM.from_float(_float_lstm(), OFF.replace(slots={n: spec for n in slots}))
    x, _ = _inputs(False, hx=False)
    x[4:, 1] = 1e3  # padding far outside the data must not reach the observers
    q(x, lengths=torch.tensor(LENGTHS))  # first forward: calibrates only, values stay float
    seen = {n: [] for n in slots}

    def spy(name):
        return lambda v: (seen[name].append(v.detach()), v)[1]

    _reference_cell(_Spy(q, spy), x, LENGTHS, (torch.zeros(4, B, H),) * 2)
    for name, vals in seen.items():
        obs = getattr(q, f"{name}_quant").observer
        want = FakeQuantizer(spec).observer
        want(torch.cat([v.reshape(-1) for v in vals]))
        assert int(obs.count) == 1
        torch.testing.assert_close(obs.min_val, want.min_val, atol=1e-5, rtol=0)
        torch.testing.assert_close(obs.max_val, want.max_val, atol=1e-5, rtol=0)


class _Spy:
    """A QuantLSTM view for the reference cell whose slots record values instead of quantizing."""

    def __init__(self, mod, spy):
        self._mod, self._spy = mod, spy

    def __getattr__(self, name):
        if name.endswith("_quant"):
            slot = name[: -len("_quant")]
            return self._spy(slot) if slot in ("hidden", "gates", "sigmoid", "tanh", "cell") \
                else None
        return getattr(self._mod, name)


# ---- training, state, conversion, errors ---------------------------------------------------------
@pytest.mark.parametrize("cfg", ["w4", "w4_cells"])
def test_4bit_lstm_learns_a_sequence_task(cfg):
    torch.manual_seed(0)
    w4 = QuantSpec(bits=4, granularity="channel", axis=0)
    config = LayerQuantConfig(weight=w4)
    if cfg == "w4_cells":
        config = config.replace(slots={"hidden": SYM, "sigmoid": SIG, "cell": ACT})
    lstm = QuantLSTM(3, 16, batch_first=True, qconfig=config)
    head = nn.Linear(16, 2)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=0.02)
    g = torch.Generator().manual_seed(0)

    def batch():  # label: does channel 0 hold more positives than negatives?
        x = torch.randint(0, 2, (64, 12, 3), generator=g).float() * 2 - 1
        return x, (x[..., 0].sum(1) > 0).long()

    for _ in range(150):
        x, y = batch()
        out, (h, _) = lstm(x)
        loss = nn.functional.cross_entropy(head(h[-1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(head(lstm(x)[1][0][-1]), y)
    assert loss < 0.25, f"loss {loss:.3f} vs chance 0.693"


def test_state_dict_round_trip_and_conversion():
    ref = _float_lstm()
    q = _calibrated(ALL_SLOTS)
    q2 = QuantLSTM(D_IN, H, 2, bidirectional=True, qconfig=ALL_SLOTS)
    q2.load_state_dict(q.state_dict())
    x, state = _inputs(False, hx=True)
    a, b = q(x, state), q2(x, state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    keys = set(q.state_dict())
    assert set(ref.state_dict()) <= keys
    assert "weight_quant.weight_hh_l1_reverse.scale" in keys and "cell_quant.scale" in keys
    res = QuantLSTM(D_IN, H, 2, bidirectional=True, qconfig=ALL_SLOTS).load_state_dict(
        ref.state_dict(), strict=False)
    assert res.unexpected_keys == [] and all("quant" in k for k in res.missing_keys)
    wrapped = QuantLSTM.from_float(ref, ALL_SLOTS)
    assert wrapped.weight_hh_l0 is ref.weight_hh_l0 and isinstance(wrapped, nn.LSTM)
    back = wrapped.to_float()
    assert type(back) is nn.LSTM and back.weight_ih_l1_reverse is ref.weight_ih_l1_reverse
    assert torch.equal(back(x)[0], ref(x)[0])


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    q = QuantLSTM(D_IN, H, 2, dropout=0.5, qconfig=OFF, force_full=True)
    x = torch.randn(T, B, D_IN)
    assert not torch.equal(q(x)[0], q(x)[0])
    q.eval()
    ref = q.to_float().eval()
    assert_ulps_close(q(x)[0], ref(x)[0], ulps=FULL_ULPS)


def test_bad_arguments_raise():
    with pytest.raises(NotImplementedError, match="proj_size"):
        QuantLSTM(D_IN, H, proj_size=4)
    with pytest.raises(ValueError, match="no quantizer slot 'forget'"):
        QuantLSTM(D_IN, H, qconfig=OFF.replace(slots={"forget": SYM}))
    with pytest.raises(ValueError, match="granularity"):
        QuantLSTM(D_IN, H, qconfig=OFF.replace(slots={"hidden": QuantSpec(granularity="channel")}))
    q = QuantLSTM(D_IN, H, qconfig=OFF)
    with pytest.raises(ValueError, match="float nn.LSTM"):
        QuantLSTM.from_float(q)
    with pytest.raises(ValueError, match="lengths must lie in 1..6"):
        q(torch.randn(T, B, D_IN), lengths=[7, 1, 1])
    with pytest.raises(ValueError, match="lengths must have shape"):
        q(torch.randn(T, B, D_IN), lengths=[1, 1])
    q.engine = "jit"
    q.force_full = True
    with pytest.raises(ValueError, match="engine"):
        q(torch.randn(T, B, D_IN))
