"""Integer checkpoints: packed weight codes, their scales, and the float rest of the model.

File layout (``torch.save`` of plain containers and tensors, so ``torch.load(...,
weights_only=True)`` reads it)::

    {"format": "qat.int_checkpoint", "version": 2,
     "weights": {"<module>.<param>": {"encoding": "dense" | "bitmask", "packed": uint8,
                                       "mask": uint8 and "nnz" (bitmask only),
                                       "bits", "shape", "numel", "binary",
                                       "qmin", "scale": float32 (rows,),
                                       "zero_point": int16 (rows,) or None (all zero),
                                       "offset": float32 (rows,) or None (only LSQ+ files
                                                  of older versions),
                                       "spec": QuantSpec fields}},
     "float": {state_dict entries that are not quantized weights nor weight-quantizer state:
               biases, norms, activation quantizers (scales, zero points, flags), masks}}

A pruned weight is stored as a bitmask of its non-zero codes plus the packed non-zero codes when
that is smaller (:mod:`qat.export.sparse`); version-1 files (always dense) still load.

:func:`load_int_checkpoint` rebuilds the inference model: a prepared skeleton whose quantized
weights become the dequantized codes and whose weight quantizers are removed (as
:func:`qat.convert` does); activation quantizers keep their state with observers off. The result
computes exactly what the fake-quant model computes in eval mode with frozen observers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.base import quant_layers
from ..quant.control import disable_observers
from ..quant.fake_quantizer import FakeQuantizer
from ..quant.spec import QuantSpec
from .qweight import IntWeight, quantize_weight, weight_quantizers
from .sparse import decode_codes, encode_codes, zero_codes

__all__ = [
    "FORMAT",
    "CheckpointSize",
    "int_state",
    "save_int_checkpoint",
    "load_int_checkpoint",
    "float_checkpoint_bytes",
    "checkpoint_size",
    "read_int_weights",
]

FORMAT = "qat.int_checkpoint"
VERSION = 2
READABLE = (1, 2)  # version 1: every weight dense


@dataclass
class CheckpointSize:
    """Bytes of the integer checkpoint and of the float checkpoint (``torch.save`` of the float
    state_dict); ``ratio`` = int / float."""

    int_bytes: int
    float_bytes: int

    @property
    def ratio(self) -> float:
        return self.int_bytes / self.float_bytes

    def __str__(self) -> str:
        return (f"integer checkpoint {self.int_bytes / 2**20:.3f} MB vs float "
                f"{self.float_bytes / 2**20:.3f} MB ({self.ratio:.3f}x)")


def _encode(iw: IntWeight) -> dict[str, Any]:
    off = None if iw.offset is None else iw.offset.cpu()  # the file holds CPU tensors
    iw = IntWeight(iw.codes.cpu(), iw.scale.cpu(), iw.zero_point.cpu(), iw.spec, off)
    spec = iw.spec
    binary = spec.mode == "binary"
    zp = iw.zero_point
    return {
        **encode_codes(iw),
        "bits": spec.bits,
        "shape": list(iw.codes.shape),
        "numel": iw.codes.numel(),
        "binary": binary,
        "qmin": spec.quant_min,
        "scale": iw.scale.float().contiguous(),
        "zero_point": zp.to(torch.int16) if bool((zp != 0).any()) else None,
        "offset": None if iw.offset is None else iw.offset.float().contiguous(),
        "spec": spec.to_dict(),
    }


def _decode(key: str, entry: dict[str, Any]) -> IntWeight:
    try:
        spec = QuantSpec.from_any(entry["spec"])
        scale = entry["scale"].float()
        zp = entry["zero_point"]
        zp = torch.zeros(scale.numel(), dtype=torch.int32) if zp is None else zp.to(torch.int32)
        shell = IntWeight(torch.empty(entry["shape"], dtype=torch.int32), scale, zp, spec,
                          entry.get("offset"))
        codes = decode_codes(entry, zero_codes(shell), entry["bits"], entry["qmin"],
                             spec.quant_max, entry["numel"], entry["binary"])
        shell.codes = codes.reshape(entry["shape"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"integer checkpoint entry {key!r} is malformed: {e}") from None
    return shell


def _weight_quant_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of every weight quantizer (their state is not stored)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(q)]}." for *_, q in weight_quantizers(model)]


def int_state(model: nn.Module, check: bool = True) -> dict[str, Any]:
    """The integer checkpoint of a prepared (fake-quant) ``model`` as a dict (see module doc)."""
    weights: dict[str, Any] = {}
    for mname, module, pname, q in weight_quantizers(model):
        key = f"{mname}.{pname}" if mname else pname
        iw = quantize_weight(q, getattr(module, pname), check=check, name=key)
        if iw is not None:
            weights[key] = _encode(iw)
    if not weights:
        raise ValueError("the model has no active weight quantizer: prepare it with qat.prepare "
                         "(and keep weight fake quant on) before saving an integer checkpoint")
    skip = tuple(_weight_quant_prefixes(model))
    rest = {k: v.detach().clone() for k, v in model.state_dict().items()
            if k not in weights and not k.startswith(skip)}
    return {"format": FORMAT, "version": VERSION, "weights": weights, "float": rest}


def save_int_checkpoint(model: nn.Module, path: str | os.PathLike | io.BytesIO,
                        float_model: nn.Module | None = None, check: bool = True,
                        verbose: bool = False) -> CheckpointSize:
    """Save the integer checkpoint of a prepared ``model``; returns its size against the float
    checkpoint (``torch.save`` of ``float_model``'s state_dict, by default the float params and
    buffers of ``model`` without any quantizer state)."""
    state = int_state(model, check=check)
    torch.save(state, path)
    ref = float_model if float_model is not None else model
    size = CheckpointSize(_nbytes(path, state), float_checkpoint_bytes(ref))
    if verbose:
        print(size)
    return size


def _nbytes(path: Any, state: dict[str, Any]) -> int:
    if isinstance(path, io.BytesIO):
        return len(path.getbuffer())
    return Path(path).stat().st_size


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict without quantizer state (what the float model would save)."""
    drop = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, FakeQuantizer) and n)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}


