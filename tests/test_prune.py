"""Magnitude pruning: schedules, masks (layer, global, rows, heads, LSTM) and the callback."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.prune import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    PruningCallback,
    apply_masks,
    compute_masks,
    format_sparsity,
    make_schedule,
    masked_parameters,
    register_masks,
    remove_masks,
    sparsity_report,
    total_sparsity,
)

# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---- schedules -----------------------------------------------------------------------------
def test_cubic_schedule_matches_formula():
    s_i, s_f, t0, t1, dt = 0.1, 0.8, 10, 110, 7
    sch = CubicSchedule(final_sparsity=s_f, start_step=t0, end_step=t1, initial_sparsity=s_i,
                        frequency=dt)
    for t in range(0, 200):
        if t < t0:
            want = 0.0
        elif t >= t1:
            want = s_f
        else:
            tu = t0 + ((t - t0) // dt) * dt  # the last update step
            want = s_f + (s_i - s_f) * (1 - (tu - t0) / (t1 - t0)) ** 3
        assert sch(t) == pytest.approx(want, abs=1e-12), t
    # the value only changes on update steps
    changes = [t for t in range(1, 200) if sch(t) != sch(t - 1)]
    assert all(t == t1 or (t - t0) % dt == 0 for t in changes)
    assert sch(t0) == pytest.approx(s_i) and sch(t1) == s_f


def test_linear_and_one_shot_schedules():
    lin = LinearSchedule(final_sparsity=0.6, start_step=5, end_step=25, initial_sparsity=0.2)
    for t in range(40):
        want = 0.0 if t < 5 else (0.6 if t >= 25 else 0.2 + 0.4 * (t - 5) / 20)
        assert lin(t) == pytest.approx(want), t
    one = OneShotSchedule(sparsity=0.5, start_step=3)
    assert [one(t) for t in range(5)] == [0, 0, 0, 0.5, 0.5]
    assert make_schedule({"kind": "cubic", "final_sparsity": 0.5, "start_step": 0,
                          "end_step": 10})(10) == 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"final_sparsity": 1.0, "start_step": 0, "end_step": 10}, "final_sparsity"),
    ({"final_sparsity": 0.5, "start_step": 0, "end_step": 10, "initial_sparsity": -0.1},
     "initial_sparsity"),
    ({"final_sparsity": 0.5, "start_step": 10, "end_step": 10}, "end_step"),
    ({"final_sparsity": 0.5, "start_step": -1, "end_step": 10}, "start_step"),
    ({"final_sparsity": 0.5, "start_step": 0, "end_step": 10, "frequency": 0}, "frequency"),
])
def test_schedule_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CubicSchedule(**kwargs)
    with pytest.raises(ValueError, match="kind"):
        make_schedule({"kind": "exp", "final_sparsity": 0.5})
    with pytest.raises(ValueError, match="sparsity"):
        OneShotSchedule(sparsity=1.5)


# ---- masks ---------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 3))


def _perturb(model: nn.Module) -> None:
    """A stand-in for training between mask updates (masks re-applied afterwards)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    apply_masks(model)


def test_layer_unstructured_exact_at_each_scheduled_step():
    model = _mlp()
    sch = CubicSchedule(final_sparsity=0.9, start_step=0, end_step=100, frequency=10)
    previous = None
    for step in range(0, 101, 10):
        s = sch(step)
        masks = compute_masks(model, [nn.Linear], s)
        for name, p, mask in masked_parameters(model):
            zeros = int((p == 0).sum())
            assert abs(zeros - s * p.numel()) <= 1, (step, name)
            assert int((~mask).sum()) == _round(s * p.numel())
            assert bool((p[~mask] == 0).all())
        if previous is not None:  # recomputed from the absolute target, yet monotone
            for name, m in masks.items():
                assert not bool((m & ~previous[name]).any()), name
        previous = {k: v.clone() for k, v in masks.items()}
        _perturb(model)


def test_global_unstructured_one_threshold():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(10)  # a layer of large weights keeps more of them
    compute_masks(model, [nn.Linear], 0.6, scope="global")
    rows = sparsity_report(model)
    total = sum(r.numel for r in rows)
    assert abs(sum(r.zeros for r in rows) - 0.6 * total) <= 1
    assert total_sparsity(rows) == pytest.approx(0.6, abs=1 / total)
    kept = torch.cat([p[m].abs() for _, p, m in masked_parameters(model)])
    pruned = torch.cat([p.detach()[~m] for _, p, m in masked_parameters(model)])
    assert bool((pruned == 0).all())
    sp = {r.name: r.sparsity for r in rows}
    assert sp["4.weight"] < sp["0.weight"]
    assert kept.min() > 0
    assert "total (weights)" in format_sparsity(rows)


