"""Sparse integer checkpoints: bitmask + non-zero codes, exact round trip, sizes counted truly."""

from __future__ import annotations

import io

import pytest
import torch
from test_export import (
    SCHEMES,
    _prune,
    _same_outputs,
    batches,
    build,
    inputs,
    quantized,
    synthetic,
)

import qat
from qat.export import load_int_checkpoint, read_int_weights, save_int_checkpoint
from qat.export.checkpoint import int_state
from qat.export.pack import pack_codes
from qat.export.qweight import IntWeight, quantize_weight
from qat.export.sparse import (
    coded_nbytes,
    decode_codes,
    encode_codes,
    int_weight_nbytes,
    nonzero_bits,
    zero_codes,
)
from qat.nn.base import weight_quantizers
from qat.quant import QuantSpec, freeze
from qat.summary import model_size

pytestmark = pytest.mark.usefixtures("one_thread")


def _roundtrip(iw: IntWeight) -> torch.Tensor:
    entry = encode_codes(iw)
    s = iw.spec
    return decode_codes(entry, zero_codes(iw), s.bits, s.quant_min, s.quant_max,
                        iw.codes.numel(), s.mode == "binary").view(iw.codes.shape)


def _int_weight(spec: QuantSpec, codes: torch.Tensor, zp: torch.Tensor) -> IntWeight:
    rows = zp.numel()
    return IntWeight(codes.int(), torch.ones(rows), zp.int(), spec)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.97, 1.0])
@pytest.mark.parametrize("kind", ["int8_sym", "int4_asym_rows", "int3_group", "ternary",
                                  "uint1", "narrow2"])
def test_codec_roundtrip_is_exact(kind: str, sparsity: float) -> None:
    g = torch.Generator().manual_seed(hash((kind, sparsity)) % 2**31)
    shape = (6, 16)
    if kind == "int8_sym":
        spec = QuantSpec(bits=8, granularity="channel")
        zp = torch.zeros(6)
    elif kind == "int4_asym_rows":  # a zero point per row, including the range's ends
        spec = QuantSpec(bits=4, symmetric=False, granularity="channel", axis=1)
        shape = (16, 6)
        zp = torch.tensor([-8, 7, 0, 3, -1, 5])
    elif kind == "int3_group":
        spec = QuantSpec(bits=3, granularity="group", group_size=8)
        zp = torch.zeros(12)
    elif kind == "ternary":
        spec = QuantSpec(bits=2, mode="ternary", granularity="channel", estimator="ste")
        zp = torch.zeros(6)
    elif kind == "uint1":  # levels {0, 1}: a non-zero code needs no bits
        spec = QuantSpec(bits=1, signed=False, symmetric=False)
        zp = torch.zeros(1)
    else:  # signed 2-bit narrow range: levels {-1, 0, 1}, like ternary
        spec = QuantSpec(bits=2, narrow_range=True)
        zp = torch.zeros(1)
    codes = torch.randint(spec.quant_min, spec.quant_max + 1, shape, generator=g)
    iw = _int_weight(spec, codes, zp)
    zero = zero_codes(iw)
    drop = torch.rand(shape, generator=g) < sparsity
    iw.codes = torch.where(drop, zero, iw.codes).int()
    assert torch.equal(_roundtrip(iw), iw.codes)
    nbytes, encoding = coded_nbytes(iw)
    assert encoding == encode_codes(iw)["encoding"]
    if sparsity >= 0.8 and kind != "uint1":
        assert encoding == "bitmask"
    if kind in ("ternary", "narrow2"):
        assert nonzero_bits(3) == 1 and encoding == "bitmask"  # never larger than 2 bits each


def test_codec_without_zero_level_stays_dense() -> None:
    spec = QuantSpec(bits=1, mode="binary", estimator="ste")
    iw = _int_weight(spec, torch.ones(4, 8), torch.zeros(1))
    assert zero_codes(iw) is None and coded_nbytes(iw) == (4, "dense")
    assert torch.equal(_roundtrip(iw), iw.codes)


SPARSE_SCHEMES = ["w8_channel", "w8_asym", "w4_lsq", "ternary", "w3_group", "w4a4_lsq_plus"]
# (binary weights cannot be pruned: sign(0) = +1; prepare refuses a pruned binary layer)


