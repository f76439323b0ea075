"""Sparse integer weights: a bitmask of the non-zero codes plus the packed non-zero codes.

A pruned weight's codes are mostly its *zero code* (the code whose value is exactly 0: the row's
zero point for fixed-scale and LSQ int weights, level 0 for ternary). :func:`encode_codes`
stores the codes in whichever of two encodings is smaller:

- ``dense``: every code packed at ``bits`` bits (:func:`~qat.export.pack.pack_codes`);
- ``bitmask``: ``ceil(n / 8)`` bytes with bit ``i`` set where code ``i`` is not the zero code
  (little-endian, as ``pack_codes`` at 1 bit), then the non-zero codes in order, each as its
  rank among the levels *other than* the zero code, packed at ``ceil(log2(levels - 1))`` bits:
  an int-b code keeps b bits (``2**b - 1`` levels remain), a ternary code needs 1 bit (the sign).

Weights without an exact zero level (binary; LSQ+, whose zero is a float offset) stay dense.
:func:`decode_codes` restores exactly the codes that were encoded. :func:`int_weight_nbytes` is
the size :func:`qat.summary.model_size` counts for one quantized weight: the coded payload plus
a float32 scale and an 8-bit zero point per row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..quant import functional as F
from .pack import pack_codes, packed_nbytes, unpack_codes
from .qweight import IntWeight

__all__ = ["ENCODINGS", "zero_codes", "nonzero_bits", "coded_nbytes", "encode_codes",
           "decode_codes", "int_weight_nbytes", "ROW_BYTES"]

ENCODINGS = ("dense", "bitmask")
ROW_BYTES = 5  # a float32 scale and an 8-bit zero point per row


def nonzero_bits(levels: int) -> int:
    """Bits per non-zero code: the rank among ``levels - 1`` levels (0 when only one is left)."""
    return math.ceil(math.log2(levels - 1)) if levels > 2 else 0


def _levels(iw: IntWeight) -> int:
    return iw.spec.quant_max - iw.spec.quant_min + 1


def zero_codes(iw: IntWeight) -> Tensor | None:
    """The zero code of every element (shaped like the codes), or None when the format has no
    exact zero level (binary, LSQ+)."""
    spec = iw.spec
    if spec.mode == "binary" or iw.offset is not None:
        return None
    if spec.mode == "ternary":
        return torch.zeros_like(iw.codes)
    zp = iw.zero_point.to(iw.codes.dtype)
    if spec.granularity == "tensor":
        return zp.reshape(()).expand_as(iw.codes)
    rows = F.to_rows(iw.codes, spec)  # (rows, elements)
    full = zp[:, None].expand_as(rows)
    return F.from_rows(full, iw.codes, spec) if spec.granularity == "channel" else \
        full.reshape(iw.codes.shape)


def _sparse_nbytes(numel: int, nnz: int, nz_bits: int) -> int:
    return packed_nbytes(numel, 1) + (packed_nbytes(nnz, nz_bits) if nz_bits else 0)


def coded_nbytes(iw: IntWeight, nnz: int | None = None) -> tuple[int, str]:
    """Bytes of the smaller encoding of ``iw``'s codes, and its name. ``nnz``: count this many
    non-zero codes instead of counting them (an upper bound gives an upper bound)."""
    n = iw.codes.numel()
    dense = packed_nbytes(n, iw.spec.bits)
    zero = zero_codes(iw)
    if zero is None:
        return dense, "dense"
    if nnz is None:
        nnz = int((iw.codes != zero).sum())
    sparse = _sparse_nbytes(n, nnz, nonzero_bits(_levels(iw)))
    return (sparse, "bitmask") if sparse < dense else (dense, "dense")


def int_weight_nbytes(iw: IntWeight, nnz: int | None = None) -> int:
    """Storage of one quantized weight: coded payload plus :data:`ROW_BYTES` per row (``nnz``:
    as in :func:`coded_nbytes`)."""
    return coded_nbytes(iw, nnz)[0] + iw.scale.numel() * ROW_BYTES


def encode_codes(iw: IntWeight) -> dict[str, Any]:
    """The codes of ``iw`` as checkpoint fields: ``encoding``, ``packed`` and (bitmask) ``mask``
    and ``nnz``."""
    spec = iw.spec
    binary = spec.mode == "binary"
    _, encoding = coded_nbytes(iw)
    if encoding == "dense":
        return {"encoding": "dense", "packed": pack_codes(iw.codes, spec.bits, spec.quant_min,
                                                          binary=binary)}
    zero = zero_codes(iw).reshape(-1).to(torch.int64)
    flat = iw.codes.reshape(-1).to(torch.int64)
    keep = flat != zero
    u = flat[keep] - spec.quant_min  # level index, 0 .. levels-1
    z = zero[keep] - spec.quant_min
    rank = u - (u > z).to(torch.int64)  # the zero level removed: 0 .. levels-2
    nz_bits = nonzero_bits(_levels(iw))
    values = pack_codes(rank, nz_bits, 0) if nz_bits else torch.zeros(0, dtype=torch.uint8)
    return {"encoding": "bitmask", "mask": pack_codes(keep.to(torch.int64), 1, 0),
            "packed": values, "nnz": int(keep.sum())}


def decode_codes(entry: dict[str, Any], zero: Tensor | None, spec_bits: int, qmin: int,
                 qmax: int, numel: int, binary: bool) -> Tensor:
    """Inverse of :func:`encode_codes`: the flat int32 codes. ``zero``: the zero code of every
    element (flat), needed for the bitmask encoding."""
    encoding = entry.get("encoding", "dense")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not supported: allowed {list(ENCODINGS)}")
    if encoding == "dense":
        return unpack_codes(entry["packed"], spec_bits, numel, qmin, binary)
    if zero is None:
        raise ValueError("a bitmask-encoded weight needs a format with a zero level")
    keep = unpack_codes(entry["mask"], 1, numel, 0).bool()
    nnz = int(entry["nnz"])
    if int(keep.sum()) != nnz:
        raise ValueError(f"bitmask marks {int(keep.sum())} non-zero codes, expected {nnz}")
    nz_bits = nonzero_bits(qmax - qmin + 1)
    zero = zero.reshape(-1).to(torch.int64)
    z = zero[keep] - qmin
    rank = unpack_codes(entry["packed"], nz_bits, nnz, 0).to(torch.int64) if nz_bits else \
        torch.zeros(nnz, dtype=torch.int64)
    u = rank + (rank >= z).to(torch.int64)  # the zero level put back
    codes = zero.clone()
    codes[keep] = u + qmin
    return codes.to(torch.int32)
