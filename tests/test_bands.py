"""Frequency bands of an embedding (qat.auto.bands): lookups, dropped rows, formats per band,
sizes, autoquant over bands, the integer checkpoint and ONNX of a banded model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import load_script
from test_export import CLASSES, VOCAB, batches, build, inputs, synthetic, train
from torch import nn

import qat
from qat.auto import AutoQuantCallback, autoquant
from qat.auto.bands import BandedEmbedding, band_embedding, check_bands
from qat.export import load_int_checkpoint, save_int_checkpoint  # noqa: I001
from qat.nn.base import weight_quantizers
from qat.quant.control import freeze
from qat.summary import model_size

pytestmark = pytest.mark.usefixtures("one_thread")
BOUNDS = [24, 44]  # the synthetic task's marker tokens are ids 1-20: all in band 0


def _emb(n: int = VOCAB, dim: int = 6) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(n, dim, padding_idx=0)


def test_one_band_over_every_row_is_the_embedding() -> None:
    emb = _emb()
    banded = BandedEmbedding.from_embedding(emb, [VOCAB])
    ids = torch.randint(0, VOCAB, (3, 7))
    assert torch.equal(banded(ids), emb(ids))
    banded(ids).square().sum().backward()
    emb(ids).square().sum().backward()
    assert torch.equal(banded.bands[0].weight.grad, emb.weight.grad)


def test_bands_look_up_their_rows_and_dropped_rows_embed_to_zero() -> None:
    emb = _emb()
    banded = BandedEmbedding.from_embedding(emb, BOUNDS)
    assert [b.num_embeddings for b in banded.bands] == [24, 20]
    assert banded.bands[0].padding_idx == 0 and banded.bands[1].padding_idx is None
    ids = torch.arange(VOCAB).reshape(2, -1)  # (2, 30): every id once
    out = banded(ids)  # (2, 30, 6)
    flat = out.reshape(VOCAB, -1)
    assert torch.equal(flat[:44], emb.weight[:44].detach())
    assert not flat[44:].any()
    flat.sum().backward()
    g0, g1 = banded.bands[0].weight.grad, banded.bands[1].weight.grad
    assert not g0[0].any() and (g0[1:] == 1).all() and (g1 == 1).all()  # padding row: no grad


@pytest.mark.parametrize("bounds", [[], [0], [30, 30], [40, 20], [-3], [2.5], "10"])
def test_bad_bounds_are_one_clear_error(bounds) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="bounds=.* is invalid"):
        BandedEmbedding.from_embedding(_emb(), bounds)


def test_band_embedding_checks_the_module() -> None:
    model = build("textcnn")
    with pytest.raises(ValueError, match="has no such module"):
        band_embedding(model, "embed", BOUNDS)
    with pytest.raises(ValueError, match="is a Conv1d, not an nn.Embedding"):
        band_embedding(model, "convs.0", BOUNDS)
    cut = band_embedding(model, "embedding", [10, 60, 100], inplace=False).embedding
    assert cut.bounds == [10, 60] and len(cut.bands) == 2  # past the vocabulary: left out
    with pytest.raises(ValueError, match="embedding_bands=.* is invalid"):
        check_bands({"rows": [1]})
    copy_ = band_embedding(model, "embedding", BOUNDS, inplace=False)
    assert isinstance(copy_.embedding, BandedEmbedding) and type(model.embedding) is nn.Embedding
    assert band_embedding(copy_, "embedding", BOUNDS) is copy_  # banded already: unchanged
    with pytest.raises(ValueError, match="banded at"):
        band_embedding(copy_, "embedding", [10, 20])


def _bits(model: nn.Module) -> dict[str, tuple[int, str]]:
    return {f"{m}.{p}": (q.spec.bits, q.spec.mode) for m, _, p, q in weight_quantizers(model)}


def _banded_textcnn() -> tuple[nn.Module, nn.Module]:
    float_model = build("textcnn")
    train(float_model, 15)
    return float_model.eval(), band_embedding(float_model, "embedding", BOUNDS, inplace=False)


PER_BAND = {"weight": {"bits": 8, "granularity": "tensor"},
            "overrides": {"embedding.bands.0": {"weight": {"bits": 4}},
                          "embedding.bands.1": {"weight": {"bits": 2, "mode": "ternary"}}}}


def test_each_band_takes_its_own_format_and_size_counts_kept_rows_only() -> None:
    float_model, banded = _banded_textcnn()
    pm = qat.prepare(banded, PER_BAND)[0]
    bits = _bits(pm)
    assert bits["embedding.bands.0.weight"] == (4, "int")
    assert bits["embedding.bands.1.weight"] == (2, "ternary")
    whole = qat.prepare(float_model, {"weight": {"bits": 8, "granularity": "tensor"}})[0]
    emb_bytes = VOCAB * 16  # the 8-bit table of the unbanded model (16 dims)
    assert model_size(whole) - model_size(pm) > emb_bytes - (24 * 16 // 2 + 20 * 16 // 4 + 2 * 5)
    # the quantized bands compute what the fake quant of each band's rows gives
    pm.eval()
    ids = torch.arange(VOCAB)[None]
    out = pm.embedding(ids)[0]
    b0 = pm.embedding.bands[0]
    assert torch.equal(out[:24], b0.weight_quant(b0.weight).detach())
    assert not out[44:].any()


def test_autoquant_over_bands_meets_a_budget_of_the_whole_float_model() -> None:
    float_model, banded = _banded_textcnn()
    calib = batches(synthetic(64, 3), 32)
    ref = model_size(float_model)
    config, report = autoquant(banded, calib, budget=0.25, calibration_batches=2,
                               config={"weight": {"granularity": "tensor"}}, float_bytes=ref)
    pm = qat.prepare(banded, config)[0]
    assert model_size(pm) == report.predicted_bytes <= 0.25 * ref
    assert report.float_bytes == ref
    assert {"embedding.bands.0", "embedding.bands.1"} <= {n for r in report.rows for n in r.layers}
    with pytest.raises(ValueError, match="float_bytes=0 is invalid"):
        autoquant(banded, calib, budget=0.25, calibration_batches=1, float_bytes=0)


def test_callback_bands_before_allocating_and_preparing() -> None:
    float_model, _ = _banded_textcnn()
    calib = batches(synthetic(64, 3), 32)
    cb = AutoQuantCallback(budget=0.2, calibration_batches=1,
                           weight={"bits": 8, "granularity": "tensor"},
                           embedding_bands={"module": "embedding", "bounds": BOUNDS})
    report = cb.allocate(float_model, calib)
    assert type(float_model.embedding) is nn.Embedding  # allocation works on a banded copy
    assert report.float_bytes == model_size(float_model)

    class Holder(nn.Module):  # what prepare() sees: a LightningModule with .model
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.model = m

    holder = Holder(copy.deepcopy(float_model))
    pm = cb.prepare(holder)
    assert isinstance(pm.embedding, BandedEmbedding)
    assert model_size(pm) <= 0.2 * model_size(float_model)
    with pytest.raises(ValueError, match="embedding_bands=.* is invalid"):
        AutoQuantCallback(embedding_bands={"bounds": [10], "rows": 3})
    fixed = AutoQuantCallback(budget=None, **PER_BAND,
                              embedding_bands={"module": "embedding", "bounds": BOUNDS})
    assert fixed.allocated and _bits(fixed.prepare(Holder(copy.deepcopy(float_model))))[
        "embedding.bands.1.weight"] == (2, "ternary")


def test_integer_checkpoint_and_onnx_of_a_banded_model() -> None:
    from test_export_onnx import compare_predictions, ort_predict, torch_predict

    from qat.export import export_onnx, make_session

    float_model, banded = _banded_textcnn()
    pm = qat.prepare(banded, PER_BAND)[0]
    train(pm, 5, seed=1)
    pm.eval()
    freeze(pm)
    data = batches(synthetic(64, 9), 32)
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf, float_model=float_model)
    buf.seek(0)
    stored = torch.load(buf, weights_only=True)["weights"]
    assert {k: v["numel"] for k, v in stored.items() if k.startswith("embedding")} == {
        "embedding.bands.0.weight": 24 * 16, "embedding.bands.1.weight": 20 * 16}
    buf.seek(0)
    skeleton = qat.prepare(band_embedding(build("textcnn"), "embedding", BOUNDS), PER_BAND)[0]
    loaded = load_int_checkpoint(buf, skeleton)
    with torch.no_grad():
        for b in data:
            assert torch.equal(loaded(**inputs(b)), pm(**inputs(b)))
    example = {k: v[:2] for k, v in synthetic(2, 0).items() if k == "input_ids"}
    proto = export_onnx(pm, example, io.BytesIO())
    a = compare_predictions(torch_predict(pm, ["input_ids"]),
                            ort_predict(make_session(proto, threads=1)), data)
    assert a.agree >= 0.99 and CLASSES == 4, str(a)


def test_probe_bands_plans() -> None:
    """scripts/probe_bands.py: rows kept by frequency rank or norm, bands quantized."""
    probe = load_script("qat_probe_bands", "probe_bands.py")
    table = torch.randn(10, 4)
    table[7] *= 100  # a rare row of large norm
    kept = probe.apply_plan(table, "float:5")
    assert torch.equal(kept[:5], table[:5]) and not kept[5:].any()
    by_norm = probe.apply_plan(table, "norm:1")
    assert torch.equal(by_norm[7], table[7]) and by_norm.count_nonzero() == 4
    mixed = probe.apply_plan(table, "4:3,2:6")
    assert len(mixed[:3].unique()) <= 15 and len(mixed[3:6].unique()) <= 3
    assert not mixed[6:].any()