def float_checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(state_dict)`` of the float model (quantizer state left out)."""
    buf = io.BytesIO()
    torch.save(float_state_dict(model), buf)
    return len(buf.getbuffer())


def checkpoint_size(model: nn.Module, check: bool = True) -> CheckpointSize:
    """Integer vs float checkpoint bytes of a prepared model, without writing a file."""
    buf = io.BytesIO()
    return save_int_checkpoint(model, buf, check=check)


def read_int_weights(path: str | os.PathLike | io.BytesIO) -> dict[str, IntWeight]:
    """The integer weights stored in a checkpoint, unpacked, keyed by ``<module>.<param>``."""
    return {k: _decode(k, e) for k, e in _load(path)["weights"].items()}


def _load(path: Any) -> dict[str, Any]:
    if isinstance(path, io.BytesIO):
        path.seek(0)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a qat integer checkpoint (format {FORMAT!r})")
    if obj.get("version") not in READABLE:
        raise ValueError(f"{path!r}: integer checkpoint version {obj.get('version')!r} is not "
                         f"supported: allowed {list(READABLE)}")
    return obj


def load_int_checkpoint(path: str | os.PathLike | io.BytesIO,
                        model: nn.Module | Callable[[], nn.Module],
                        config: Any = None) -> nn.Module:
    """Rebuild the inference model from an integer checkpoint.

    ``model``: a prepared skeleton (the same architecture and QAT config as the saved model), or
    a function returning one; with ``config`` (a QATConfig or mapping) ``model`` may be the float
    skeleton and is prepared here. Returns the model in eval mode, weights dequantized from the
    stored codes, weight quantizers removed, activation observers off.
    """
    obj = _load(path)
    if not isinstance(model, nn.Module):
        model = model()
    if config is not None:
        from ..surgery import prepare

        model = prepare(model, config, inplace=True)[0]
    weights = {k: _decode(k, e) for k, e in obj["weights"].items()}
    slots = {(f"{m}.{p}" if m else p): (module, p, q) for m, module, p, q in
             weight_quantizers(model)}
    for key, iw in weights.items():
        if key not in slots:
            raise ValueError(f"integer checkpoint weight {key!r} has no weight quantizer in the "
                             "model: pass the prepared skeleton (qat.prepare with the same config)")
        q = slots[key][2]
        if q.spec != iw.spec:
            raise ValueError(f"{key}: checkpoint spec {iw.spec} differs from the model's "
                             f"{q.spec}")
    _add_missing_masks(model, obj["float"])
    skip = tuple(_weight_quant_prefixes(model))
    missing, unexpected = model.load_state_dict(obj["float"], strict=False)
    missing = [k for k in missing if k not in weights and not k.startswith(skip)]
    if missing or unexpected:
        raise ValueError(f"integer checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, iw in weights.items():
            module, pname, _ = slots[key]
            w = getattr(module, pname)
            if tuple(w.shape) != tuple(iw.codes.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(iw.codes.shape)} differs from "
                                 f"the model's {tuple(w.shape)}")
            w.copy_(iw.dequantize().to(w.dtype))
    for _, layer in quant_layers(model):
        layer.drop_weight_quantizers()
    disable_observers(model)
    return model.eval()


def _add_missing_masks(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Register pruning masks (``<param>_mask`` buffers) the skeleton lacks, as plain buffers."""
    modules = dict(model.named_modules())
    own = set(model.state_dict())
    for key, value in state.items():
        if not key.endswith("_mask") or key in own:
            continue
        mname, _, bname = key.rpartition(".")
        module = modules.get(mname)
        if module is not None and bname[:-5] in module._parameters:
            module.register_buffer(bname, torch.zeros_like(value))
