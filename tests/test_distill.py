"""Knowledge distillation: losses, feature capture, teachers, the step function and callback."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.distill import (
    AttentionLoss,
    DistillationCallback,
    DistillationLoss,
    Distiller,
    FeatureCapture,
    HiddenStateLoss,
    TeacherCache,
    distill_step,
    feature_widths,
    load_teacher,
)

# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- logit loss ----------------------------------------------------------------------------
def test_kd_loss_equals_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    task = torch.tensor(0.7)
    T, alpha = 2.5, 0.3
    loss, parts = DistillationLoss(temperature=T, alpha=alpha)(s, t, task)
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()  # per example
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    torch.testing.assert_close(kl, ref)
    torch.testing.assert_close(loss, alpha * T * T * kl + (1 - alpha) * task)
    torch.testing.assert_close(parts["kd"], T * T * kl)
    assert parts["task"] == task and parts["loss"] == loss.detach()
    # no task loss: the distillation term alone; equal logits: zero
    torch.testing.assert_close(DistillationLoss(T, alpha)(s, t)[0], T * T * kl)
    assert float(DistillationLoss(T, alpha)(s, s.clone())[0]) == pytest.approx(0, abs=1e-6)


def test_regression_uses_mse_and_validation():
    s, t = torch.randn(4, 1), torch.randn(4)
    loss, parts = DistillationLoss(temperature=3.0, alpha=0.5, regression=True)(
        s, t, torch.tensor(1.0))
    torch.testing.assert_close(loss, 0.5 * ((s.view(-1) - t) ** 2).mean() + 0.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="logit shapes"):
        DistillationLoss()(torch.randn(2, 3), torch.randn(2, 4))


def test_gradient_reaches_only_the_student():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    batch = {"x": torch.randn(5, 4), "labels": torch.randint(0, 3, (5,))}
    seen = {}
    teacher.register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
    loss, logs = distill_step(
        student, teacher, batch, lambda out, b: F.cross_entropy(out, b["labels"]),
        DistillationLoss(2.0, 0.5), forward_fn=lambda m, b: m(b["x"]))
    loss.backward()
    assert not seen["t"].requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert set(logs) == {"kd", "task", "loss"}


# ---- intermediate losses -------------------------------------------------------------------
def test_hidden_state_mse_with_projection_and_mask():
    torch.manual_seed(0)
    hl = HiddenStateLoss([(8, 12), (12, 12)])
    assert isinstance(hl.proj[1], nn.Identity)
    s1, t1 = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    s2, t2 = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    got = hl([s1, s2], [t1, t2])
    ref = (F.mse_loss(hl.proj[0](s1), t1) + F.mse_loss(s2, t2)) / 2
    torch.testing.assert_close(got, ref)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    a = hl([s1, s2], [t1, t2], mask)
    s1b = s1.clone()
    s1b[1, 3:] = 100.0  # padding positions do not count
    torch.testing.assert_close(hl([s1b, s2], [t1, t2], mask), a)
    loss = DistillationLoss(hidden=hl, hidden_weight=2.0)
    assert {n for n, _ in loss.named_parameters()} == {"hidden.proj.0.weight",
                                                        "hidden.proj.0.bias"}
    total, parts = loss(torch.randn(2, 3), torch.randn(2, 3), None, student_hidden=[s1, s2],
                        teacher_hidden=[t1, t2])
    total.backward()
    assert hl.proj[0].weight.grad is not None and parts["hidden"] > 0
    with pytest.raises(ValueError, match="widths"):
        HiddenStateLoss([(8, 0)])


def test_attention_loss_masks_padding_and_heads():
    torch.manual_seed(0)
    s, t = torch.rand(2, 4, 5, 5), torch.rand(2, 4, 5, 5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, 4:] = False
    got = AttentionLoss()([s], [t], [valid])
    m = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(s)
    torch.testing.assert_close(got, ((s - t)[m] ** 2).mean())
    with pytest.raises(ValueError, match="average_heads"):
        AttentionLoss()([s], [t[:, :2]])
    avg = AttentionLoss(average_heads=True)([s], [t[:, :2]])
    torch.testing.assert_close(avg, ((s.mean(1) - t[:, :2].mean(1)) ** 2).mean())


# ---- capture ---------------------------------------------------------------------------------
def _reference_attention(mha: nn.MultiheadAttention, x: torch.Tensor, pad: torch.Tensor):
    """softmax(q k^T / sqrt(d) + padding) per head, from the packed projection."""
    b, n, e = x.shape
    h, d = mha.num_heads, mha.head_dim
    q, k, _ = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q = q.view(b, n, h, d).transpose(1, 2)  # (B, T, E) -> (B, H, T, D)
    k = k.view(b, n, h, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_capture_inside_transformer_encoder(mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    enc.train(mode == "train")
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    with torch.no_grad():
        plain = enc(x, src_key_padding_mask=pad)  # eval: fast path / nested tensors
    fast_before = torch.backends.mha.get_fastpath_enabled()
    names = ["layers.0.self_attn", "layers.1.self_attn"]
    ctx = torch.no_grad() if mode == "eval" else torch.enable_grad()
    with ctx, FeatureCapture(enc, hidden=["layers.0"], attention=names) as cap:
        out = enc(x, src_key_padding_mask=pad)
    assert torch.backends.mha.get_fastpath_enabled() == fast_before
    valid = ~pad
    torch.testing.assert_close(out[valid], plain[valid], atol=1e-5, rtol=1e-5)
    maps, pads = cap.attention_list()
    assert [m.shape for m in maps] == [(3, 4, 6, 6)] * 2
    assert all(torch.equal(p, pad) for p in pads)
    ref0 = _reference_attention(enc.layers[0].self_attn, x, pad)
    torch.testing.assert_close(maps[0], ref0, atol=1e-5, rtol=1e-5)
    ref1 = _reference_attention(enc.layers[1].self_attn, cap.hidden["layers.0"], pad)
    torch.testing.assert_close(maps[1], ref1, atol=1e-5, rtol=1e-5)
    assert bool((maps[0][2, :, :, 2:] == 0).all())  # padded keys get no attention
    assert maps[0].requires_grad == (mode == "train")
    assert not enc.layers[0].self_attn._forward_pre_hooks  # hooks removed
    assert feature_widths(enc, ["layers.1"], x) == [16]


def test_capture_errors_name_the_module():
    with pytest.raises(ValueError, match="no submodule 'encoder.layer.9'"):
        FeatureCapture(nn.Linear(2, 2), hidden=["encoder.layer.9"])


def test_hf_attentions_by_index_and_by_module():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=3,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 40, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 5:] = 0
    name = "bert.encoder.layer.1.attention.self"
    with FeatureCapture(model, hidden=["bert.encoder.layer.0"], attention=[0, name]) as cap:
        model(input_ids=ids, attention_mask=am)
    maps, _ = cap.attention_list()
    assert maps[0].shape == (2, 2, 7, 7) and maps[1].shape == (2, 2, 7, 7)
    ref = model(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    torch.testing.assert_close(maps[0], ref[0])
    torch.testing.assert_close(maps[1], ref[1])
    assert cap.hidden["bert.encoder.layer.0"].shape == (2, 7, 16)


# ---- teacher -----------------------------------------------------------------------------------
def test_frozen_teacher_and_load_teacher(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    ckpt = {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}
            | {"loss_fn.weight": torch.ones(2)},
            "hyper_parameters": {"lr": 0.1}, "epoch": 3}
    torch.save(ckpt, tmp_path / "teacher.ckpt")
    teacher = load_teacher(tmp_path / "teacher.ckpt",
                           lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5),
                                                 nn.Linear(8, 2)))
    teacher.train()  # what trainer.fit does to every module
    assert not teacher.training and not teacher.module[1].training
    x = torch.randn(3, 4)
    torch.testing.assert_close(teacher(x), net.eval()(x))
    assert not teacher(x).requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher(tmp_path / "missing.ckpt", nn.Identity)


def test_teacher_cache_serves_later_epochs():
    cache = TeacherCache()
    calls = []

    def teacher(i):
        calls.append(i.clone())
        return torch.stack([i.float(), -i.float()], 1)  # (B, 2)

    for _epoch in range(3):
        for idx in (torch.tensor([3, 0, 5]), torch.tensor([1, 2, 4])):
            out = cache.get_or_compute(idx, lambda idx=idx: teacher(idx))
            torch.testing.assert_close(out, torch.stack([idx.float(), -idx.float()], 1))
    assert len(calls) == 2 and len(cache) == 6 and cache.hits == 4
    assert cache.lookup(torch.tensor([5, 9])) is None  # a new example: the teacher must run
    with pytest.raises(ValueError, match="idx"):
        cache.lookup(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="TeacherCache"):
        Distiller(nn.Linear(2, 2), DistillationLoss(hidden=HiddenStateLoss([(2, 2)])),
                  hidden_pairs=[("", "")], cache=cache)


# ---- the plain function with intermediate pairs -----------------------------------------------
class _TinyTransformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        pad = attention_mask == 0
        h = self.encoder(self.emb(input_ids), src_key_padding_mask=pad)
        h = h.masked_fill(pad[..., None], 0).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(h)


def _text_batch(n: int = 4, t: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(n, t, dtype=torch.long)
    am[0, 4:] = 0
    return {"input_ids": torch.randint(0, 30, (n, t), generator=g), "attention_mask": am,
            "labels": torch.randint(0, 3, (n,), generator=g), "idx": torch.arange(n)}


def test_distill_step_hidden_and_attention_pairs():
    torch.manual_seed(0)
    student, teacher = _TinyTransformer(8, 1), _TinyTransformer(16, 2)
    pairs = [("encoder.layers.0", "encoder.layers.1")]
    att = [("encoder.layers.0.self_attn", "encoder.layers.1.self_attn")]
    loss_mod = DistillationLoss(2.0, 0.5, hidden=HiddenStateLoss([(8, 16)]),
                                attention=AttentionLoss())
    d = Distiller(teacher, loss_mod, hidden_pairs=pairs, attention_pairs=att)
    task = lambda out, b: F.cross_entropy(out, b["labels"])
    loss, logs = distill_step(student, d, _text_batch(), task)
    assert set(logs) == {"kd", "task", "hidden", "attention", "loss"}
    total = 0.5 * logs["kd"] + 0.5 * logs["task"] + logs["hidden"] + logs["attention"]
    torch.testing.assert_close(logs["loss"], total)
    loss.backward()
    assert loss_mod.hidden.proj[0].weight.grad is not None
    assert student.encoder.layers[0].self_attn.in_proj_weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="HiddenStateLoss"):
        Distiller(teacher, DistillationLoss(), hidden_pairs=pairs)


# ---- the callback with a LightningModule that knows nothing of qat ---------------------------
class _Plain(pl.LightningModule):
    def __init__(self, d: int = 8, only_net: bool = False) -> None:
        super().__init__()
        self.net = _TinyTransformer(d, 1)
        self.only_net = only_net

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self):
        params = self.net.parameters() if self.only_net else self.parameters()
        return torch.optim.Adam(params, lr=3e-3)


class _Counting(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def _loader(n: int = 16) -> torch.utils.data.DataLoader:
    items = []
    for i in range(n):
        b = _text_batch(1, 6, seed=i)
        items.append({k: v[0] for k, v in b.items()} | {"idx": torch.tensor(i)})
    return torch.utils.data.DataLoader(items, batch_size=4)


def _fit(model: pl.LightningModule, cb: pl.Callback, steps: int, **kw) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], **kw)
    trainer.fit(model, _loader())
    return trainer


def test_callback_distills_into_a_plain_lightning_module():
    torch.manual_seed(0)
    teacher = _Counting(_TinyTransformer(8, 1))
    model = _Plain()
    loss = DistillationLoss(temperature=1.0, alpha=1.0)  # pure distillation
    cb = DistillationCallback(teacher, loss, student="net", cache=TeacherCache())
    batch = next(iter(_loader()))

    def kd_now() -> float:
        with torch.no_grad():
            s = model.net(batch["input_ids"], batch["attention_mask"])
            t = teacher.net(batch["input_ids"], batch["attention_mask"])
        return float(loss(s, t)[0])

    before = kd_now()
    trainer = _fit(model, cb, 40)  # 10 epochs of 4 batches
    assert teacher.calls == 4  # first epoch only: later epochs come from the cache
    assert kd_now() < 0.5 * before
    assert "training_step" not in model.__dict__  # the instance is restored after fit
    assert {"distill/kd", "distill/loss"} <= set(trainer.callback_metrics)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_callback_with_hidden_pairs_trains_the_projection():
    torch.manual_seed(0)
    teacher = _TinyTransformer(12, 2)
    hl = HiddenStateLoss([(8, 12)])
    w0 = hl.proj[0].weight.detach().clone()
    cb = DistillationCallback(
        teacher, DistillationLoss(2.0, 0.5, hidden=hl), student="net",
        hidden_pairs=[("encoder.layers.0", "encoder.layers.1")],
        attention_pairs=[("encoder.layers.0.self_attn", "encoder.layers.1.self_attn")])
    model = _Plain()
    trainer = _fit(model, cb, 4)
    assert model.distill_loss is cb.loss
    assert not torch.equal(hl.proj[0].weight, w0)
    assert {"distill/hidden", "distill/attention"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match="no optimizer"):
        cb2 = DistillationCallback(teacher, DistillationLoss(hidden=HiddenStateLoss([(8, 12)])),
                                   student="net", hidden_pairs=[("encoder.layers.0",
                                                                 "encoder.layers.1")])
        _fit(_Plain(only_net=True), cb2, 1)


# ---- composition with fake quant and pruning ------------------------------------------------
def test_prune_quant_distill_compose_and_convert():
    qat = pytest.importorskip("qat")
    if not hasattr(qat, "prepare") or not hasattr(qat, "convert"):
        pytest.skip("qat.prepare / qat.convert not available yet")
    from qat.prune import OneShotSchedule, PruningCallback, masked_parameters

    torch.manual_seed(0)
    teacher = _TinyTransformer(8, 1)
    model = _Plain()
    model.net.load_state_dict(teacher.state_dict())
    model.net, _ = qat.prepare(model.net)
    attn = model.net.encoder.layers[0].self_attn
    assert isinstance(attn, nn.MultiheadAttention) and type(attn) is not nn.MultiheadAttention
    kd = DistillationCallback(
        teacher, DistillationLoss(2.0, 0.5, attention=AttentionLoss()), student="net",
        attention_pairs=[("encoder.layers.0.self_attn", "encoder.layers.0.self_attn")])
    prune = PruningCallback(OneShotSchedule(0.5, start_step=2), targets=["type:Linear"],
                            module="net")
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[prune, kd])
    trainer.fit(model, _loader())
    assert "distill/attention" in trainer.callback_metrics
    masked = masked_parameters(model.net)
    assert masked and all(bool((p[~m] == 0).all()) for _, p, m in masked)
    converted = qat.convert(copy.deepcopy(model.net))
    for (name, _, m), (name2, q, _) in zip(masked, masked_parameters(converted), strict=True):
        assert name == name2 and bool((q[~m] == 0).all()), name
    b = _text_batch()
    assert torch.isfinite(converted.eval()(b["input_ids"], b["attention_mask"])).all()