def test_rows_prune_whole_output_channels():
    model = _mlp()
    conv = nn.Conv1d(6, 10, 3)
    for s in (0.25, 0.5, 0.7):
        compute_masks(model, [nn.Linear], s, structure="rows", norm="l2")
        for lin in (model[0], model[2], model[4]):
            dead = (lin.weight == 0).all(dim=1)
            assert int(dead.sum()) == _round(s * lin.out_features)
            assert bool((lin.bias[dead] == 0).all())  # a pruned channel outputs exactly 0
            assert abs(int((lin.weight == 0).sum()) - s * lin.weight.numel()) <= lin.in_features
        compute_masks(conv, [nn.Conv1d], s, structure="rows")
        dead = (conv.weight == 0).flatten(1).all(dim=1)
        assert int(dead.sum()) == _round(s * 10)
        assert bool((conv(torch.randn(2, 6, 9))[:, dead] == 0).all())


def test_global_rows_element_weighted():
    model = _mlp()
    compute_masks(model, [nn.Linear], 0.5, scope="global", structure="rows")
    rows = [r for r in sparsity_report(model) if r.name.endswith("weight")]
    total = sum(r.numel for r in rows)
    biggest_row = max(m.in_features for m in model if isinstance(m, nn.Linear))
    assert abs(sum(r.zeros for r in rows) - 0.5 * total) <= biggest_row


def test_lstm_unstructured_and_gate_rows():
    torch.manual_seed(0)
    lstm = nn.LSTM(7, 6, num_layers=2, bidirectional=True, batch_first=True)
    compute_masks(lstm, [nn.LSTM], 0.4)
    for name, p, _ in masked_parameters(lstm):
        assert abs(int((p == 0).sum()) - 0.4 * p.numel()) <= 1, name
    lstm.flatten_parameters()
    assert torch.isfinite(lstm(torch.randn(3, 5, 7))[0]).all()

    lstm = nn.LSTM(7, 6, num_layers=2, bidirectional=True, batch_first=True)
    flat_before = [p.data_ptr() for p in lstm._flat_weights]
    compute_masks(lstm, ["type:LSTM"], 0.5, structure="rows")
    assert [p.data_ptr() for p in lstm._flat_weights] == flat_before  # storage kept
    h = 6
    for sfx in ("l0", "l0_reverse", "l1", "l1_reverse"):
        w_ih, w_hh = getattr(lstm, f"weight_ih_{sfx}"), getattr(lstm, f"weight_hh_{sfx}")
        unit_dead = (w_ih == 0).all(1).view(4, h).all(0) & (w_hh == 0).all(1).view(4, h).all(0)
        assert int(unit_dead.sum()) == 3, sfx  # a hidden unit's 4 gate rows together
        assert abs(int((w_ih == 0).sum()) - 0.5 * w_ih.numel()) <= w_ih.shape[1]
    lstm.flatten_parameters()
    out, _ = lstm(torch.randn(3, 5, 7))
    assert torch.isfinite(out).all()
    # a pruned hidden unit of the last layer outputs exactly 0 (its gate biases are pruned too)
    dead_f = (lstm.weight_ih_l1 == 0).all(1).view(4, h).all(0)  # (4H,) -> (4, H) -> (H,)
    dead_r = (lstm.weight_ih_l1_reverse == 0).all(1).view(4, h).all(0)
    assert bool((out[..., :h][..., dead_f] == 0).all())
    assert bool((out[..., h:][..., dead_r] == 0).all())
    assert bool((out[..., :h][..., ~dead_f] != 0).any())


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    with torch.no_grad():
        layer.self_attn.in_proj_bias.normal_()
    return layer.eval()


def test_mha_head_pruning_heads_contribute_nothing():
    layer = _encoder_layer()
    attn = layer.self_attn
    compute_masks(layer, [nn.MultiheadAttention], 0.5, structure="heads")
    e, d = 16, 4
    wout = attn.out_proj.weight.view(e, 4, d)  # (E, H*D) -> (E, H, D)
    dead = (wout == 0).all(0).all(1)
    assert int(dead.sum()) == 2
    qkv = attn.in_proj_weight.view(3, 4, d, e)  # (3E, E) -> (3, H, D, E)
    assert bool((qkv[:, dead] == 0).all()) and bool((qkv[:, ~dead] != 0).any())
    assert bool((attn.in_proj_bias.view(3, 4, d)[:, dead] == 0).all())
    x = torch.randn(2, 5, e)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    ref = layer(x, src_key_padding_mask=kpm)
    assert torch.isfinite(ref).all()
    remove_masks(layer)  # bake and drop hooks: now we may write into the pruned heads
    h = int(dead.nonzero()[0])
    with torch.no_grad():
        attn.in_proj_weight.view(3, 4, d, e)[:2, h].normal_()  # pruned head's q and k
        attn.in_proj_bias.view(3, 4, d)[:2, h].normal_()
    torch.testing.assert_close(layer(x, src_key_padding_mask=kpm), ref)
    alive = int((~dead).nonzero()[0])
    with torch.no_grad():
        attn.in_proj_weight.view(3, 4, d, e)[:2, alive].normal_()
    assert not torch.allclose(layer(x, src_key_padding_mask=kpm), ref)