def _pruned(name: str, scheme: str, sparsity: float = 0.8) -> torch.nn.Module:
    model = build(name)
    _prune(model, sparsity)
    pm = qat.prepare(model, SCHEMES[scheme])[0].eval()
    with torch.no_grad():
        for b in batches(synthetic(64, 2), 32):
            pm(**inputs(b))
    return freeze(pm)


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
@pytest.mark.parametrize("name", ["textcnn", "bilstm"])
def test_sparse_checkpoint_roundtrip_bit_exact(name: str, scheme: str) -> None:
    """Every stored weight comes back as exactly the codes and the dequantized tensor the
    fake-quant model computes with; the restored model's outputs are the same bits."""
    pm = _pruned(name, scheme)
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    stored = read_int_weights(buf)
    for mname, module, pname, q in weight_quantizers(pm):
        key = f"{mname}.{pname}" if mname else pname
        ref = quantize_weight(q, getattr(module, pname))
        assert torch.equal(stored[key].codes, ref.codes), key
        assert torch.equal(stored[key].dequantize(), q(getattr(module, pname)).detach()), key
    encodings = {k: e["encoding"] for k, e in int_state(pm)["weights"].items()}
    if scheme != "w4a4_lsq_plus":  # LSQ+ has no exact zero level: always dense
        assert encodings["classifier.weight"] == "bitmask", encodings
    loaded = load_int_checkpoint(buf, qat.prepare(build(name), SCHEMES[scheme])[0])
    for mname, _module, pname, _ in weight_quantizers(pm):
        key = f"{mname}.{pname}" if mname else pname
        assert torch.equal(loaded.get_submodule(mname).get_parameter(pname),
                           stored[key].dequantize()), key
    _same_outputs(pm, loaded, synthetic(64, 5))


def test_pruned_checkpoint_is_smaller_and_model_size_agrees() -> None:
    """80 % pruned int8 weights: bitmask (1/8 byte) + 20 % of the codes, about 0.33 of dense;
    model_size counts each weight exactly as the checkpoint stores it."""
    dense, sparse = quantized("textcnn", "w8_channel"), _pruned("textcnn", "w8_channel")
    a, b = int_state(dense)["weights"], int_state(sparse)["weights"]
    for key in ("convs.0.weight", "classifier.weight"):
        full = a[key]["packed"].numel()
        small = b[key]["packed"].numel() + b[key]["mask"].numel()
        assert b[key]["encoding"] == "bitmask" and small < 0.36 * full, (key, small, full)
    for pm, entries in ((dense, a), (sparse, b)):
        payload = sum(e["packed"].numel() + (e["mask"].numel() if "mask" in e else 0)
                      + 5 * e["scale"].numel() for e in entries.values())
        floats = sum(p.numel() * 4 for n, p in pm.named_parameters()
                     if n not in entries and "_quant." not in n)
        assert model_size(pm) == payload + floats
    assert model_size(sparse) < 0.8 * model_size(dense)  # the embedding is not pruned here


def test_int_weight_nbytes_counts_rows() -> None:
    spec = QuantSpec(bits=4, granularity="channel")
    iw = _int_weight(spec, torch.zeros(10, 32), torch.zeros(10))  # all zero: mask only
    assert coded_nbytes(iw) == (40, "bitmask") and int_weight_nbytes(iw) == 40 + 50


def test_version1_dense_checkpoint_still_loads() -> None:
    pm = _pruned("textcnn", "w4_lsq")
    state = int_state(pm)
    state["version"] = 1
    slots = {f"{m}.{p}": (mod, p, q) for m, mod, p, q in weight_quantizers(pm)}
    for key, entry in state["weights"].items():  # the version-1 layout: dense codes only
        module, pname, q = slots[key]
        iw = quantize_weight(q, getattr(module, pname))
        for k in ("encoding", "mask", "nnz"):
            entry.pop(k, None)
        entry["packed"] = pack_codes(iw.codes, iw.spec.bits, iw.spec.quant_min)
    buf = io.BytesIO()
    torch.save(state, buf)
    loaded = load_int_checkpoint(buf, qat.prepare(build("textcnn"), SCHEMES["w4_lsq"])[0])
    _same_outputs(pm, loaded, synthetic(32, 5))


def test_malformed_bitmask_is_a_clear_error() -> None:
    pm = _pruned("textcnn", "w8_channel")
    state = int_state(pm)
    state["weights"]["classifier.weight"]["nnz"] += 1
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(ValueError, match="classifier.weight.*malformed.*non-zero"):
        read_int_weights(buf)
