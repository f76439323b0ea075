"""Bit packing of integer weight codes: any width from 1 to 8 bits, little-endian within a byte.

Codes are first mapped to unsigned values ``u = code - qmin`` (so int4 codes in [-8, 7] become
[0, 15], ternary levels {-1, 0, 1} become {0, 1, 2} and binary levels {-1, 1} become {0, 2},
stored as {0, 1} with ``binary=True``). ``bits`` codes then take ``ceil(n * bits / 8)`` bytes:
int4 packs two codes per byte, ternary (2 bits) four and binary eight.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes"]


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is invalid: allowed an integer from 1 to 8")


def pack_codes(codes: Tensor, bits: int, qmin: int, binary: bool = False) -> Tensor:
    """Pack integer ``codes`` (any shape, values in [qmin, qmin + 2**bits - 1]) into uint8.

    ``binary``: codes are -1 / +1 (one bit each: 0 for -1, 1 for +1).
    """
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    u = (flat + 1) // 2 if binary else flat - qmin
    if flat.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing from qmin={qmin}: "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return u.to(torch.uint8)
    n = u.numel()
    shifts = torch.arange(bits, dtype=torch.int64)
    bitplane = (u[:, None] >> shifts) & 1  # (n, bits): bit j of every code
    stream = bitplane.reshape(-1)  # (n * bits,) little-endian bit stream
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    packed = (stream.view(-1, 8) * weights).sum(dim=1)  # (n * bits + pad,) -> (bytes, 8)
    assert packed.numel() == packed_nbytes(n, bits)
    return packed.to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int, qmin: int,
                 binary: bool = False) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, as a flat int32 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"packed codes hold {packed.numel()} bytes, expected {need} for "
                         f"{numel} codes of {bits} bits")
    p = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        u = p
    else:
        stream = (p[:, None] >> torch.arange(8, dtype=torch.int64)) & 1  # (bytes, 8)
        stream = stream.reshape(-1)[: numel * bits].view(numel, bits)  # (n*bits,) -> (n, bits)
        u = (stream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
    u = u[:numel]
    codes = u * 2 - 1 if binary else u + qmin
    return codes.to(torch.int32)