def test_hf_bert_head_pruning():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    compute_masks(model, ["type:BertAttention"], 0.5, structure="heads")
    ids = torch.randint(0, 50, (2, 6))
    ref = model(input_ids=ids).last_hidden_state
    assert torch.isfinite(ref).all()
    for layer in model.encoder.layer:
        sa, dense = layer.attention.self, layer.attention.output.dense
        dead = (dense.weight.view(32, 4, 8) == 0).all(0).all(1)  # (E, H*D) -> (E, H, D)
        assert int(dead.sum()) == 2
        for lin in (sa.query, sa.key, sa.value):
            assert bool((lin.weight.view(4, 8, 32)[dead] == 0).all())
            assert bool((lin.bias.view(4, 8)[dead] == 0).all())
    remove_masks(model)
    sa = model.encoder.layer[0].attention.self
    dead = (model.encoder.layer[0].attention.output.dense.weight.view(32, 4, 8) == 0).all(0).all(1)
    with torch.no_grad():
        sa.query.weight.view(4, 8, 32)[dead] = 1.0
        sa.key.weight.view(4, 8, 32)[dead] = -1.0
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref)


def test_gradients_of_pruned_weights_are_zero_and_deepcopy_keeps_masks():
    model = _mlp()
    compute_masks(model, [nn.Linear], 0.5)
    model(torch.randn(4, 13)).sum().backward()
    for _, p, mask in masked_parameters(model):
        assert bool((p.grad[~mask] == 0).all())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for _, p, _ in masked_parameters(clone):
            p.fill_(1.0)
    clone(torch.randn(1, 13))  # the forward pre-hook re-applies the masks
    for (_, _p, mask), (_, q, _) in zip(masked_parameters(model), masked_parameters(clone),
                                       strict=True):
        assert bool((q[~mask] == 0).all()) and bool((q[mask] == 1).all())
    apply_masks(clone)
    clone.zero_grad()
    clone(torch.randn(4, 13)).sum().backward()
    for _, p, mask in masked_parameters(clone):
        assert bool((p.grad[~mask] == 0).all())


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="scope"):
        compute_masks(model, [nn.Linear], 0.5, scope="model")
    with pytest.raises(ValueError, match="structure"):
        compute_masks(model, [nn.Linear], 0.5, structure="blocks")
    with pytest.raises(ValueError, match="nope"):
        compute_masks(model, ["nope.*"], 0.5)
    with pytest.raises(ValueError, match="attention"):
        compute_masks(model, [nn.Linear], 0.5, structure="heads")
    with pytest.raises(ValueError, match="sparsity"):
        compute_masks(model, [nn.Linear], 1.0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exclude_leaves_the_head_dense_and_prunes_the_rest_to_target(scope):
    model = _mlp()
    head = model[4].weight.detach().clone()
    masks = compute_masks(model, [nn.Linear], 0.6, scope=scope, exclude=["4"])
    assert set(masks) == {"0.weight", "2.weight"} and torch.equal(model[4].weight, head)
    assert not hasattr(model[4], "weight_mask")
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - kept / total - 0.6) < 1e-2  # the target over the layers still pruned
    assert register_masks(_mlp(), [nn.Linear], exclude=["2", "4"]) == ["0.weight"]
    # a container excludes everything inside it; "?" may match nothing; a typo is an error
    outer = nn.Sequential(_mlp(), nn.Linear(3, 2))
    assert set(compute_masks(outer, [nn.Linear], 0.5, exclude=["0", "nope?"])) == {"1.weight"}
    with pytest.raises(ValueError, match=r"prune.exclude: 'clasifier' matched no module"):
        compute_masks(_mlp(), [nn.Linear], 0.5, exclude=["clasifier"])
    with pytest.raises(ValueError, match="selected no weight"):
        compute_masks(_mlp(), [nn.Linear], 0.5, exclude=["type:Linear"])


