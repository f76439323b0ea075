"""DataModules: the batch contract, splits, limits, samplers, MNLI's two sets, checkpoint state."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from qat.data import GlueDataModule, NewsgroupsDataModule
from qat.data.batching import BucketBatchSampler, Collator, SortedBatchSampler
from qat.data.glue import load_glue_split
from qat.data.vocab import tokenize


def _check_padding(batch: dict, ids_key: str, mask_key: str, pad_id: int) -> None:
    ids, mask = batch[ids_key], batch[mask_key]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
    assert torch.all(ids[mask == 0] == pad_id)
    lengths = mask.sum(1)
    assert int(lengths.max()) == ids.shape[1]  # padded to the longest in the batch
    assert torch.all(mask == (torch.arange(ids.shape[1])[None] < lengths[:, None]).long())


def test_sst2_word_batches(data_dir: Path) -> None:
    dm = GlueDataModule("sst2", data_dir=str(data_dir), batch_size=16, limit_train=300,
                        limit_eval=50, max_length=12, download=False, val_fraction=0.0)
    dm.setup("fit")
    assert (dm.num_labels, dm.is_regression, dm.is_pair, dm.task_name) == (2, False, False, "sst2")
    assert dm.label_names == ["0", "1"] and dm.pad_id == 0 and dm.vocab_size == len(dm.vocab)
    assert dm.val_names == ["dev"] and dm.test_names == ["dev"] and dm.predict_names == ["test"]
    train = load_glue_split("sst2", "train", data_dir, download=False)
    batches = list(dm.train_dataloader())
    assert sum(len(b["idx"]) for b in batches) == 300
    seen = torch.cat([b["idx"] for b in batches])
    assert len(set(seen.tolist())) == 300
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels", "idx"}
    _check_padding(b, "input_ids", "attention_mask", dm.pad_id)
    assert b["labels"].dtype == torch.long and b["input_ids"].shape[1] <= 12
    for row, i in enumerate(b["idx"].tolist()):  # idx points at the source row
        n = int(b["attention_mask"][row].sum())
        expect = [dm.vocab.stoi.get(t, 1) for t in tokenize(train.texts_a[i])][:11]
        assert b["input_ids"][row, :n].tolist() == [dm.vocab.cls_id, *expect]
        assert int(b["labels"][row]) == train.labels[i]
    val = list(dm.val_dataloader())
    assert sum(len(x["idx"]) for x in val) == 50
    pred = next(iter(dm.predict_dataloader()))
    assert "labels" not in pred and pred["idx"].dtype == torch.long


def test_mrpc_word_pair_batches(data_dir: Path) -> None:
    dm = GlueDataModule("mrpc", data_dir=str(data_dir), batch_size=8, limit_train=64,
                        download=False)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert {"input_ids_a", "attention_mask_a", "input_ids_b", "attention_mask_b",
            "token_type_ids"} <= set(b)
    for suffix in ("", "_a", "_b"):
        _check_padding(b, "input_ids" + suffix, "attention_mask" + suffix, dm.pad_id)
    v = dm.vocab
    for r in range(len(b["idx"])):
        a = b["input_ids_a"][r][b["attention_mask_a"][r].bool()].tolist()
        s = b["input_ids_b"][r][b["attention_mask_b"][r].bool()].tolist()
        joint = b["input_ids"][r][b["attention_mask"][r].bool()].tolist()
        assert joint == [v.cls_id, *a, v.sep_id, *s]  # short pairs: nothing truncated
        types = b["token_type_ids"][r][: len(joint)].tolist()
        assert types == [0] * (len(a) + 2) + [1] * len(s)


def test_stsb_minilm_regression(data_dir: Path) -> None:
    dm = GlueDataModule("stsb", data_dir=str(data_dir), tokenizer="minilm", batch_size=4,
                        limit_train=20, limit_eval=8, max_length=32, download=False)
    dm.setup()
    assert dm.num_labels == 1 and dm.is_regression and dm.vocab_size == 30522
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert b["labels"].dtype == torch.float32 and b["input_ids"][:, 0].eq(101).all()
    _check_padding(b, "input_ids", "attention_mask", dm.pad_id)
    assert dm.state_dict() == {}
    m = dm.metrics()
    assert set(m.keys()) == {"pearson", "spearman"}


def test_mnli_two_eval_sets(tmp_path: Path, glue_layout) -> None:
    glue_layout(tmp_path, "MNLI", n=9)
    dm = GlueDataModule("mnli", data_dir=str(tmp_path), batch_size=4, download=False,
                        val_fraction=0.0)
    dm.setup()
    assert dm.val_names == ["dev_matched", "dev_mismatched"] == dm.test_names
    assert dm.predict_names == ["test_matched", "test_mismatched"]
    val = dm.val_dataloader()
    assert isinstance(val, list) and [len(v.dataset) for v in val] == [9, 12]
    pred = dm.predict_dataloader()
    assert [len(p.dataset) for p in pred] == [8, 7]
    assert "labels" not in next(iter(pred[1]))
    assert dm.task_info.eval_names == ("matched", "mismatched")
    carved = GlueDataModule("mnli", data_dir=str(tmp_path), val_fraction=0.34, download=False)
    carved.setup()
    assert carved.val_names == ["val"] and carved.test_names == ["dev_matched", "dev_mismatched"]
    default = GlueDataModule("mnli", data_dir=str(tmp_path), download=False)
    default.setup()  # by default models are selected on a split of train, reported on dev
    assert default.val_fraction == 0.1 and default.val_names == ["val"]
    assert default.test_names == ["dev_matched", "dev_mismatched"]
    assert len(carved.dataset("train")) + len(carved.dataset("val")) == 9


def test_newsgroups_split_and_describe(data_dir: Path) -> None:
    dm = NewsgroupsDataModule(data_dir=str(data_dir), remove=["quotes", "headers"],
                              max_length=64, download=False)
    dm.setup()
    assert dm.num_labels == 20 and len(dm.label_names) == 20
    tr, va = dm.splits["train"][0], dm.splits["val"][0]
    assert len(tr) + len(va) == 11314 and not set(tr.idx) & set(va.idx)
    assert len(dm.splits["test"][0]) == 7532
    counts, full = Counter(va.labels), Counter(tr.labels + va.labels)
    for c in range(20):  # stratified: 10 % of every class
        assert counts[c] == round(0.1 * full[c])
    d = dm.describe()
    assert d["remove"] == ["headers", "quotes"] and d["sizes"]["val"] == {"val": len(va)}
    assert d["tokenizer"] == "word" and "stratified" in d["val_split"]
    assert dm.hparams["remove"] == ["quotes", "headers"] and dm.hparams["max_length"] == 64
    same = NewsgroupsDataModule(data_dir=str(data_dir), limit_train=100, download=False)
    same.setup()
    assert set(same.splits["val"][0].idx) == set(va.idx)  # the split depends on the seed only
    assert len(same.splits["train"][0]) == 100
    assert set(same.splits["train"][0].idx) <= set(tr.idx)
    assert set(dm.metrics().keys()) == {"accuracy", "macro_f1"}


def test_bucket_sampler_deterministic_and_sorted() -> None:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    s1 = BucketBatchSampler.from_lengths(lengths, 10, seed=3, bucket_batches=20)
    s2 = BucketBatchSampler.from_lengths(lengths, 10, seed=3, bucket_batches=20)
    e0, e0b = list(s1), list(s2)
    assert e0 == e0b and len(e0) == len(s1) == 100
    assert sorted(i for b in e0 for i in b) == list(range(1000))
    e1 = list(s1)  # the next epoch differs
    assert e1 != e0
    s2.set_epoch(1)
    assert list(s2) == e1
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in e0) / 100
    assert spread < 20  # random batches of 10 would spread ~160
    s3 = BucketBatchSampler.from_lengths(lengths[:95], 10, drop_last=True)
    assert len(s3) == len(list(s3)) == 9
    ev = list(SortedBatchSampler.from_lengths(lengths, 64))
    flat = [lengths[i] for b in ev for i in b]
    assert flat == sorted(lengths, reverse=True) and len(ev) == 16


def test_collator_without_labels_and_float_labels() -> None:
    c = Collator(pad_id=7, regression=True)
    b = c([{"input_ids": [1, 2, 3], "labels": 0.5, "idx": 4},
           {"input_ids": [5], "labels": 2.0, "idx": 9}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, 7, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].dtype == torch.float32 and b["idx"].tolist() == [4, 9]
    assert "labels" not in c([{"input_ids": [1], "idx": 0}])


def test_state_dict_roundtrip(data_dir: Path) -> None:
    a = GlueDataModule("rte", data_dir=str(data_dir), limit_train=200, download=False)
    a.setup()
    b = GlueDataModule("rte", data_dir=str(data_dir), limit_train=50, download=False)
    b.setup()
    before = b.dataset("val")
    assert b.vocab != a.vocab
    b.load_state_dict(a.state_dict())
    assert b.vocab == a.vocab and b.vocab_size == a.vocab_size
    after = b.dataset("val")
    assert after is not before and after.features == a.dataset("val").features
    c = GlueDataModule("rte", data_dir=str(data_dir), limit_train=50, download=False)
    c.load_state_dict(a.state_dict())  # before setup: setup keeps the loaded vocabulary
    c.setup()
    assert c.vocab == a.vocab
    hf = GlueDataModule("rte", data_dir=str(data_dir), tokenizer="minilm", download=False)
    with pytest.raises(ValueError, match="word vocabulary"):
        hf.load_state_dict(a.state_dict())


def test_lightning_fit_predict_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    import warnings

    import lightning as L

    from qat.data import write_glue_predictions
    from qat.models import EmbeddingBagMLP

    class Tiny(L.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.net = EmbeddingBagMLP(vocab_size, 2, embed_dim=8, hidden_sizes=())
            self.seen: dict[int, list[list[int]]] = {}

        def training_step(self, batch, _):
            self.seen.setdefault(self.current_epoch, []).append(batch.pop("idx").tolist())
            y = batch.pop("labels")
            return torch.nn.functional.cross_entropy(self.net(**batch), y)

        def predict_step(self, batch, _):
            idx = batch.pop("idx")
            return idx, self.net(**batch).argmax(-1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = GlueDataModule("wnli", data_dir=str(data_dir), limit_train=40, batch_size=16,
                        bucket_batches=1, download=False)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    dm.setup()
    model = Tiny(dm.vocab_size)
    trainer.fit(model, datamodule=dm)
    lengths = dm.dataset("train").lengths()
    for epoch in (0, 1):  # Lightning sets the epoch: the order is reproducible
        sampler = BucketBatchSampler.from_lengths(lengths, 16, seed=0, bucket_batches=1)
        sampler.set_epoch(epoch)
        ids = dm.dataset("train").idx
        assert model.seen[epoch] == [[ids[i] for i in b] for b in sampler]
    assert model.seen[0] != model.seen[1]
    # resuming after epoch 0 replays epoch 1 in the same order (Lightning calls set_epoch)
    first = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=tmp_path)
    dm0 = GlueDataModule("wnli", data_dir=str(data_dir), limit_train=40, batch_size=16,
                         bucket_batches=1, download=False)
    first.fit(Tiny(dm.vocab_size), datamodule=dm0)
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    dm1 = GlueDataModule("wnli", data_dir=str(data_dir), limit_train=40, batch_size=16,
                         bucket_batches=1, download=False)
    resumed = Tiny(dm.vocab_size)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
              ).fit(resumed, datamodule=dm1, ckpt_path=tmp_path / "epoch0.ckpt")
    assert resumed.seen == {1: model.seen[1]}
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["GlueDataModule"]["vocab"]["itos"] == dm.vocab.itos
    fresh = GlueDataModule("wnli", data_dir=str(data_dir), limit_train=8, download=False)
    fresh.load_state_dict(state["GlueDataModule"])
    fresh.setup()
    assert fresh.vocab == dm.vocab
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = trainer.predict(model, datamodule=dm)
    assert not [w for w in caught if "batch sampler" in str(w.message)]
    idx = torch.cat([o[0] for o in out])
    preds = torch.cat([o[1] for o in out])
    path = write_glue_predictions("wnli", idx, preds, tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 147 and lines[1].startswith("0\t") and lines[-1].startswith("145\t")


def test_constructor_validation(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        GlueDataModule("sst2", batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        NewsgroupsDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        GlueDataModule("sst2", val_fraction=1.5)
    with pytest.raises(ValueError, match="not a GLUE task"):
        GlueDataModule("20ng")
    with pytest.raises(ValueError, match="valid tasks"):
        GlueDataModule("nope")
    with pytest.raises(ValueError, match="remove"):
        NewsgroupsDataModule(remove=["header"])
    with pytest.raises(RuntimeError, match="setup"):
        _ = GlueDataModule("sst2").vocab_size