def test_state_dict_round_trip():
    model = _mlp()
    compute_masks(model, ["0", "2"], 0.5)
    state = copy.deepcopy(model.state_dict())
    assert "0.weight_mask" in state and "4.weight_mask" not in state
    fresh = _mlp()
    register_masks(fresh, ["0", "2"])
    fresh.load_state_dict(state)
    fresh(torch.randn(1, 13))
    for (_, p, m), (_, q, n) in zip(masked_parameters(model), masked_parameters(fresh),
                                    strict=True):
        assert torch.equal(m, n) and torch.equal(p, q)


# ---- the callback in a real Trainer ------------------------------------------------------------
class _Tagger(pl.LightningModule):
    """Embedding -> LSTM -> Linear -> Linear over random data."""

    def __init__(self, opt: str) -> None:
        super().__init__()
        self.opt = opt
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.out(torch.relu(self.fc(h.mean(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (n, 7), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8)


def _trainer(max_steps: int, cb: pl.Callback, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb], **kw)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_callback_keeps_pruned_weights_zero_through_training(opt):
    torch.manual_seed(0)
    model = _Tagger(opt)
    sch = CubicSchedule(final_sparsity=0.7, start_step=10, end_step=60, frequency=10)
    cb = PruningCallback(sch, targets=[nn.Linear, nn.LSTM], scope="layer")
    _trainer(100, cb).fit(model, _loader())
    assert cb.last_sparsity == 0.7 and cb.updates == 6  # steps 0 (dense), 20, 30, ..., 60
    rows = sparsity_report(model)
    assert {r.name for r in rows} >= {"fc.weight", "out.weight", "lstm.weight_ih_l0",
                                      "lstm.weight_hh_l0_reverse"}
    for name, p, mask in masked_parameters(model):
        assert bool((p[~mask] == 0).all()), name
        assert abs(int((p == 0).sum()) - 0.7 * p.numel()) <= 1, name
        assert abs(int((~mask).sum()) - 0.7 * p.numel()) <= 1, name
    model.lstm.flatten_parameters()
    assert torch.isfinite(model(torch.randint(0, 20, (2, 7)))).all()
    assert model.fc.weight.abs().sum() > 0


def test_callback_exclude_keeps_the_output_layer_dense_through_training():
    torch.manual_seed(0)
    model = _Tagger("adam")
    sch = CubicSchedule(final_sparsity=0.7, start_step=10, end_step=60, frequency=10)
    cb = PruningCallback(sch, targets=[nn.Linear, nn.LSTM], exclude=["out"])
    _trainer(80, cb).fit(model, _loader())
    names = {name for name, _, _ in masked_parameters(model)}
    assert "fc.weight" in names and not any(n.startswith("out.") for n in names)
    assert int((model.out.weight == 0).sum()) == 0  # trained, never masked
    assert abs(int((model.fc.weight == 0).sum()) - 0.7 * model.fc.weight.numel()) <= 1


def test_callback_checkpoint_resume_restores_masks(tmp_path):
    torch.manual_seed(0)
    model = _Tagger("adam")
    sch = OneShotSchedule(sparsity=0.5, start_step=2)
    cb = PruningCallback(sch, targets=["fc", "out"], structure="rows")
    trainer = _trainer(5, cb)
    trainer.fit(model, _loader())
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {n: m.clone() for n, _, m in masked_parameters(model)}
    assert set(saved) == {"fc.weight", "fc.bias", "out.weight", "out.bias"}

    torch.manual_seed(1)
    fresh = _Tagger("adam")
    cb2 = PruningCallback(sch, targets=["fc", "out"], structure="rows")
    _trainer(8, cb2).fit(fresh, _loader(), ckpt_path=ckpt)
    assert cb2.last_sparsity == 0.5 and cb2.updates == cb.updates == 2  # restored, not redone
    for n, p, m in masked_parameters(fresh):
        assert torch.equal(m, saved[n]), n
        assert bool((p[~m] == 0).all()), n


def test_pruned_model_exports_and_compiles():
    model = _mlp()
    compute_masks(model, [nn.Linear], 0.5)
    x = torch.randn(2, 13)
    ep = torch.export.export(model, (x,))  # the in-place mask hook stands aside while tracing
    torch.testing.assert_close(ep.module()(x), model(x))
    remove_masks(model, keep_buffers=True)
    assert "0.weight_mask" in model.state_dict() and not model[0]._forward_pre_hooks


def test_prepared_lstm_and_hf_attention_prune_and_convert():
    qat = pytest.importorskip("qat")
    if not hasattr(qat, "prepare") or not hasattr(qat, "convert"):
        pytest.skip("qat.prepare / qat.convert not available yet")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tagger, _ = qat.prepare(_Tagger("adam"))
    assert type(tagger.lstm) is not nn.LSTM and isinstance(tagger.lstm, nn.LSTM)
    compute_masks(tagger, ["type:LSTM", "fc"], 0.5, structure="rows")
    x = torch.randint(0, 20, (2, 7))
    tagger(x).sum().backward()
    for name, p, mask in masked_parameters(tagger):
        assert bool((p.grad[~mask] == 0).all()) and bool((p[~mask] == 0).all()), name
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48)
    bert, _ = qat.prepare(transformers.BertModel(cfg))
    compute_masks(bert, ["type:BertAttention"], 0.5, structure="heads")
    for model, args in ((tagger, (x,)), (bert, (torch.randint(0, 50, (2, 6)),))):
        converted = qat.convert(model)
        pairs = zip(masked_parameters(model), masked_parameters(converted), strict=True)
        assert all(bool((q[~m] == 0).all()) for (_, _, m), (_, q, _) in pairs)
        out = converted(*args)
        assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()


def test_schedule_steps_as_fractions_of_the_run():
    from qat.prune.schedule import make_schedule

    rel = {"kind": "cubic", "initial_sparsity": 0.0, "final_sparsity": 0.8,
           "start_fraction": 0.1, "end_fraction": 0.5, "frequency": 1}
    s = make_schedule(rel, total_steps=200)
    assert (s.start_step, s.end_step) == (20, 100)
    assert s(19) == 0.0 and s(100) == pytest.approx(0.8) and 0.0 < s(60) < 0.8
    with pytest.raises(ValueError, match="end_fraction needs the run's number of steps"):
        make_schedule({k: v for k, v in rel.items() if k != "start_fraction"})
    with pytest.raises(ValueError, match="end_fraction=1.5 must be a fraction"):
        make_schedule({**rel, "end_fraction": 1.5}, total_steps=10)


def test_pruning_callback_resolves_fractions_at_train_start():
    import lightning as L
    from torch.utils.data import DataLoader

    from qat.lit import QATModule
    from qat.prune import PruningCallback

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    cb = PruningCallback({"kind": "linear", "initial_sparsity": 0.0, "final_sparsity": 0.5,
                          "end_fraction": 0.5, "frequency": 1}, targets=["type:Linear"],
                         module="model", log=False)
    data = [{"x": torch.randn(4, 8), "labels": torch.randint(0, 2, (4,))} for _ in range(6)]
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(QATModule(Wrap()), DataLoader(data, batch_size=None))
    assert cb.schedule.end_step == 6  # half of 2 epochs x 6 steps
    assert cb.last_sparsity == pytest.approx(0.5)


def test_optional_targets_may_match_nothing_but_not_all():
    from qat.prune.groups import match_modules

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    hits = match_modules(model, ["type:Linear?", "type:LSTM?"])
    assert [n for n, _ in hits] == ["0", "2"]
    with pytest.raises(ValueError, match="'type:LSTM' matched no module"):
        match_modules(model, ["type:Linear", "type:LSTM"])
    with pytest.raises(ValueError, match="matched no module of Sequential"):
        match_modules(model, ["type:LSTM?", "type:Conv1d?"])


# ---- pruned weights stay exactly zero through every weight mode ------------------------------
WEIGHT_MODES = {
    "int_sym": {"bits": 4},
    "int_asym": {"bits": 4, "symmetric": False},
    "int_unsigned_asym": {"bits": 4, "symmetric": False, "signed": False},
    "lsq": {"bits": 4, "estimator": "lsq"},
    "lsq_asym": {"bits": 4, "estimator": "lsq", "symmetric": False},
    "lsq_plus": {"bits": 4, "estimator": "lsq_plus", "symmetric": False},
    "pact": {"bits": 4, "estimator": "pact", "granularity": "tensor"},
    "group": {"bits": 3, "granularity": "group", "group_size": 8},
    "ternary": {"bits": 2, "mode": "ternary", "estimator": "ste"},
    "ternary_learned": {"bits": 2, "mode": "ternary", "estimator": "ste",
                        "ternary_scale": "learned"},
}


@pytest.mark.parametrize("mode", list(WEIGHT_MODES))
def test_pruned_weights_are_zero_after_fake_quant_and_in_the_int_checkpoint(mode: str) -> None:
    """Bug: LSQ+ (a float offset moved 0 off the grid) gave 64/64 pruned weights non-zero."""
    import io

    import qat
    from qat.export import read_int_weights, save_int_checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.add_(0.3)  # an off-centre weight: asymmetric grids get a zero point
    compute_masks(net, [nn.Linear], 0.5)
    qm, _ = qat.prepare(net, {"weight": WEIGHT_MODES[mode], "activation": None})
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(5):  # learned scales / offsets move
        loss = qm(torch.randn(32, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    apply_masks(qm.eval())  # as PruningCallback does after every optimizer step
    for layer in (qm[0], qm[2]):
        mask = layer.weight_mask
        wq = layer.weight_quant(layer.weight).detach()
        if layer is qm[0]:
            assert int((~mask).sum()) == 64
        assert bool((wq[~mask] == 0).all()), f"{int((wq[~mask] != 0).sum())} pruned weights"
    buf = io.BytesIO()
    save_int_checkpoint(qm, buf)
    for key, iw in read_int_weights(buf).items():
        mask = qm.get_submodule(key.rpartition(".")[0]).weight_mask
        assert bool((iw.dequantize()[~mask] == 0).all()), key


def test_binary_weights_refuse_pruning() -> None:
    import qat

    net = nn.Sequential(nn.Linear(16, 8))
    binary = {"weight": {"bits": 1, "mode": "binary", "estimator": "ste"}}
    qm, _ = qat.prepare(net, binary)
    with pytest.raises(ValueError, match=r"binary weights cannot be pruned"):
        compute_masks(qm, ["type:QuantLinear"], 0.5)
    compute_masks(net, [nn.Linear], 0.5)  # pruned first, then prepared
    with pytest.raises(ValueError, match=r"^0\.weight: binary weights cannot be pruned"):
        qat.prepare(net, binary)


class _Worsening(_Tagger):
    """Its validation score falls every epoch: unguarded, best.ckpt would be epoch 0's."""

    def validation_step(self, batch, batch_idx):
        self.log("val/score", torch.tensor(1.0 - 0.1 * self.current_epoch))


def test_best_checkpoint_has_the_final_sparsity(tmp_path):
    from qat.callbacks import BestCheckpoint

    torch.manual_seed(0)
    # 8 steps an epoch; the ramp reaches 0.6 at step 16, the first step of epoch 2
    sch = CubicSchedule(final_sparsity=0.6, start_step=0, end_step=16, frequency=4)
    cb = PruningCallback(sch, targets=["fc", "out"])
    reached: list[bool] = []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            reached.append(cb.final_model_reached(trainer))

    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/score", mode="max",
                          save_weights_only=True, enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[cb, best, Spy()])
    trainer.fit(_Worsening("adam"), _loader(), _loader(16))
    assert reached == [False, False, True, True]
    state = torch.load(best.best_model_path, weights_only=False)
    assert state["epoch"] == 2
    for name in ("fc.weight", "out.weight"):
        w = state["state_dict"][name]
        assert abs(int((w == 0).sum()) - 0.6 * w.numel()) <= 1, name


# ---- movement pruning --------------------------------------------------------------------------
def test_scores_replace_magnitude():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    w0 = model[0].weight
    s0 = torch.arange(12.0).reshape(3, 4).flip(0)  # the largest scores where |w| may be small
    s1 = torch.tensor([[5.0, -1.0, 2.0], [0.0, 3.0, -2.0]])
    compute_masks(model, [nn.Linear], 0.5, scores={"0.weight": s0, "1.weight": s1})
    assert torch.equal(model[0].weight_mask, s0 >= 6)  # the 6 lowest scores pruned
    assert torch.equal(model[1].weight_mask, s1 >= 2)  # 3 of 6: -2, -1, 0
    assert bool((w0[~model[0].weight_mask] == 0).all())
    # with scores a pruned element may rank among the kept again (its weight stays zero here:
    # MovementScores.prune brings its value back)
    compute_masks(model, [nn.Linear], 0.5, scores={"0.weight": -s0, "1.weight": -s1})
    assert torch.equal(model[0].weight_mask, s0 < 6) and bool((w0 == 0).all())
    # global scope: one ranking over both tensors (9 of 18 pruned)
    fresh = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    compute_masks(fresh, [nn.Linear], 0.5, scope="global",
                  scores={"0.weight": s0, "1.weight": s1})
    scores = torch.cat([s0.reshape(-1), s1.reshape(-1)])
    kept = torch.cat([fresh[0].weight_mask.reshape(-1), fresh[1].weight_mask.reshape(-1)])
    assert int(kept.sum()) == 9 and bool((scores[kept] >= scores.sort().values[9]).all())
    with pytest.raises(ValueError, match="unstructured"):
        compute_masks(fresh, [nn.Linear], 0.5, structure="rows", scores={})
    with pytest.raises(KeyError, match="2.weight"):
        compute_masks(_mlp()[:3], [nn.Linear], 0.5, scores={"0.weight": torch.zeros(32, 13)})


def test_movement_scores_take_adam_steps_along_grad_times_weight_pruned_ones_included():
    """The scores are what torch.optim.Adam (lr 1) makes of parameters whose gradient is
    grad * w, w of a pruned element being its value when pruned (Sanh et al.'s AdamW scores)."""
    from qat.prune import MovementScores, keep_raw_gradients, mask_gradients

    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    register_masks(lin, [nn.Linear])
    keep_raw_gradients(lin)
    ms = MovementScores()
    ref = nn.Parameter(torch.zeros(4, 5))
    adam = torch.optim.Adam([ref], lr=1.0, betas=ms.betas, eps=ms.eps)
    dense = lin.weight.detach().clone()
    for step in range(4):
        if step == 2:  # prune the first row: its weights become zero, their old values count
            ms.remember(lin)
            lin.weight_mask[0] = False
            apply_masks(lin)
        lin.zero_grad()
        lin(torch.randn(6, 5)).pow(2).sum().backward()
        assert bool((lin.weight.grad[0] != 0).all())  # the whole gradient, pruned row included
        ref.grad = lin.weight.grad * torch.where(lin.weight_mask, lin.weight.detach(), dense)
        adam.step()
        assert ms.update(lin)
        mask_gradients(lin)
        assert bool((lin.weight.grad[0] == 0).all()) == (step >= 2)
        with torch.no_grad():
            lin.weight.sub_(0.1 * lin.weight.grad)
            dense = torch.where(lin.weight_mask, lin.weight, dense)
    assert ms.steps == 4 and set(ms.scores) == {"weight"}  # unstructured: weights only
    torch.testing.assert_close(ms.scores["weight"], ref.detach(), rtol=1e-5, atol=1e-6)
    lin.weight.grad[0, 0] = float("inf")  # an overflowed fp16 step: skipped, scores kept
    kept = ms.scores["weight"].clone()
    assert not ms.update(lin) and ms.steps == 4 and torch.equal(ms.scores["weight"], kept)
    state = ms.state_dict()
    other = MovementScores()
    other.load_state_dict(state)
    assert other.steps == 4 and torch.equal(other.scores["weight"], ms.scores["weight"])
    assert torch.equal(other.dense["weight"], ms.dense["weight"])
    assert all(torch.equal(a, b) for a, b in zip(other.moments["weight"], ms.moments["weight"],
                                                  strict=True))
    keep_raw_gradients(lin, False)
    lin.zero_grad()
    lin(torch.randn(6, 5)).pow(2).sum().backward()
    assert bool((lin.weight.grad[0] == 0).all())  # the hook masks again


def test_movement_prune_brings_back_a_pruned_weight_with_its_value():
    from qat.prune import MovementScores

    lin = nn.Linear(4, 2, bias=False)
    w = lin.weight.detach().clone()
    register_masks(lin, [nn.Linear])
    ms = MovementScores()
    ms.steps = 1
    ms.scores["weight"] = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    ms.prune(lin, [nn.Linear], 0.25)  # the two lowest scores: row 0, columns 0 and 1
    keep = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert torch.equal(lin.weight_mask, keep)
    assert torch.equal(lin.weight, torch.where(keep, w, torch.zeros_like(w)))
    with torch.no_grad():
        lin.weight.add_(keep.float())  # training moves the kept weights
    moved = lin.weight.detach().clone()
    ms.scores["weight"] = torch.tensor([[9.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 8.0]])
    ms.prune(lin, [nn.Linear], 0.25)  # (0, 0) comes back with its value; (0, 3) goes
    keep2 = torch.tensor([[True, False, True, False], [True, True, True, True]])
    assert torch.equal(lin.weight_mask, keep2)
    assert lin.weight[0, 0] == w[0, 0] and lin.weight[0, 1] == 0 and lin.weight[0, 3] == 0
    assert torch.equal(lin.weight[1], moved[1]) and lin.weight[0, 2] == moved[0, 2]
    assert ms.dense["weight"][0, 3] == moved[0, 3]  # kept aside for a later return


class _Pull(pl.LightningModule):
    """One Linear whose loss pulls its large weights to zero and grows its small ones."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            big = torch.zeros(64, dtype=torch.bool)
            big[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32]] = True
            self.big = big = big.view(8, 8)  # half the weights
            self.lin.weight.copy_(torch.where(big, torch.full((8, 8), 1.0),
                                              torch.full((8, 8), 0.1)))
            self.register_buffer("goal", torch.where(big, 0.0, 2.0))

    def training_step(self, batch, batch_idx):
        return (self.lin.weight - self.goal).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
def test_movement_prunes_the_weights_training_moves_to_zero(criterion):
    model = _Pull()
    sch = OneShotSchedule(sparsity=0.5, start_step=5)
    cb = PruningCallback(sch, targets=["lin"], criterion=criterion)
    _trainer(6, cb).fit(model, _loader())
    kept = model.lin.weight_mask
    # movement: the large weights heading to zero go, though they are still the largest after
    # 5 small steps (0.9 against 0.2), which is why magnitude keeps them
    assert torch.equal(kept, ~model.big if criterion == "movement" else model.big)
    assert bool((model.lin.weight[~kept] == 0).all())
    assert cb.movement is None if criterion == "magnitude" else cb.movement.steps == 6


def test_movement_callback_refuses_to_prune_before_scoring_and_structured():
    with pytest.raises(ValueError, match="unstructured"):
        PruningCallback(OneShotSchedule(0.5, start_step=2), ["lin"], structure="rows",
                        criterion="movement")
    with pytest.raises(ValueError, match="criterion='magnitud'"):
        PruningCallback(OneShotSchedule(0.5, start_step=2), ["lin"], criterion="magnitud")
    cb = PruningCallback(OneShotSchedule(0.5, start_step=0), ["lin"], criterion="movement")
    with pytest.raises(ValueError, match="before any optimizer step has scored"):
        _trainer(2, cb).fit(_Pull(), _loader())


def test_movement_scores_survive_a_checkpoint(tmp_path):
    sch = CubicSchedule(final_sparsity=0.5, start_step=3, end_step=9, frequency=3)
    cb = PruningCallback(sch, targets=["lin"], criterion="movement")
    trainer = _trainer(6, cb)
    trainer.fit(_Pull(), _loader())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2 = PruningCallback(sch, targets=["lin"], criterion="movement")
    _trainer(6, cb2).fit(_Pull(), _loader(), ckpt_path=ckpt)  # max_steps reached: restore only
    assert cb2.movement.steps == cb.movement.steps == 6
    assert torch.equal(cb2.movement.scores["lin.weight"], cb.movement.scores["lin.weight"])


# ---- sensitivity -------------------------------------------------------------------------------
class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(6, 6), "ffn": nn.Linear(6, 6)})
                                   for _ in range(3))
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        for blk in self.layer:
            x = torch.relu(blk["ffn"](x + blk["q"](x)))
        return self.classifier(x)


def test_layer_groups_join_the_layers_that_differ_by_their_index():
    from qat.prune import layer_groups

    groups = layer_groups(_Blocks(), [nn.Linear])
    assert groups == {"layer.*.q": ["layer.0.q", "layer.1.q", "layer.2.q"],
                      "layer.*.ffn": ["layer.0.ffn", "layer.1.ffn", "layer.2.ffn"],
                      "classifier": ["classifier"]}
    assert set(layer_groups(_Blocks(), [nn.Linear], exclude=["classifier"])) == {
        "layer.*.q", "layer.*.ffn"}  # left out as prune.exclude leaves it dense


def test_prune_sensitivity_prunes_one_group_at_a_time_and_restores_the_model():
    from qat.prune import format_sensitivity, prune_sensitivity

    model, x = _Blocks(), torch.randn(16, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    seen = []

    def evaluate(m):  # records what each probe pruned; metric: agreement with the dense model
        seen.append({n: float((p == 0).float().mean()) for n, p in m.named_parameters()
                     if n.endswith("weight")})
        return 1.0 - float((m(x) - ref).pow(2).mean())

    groups = {"q": ["layer.0.q", "layer.1.q", "layer.2.q"], "head": ["classifier"]}
    rows = prune_sensitivity(model, evaluate, groups, [0.5, 0.75])
    assert [(r.group, r.sparsity) for r in rows] == [
        ("none", 0.0), ("q", 0.5), ("q", 0.75), ("head", 0.5), ("head", 0.75)]
    assert rows[0].metric == 1.0 and all(r.metric < 1.0 for r in rows[1:])
    assert seen[2]["layer.1.q.weight"] == pytest.approx(0.75, abs=1 / 36)
    assert seen[2]["layer.1.ffn.weight"] == 0.0 and seen[2]["classifier.weight"] == 0.0
    assert seen[3]["classifier.weight"] == 0.5 and seen[3]["layer.0.q.weight"] == 0.0
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())
    table = format_sensitivity(rows, "val/score")
    assert "val/score of the unpruned model: 1.0000" in table and "head" in table
    compute_masks(model, ["classifier"], 0.5)
    with pytest.raises(ValueError, match="masks already"):
        prune_sensitivity(model, evaluate, groups, [0.5])
