"""QuantLSTM: nn.LSTM with fake-quantized weights, input, output and (optionally) cell internals.

Two execution paths, chosen from the quantizers that exist (``QuantLSTM.path``):

- ``'fast'``: only weight, input and output quantizers. Weights are fake-quantized once per forward
  and PyTorch's fused LSTM kernel runs on them (padded, packed and length-masked batches alike).
- ``'full'``: any of the cell slots ``hidden`` (h_t fed back), ``gates`` (the 4 pre-activations),
  ``sigmoid`` (i, f, o), ``tanh`` (g and tanh(c_t)) and ``cell`` (c_t) exists (even with its fake
  quant disabled), or ``force_full=True``. The cell runs gate by gate (see :mod:`.lstm_cell`):
  the input projection of all steps is one matmul, only the recurrence loops over time.

Observation of the cell slots (delayed scale): inside the recurrence every slot fake-quantizes with
the scale and zero point it had when the forward began; the values a slot saw in the forward (all
layers, directions and real steps, padding excluded) update its observer once, after the forward.
With observers off (frozen, or after calibration) this is exactly the quantizer's fixed-scale fake
quant; with observers on it lags the observer by one batch. A slot whose observer has seen nothing
yet passes values through in that forward and only calibrates. Cell slots are shared by all layers
and directions and must be per-tensor. The initial state ``hx`` enters unquantized; ``h_n``/``c_n``
are the (quantized, in the full path) last states; ``output_quant`` quantizes the output sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import _VF, Tensor, nn
from torch.nn.functional import dropout as _dropout
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..quant.fake_quantizer import FakeQuantizer
from ..quant.spec import QuantSpec
from .base import QuantModule, register_quant_module
from .config import LayerQuantConfig
from .lstm_cell import SLOTS, FixedQuant, autograd_sequence, fused_sequence, gate_order

__all__ = ["QuantLSTM"]

_HX = tuple[Tensor, Tensor]
ENGINES = ("auto", "fused_eager", "autograd")
RANGE_OBSERVERS = ("minmax", "ema")  # need only the minimum and maximum of what they see


def _act_quantizer(spec: QuantSpec | None, slot: str, features: int | None) -> FakeQuantizer | None:
    if spec is None:
        return None
    if spec.mode != "int":
        raise ValueError(f"QuantLSTM slot {slot!r}: mode={spec.mode!r} is for weights only: "
                         "allowed mode 'int'")
    if spec.granularity == "tensor":
        return FakeQuantizer(spec)
    if features is not None and spec.granularity == "channel" and spec.axis == -1:
        return FakeQuantizer(spec, shape=(1, features))
    allowed = "'tensor'" if features is None else "'tensor' or 'channel' with axis=-1"
    raise ValueError(f"QuantLSTM slot {slot!r}: granularity={spec.granularity!r} "
                     f"(axis={spec.axis}) is not supported: allowed {allowed}")


def _fixed(q: FakeQuantizer) -> FixedQuant | None:
    """q's current grid as plain numbers, or None if q is not a fixed-scale per-tensor quantizer."""
    s = q.spec
    if s.learnable or s.granularity != "tensor" or s.mode != "int" or q.track_clipping:
        return None
    scale = q.scale.detach().float().reshape(1)
    zp = int(q.zero_point.reshape(1))
    return FixedQuant(float(scale), float(1.0 / scale), float(s.quant_min - zp),
                      float(s.quant_max - zp), s.estimator == "clipped_ste")


def _observe(q: FakeQuantizer, x: Tensor) -> None:
    """Update q's observer (and its scale, unless learned) with x; flags are left as they were."""
    flags = q.observer_enabled.clone(), q.fake_quant_enabled.clone()
    q.enable_observer(True).enable_fake_quant(False)
    try:
        q(x)
    finally:
        q.observer_enabled.copy_(flags[0])
        q.fake_quant_enabled.copy_(flags[1])


class _CellSlots:
    """The cell slots for one forward: which fake-quantize now, which observe afterwards."""

    def __init__(self, mod: QuantLSTM) -> None:
        if mod.engine not in ENGINES:
            raise ValueError(f"QuantLSTM.engine={mod.engine!r} is invalid: allowed {ENGINES}")
        self.script = mod.engine == "auto"
        own = mod.activation_quantizers()
        self.q = {n: own.get(n) for n in SLOTS}
        self.active: dict[str, FakeQuantizer] = {}
        self.observe: set[str] = set()
        for n, q in self.q.items():
            if q is None:
                continue
            uninit = q.spec.learnable and not bool(q.initialized[0])
            empty = int(q.observer.count) == 0
            if q.is_observing:  # a paused observer is never fed (learned scales too)
                self.observe.add(n)
            if q.is_fake_quant and not (empty and (q.is_observing or uninit)):
                if uninit:
                    q.initialized.fill_(1)
                self.active[n] = q
        fixed = {n: _fixed(q) for n, q in self.active.items()}
        self.fused = mod.engine != "autograd" and all(v is not None for v in fixed.values())
        self.fixed = fixed
        self.seen: dict[str, list[Tensor]] = {n: [] for n in self.observe}

    def run(self, *args: Tensor | None) -> tuple[Tensor, Tensor, Tensor, dict]:
        if self.fused:
            ranges = {n for n in self.observe if self.q[n].spec.observer in RANGE_OBSERVERS}
            return fused_sequence(*args, self.fixed, self.observe, self.script, ranges)
        flags = {n: q.observer_enabled.clone() for n, q in self.active.items()}
        for q in self.active.values():
            q.enable_observer(False)  # observed once after the forward, see module docstring
        try:
            return autograd_sequence(*args, self.active, self.observe)
        finally:
            for n, q in self.active.items():
                q.observer_enabled.copy_(flags[n])

    def record(self, stats: dict, valid: Tensor | None) -> None:
        for n, v in stats.items():
            # a range observer only needs each tensor's min and max: observe those (same result)
            reduce = self.q[n].spec.observer in RANGE_OBSERVERS
            for s in v if isinstance(v, tuple) else (v,):
                s = s.detach()
                if valid is not None:  # (T, D, B, X) -> real steps only
                    s = s.masked_select(valid)  # mask (T, 1, B, 1)
                if reduce:
                    if s.dim() > 1:  # (..., X) views of the engines' buffers: no copy
                        lo, hi = torch.aminmax(s.reshape(-1, s.shape[-1]), dim=0)
                        lo_hi = torch.stack([lo.min(), hi.max()])
                    else:
                        lo_hi = torch.stack(torch.aminmax(s))
                    s = lo_hi if bool(torch.isfinite(lo_hi).all()) else s  # else let it filter
                self.seen[n].append(s.reshape(-1))

    def finish(self) -> None:
        for n, vals in self.seen.items():
            _observe(self.q[n], torch.cat(vals))


class QuantLSTM(QuantModule, nn.LSTM):
    """``nn.LSTM`` with quantization-aware training; same arguments, parameters and outputs.

    ``qconfig`` (:class:`LayerQuantConfig`, default W8A8): ``weight`` for every weight matrix
    (``weight_quant[name]``, per gate row by default; biases stay float), ``input``, ``output``
    and the cell slots ``hidden``, ``gates``, ``sigmoid``, ``tanh``, ``cell`` (see the module
    docstring). ``force_full`` runs the gate-by-gate cell even with no cell slot. ``proj_size``
    must be 0.

    Attribute ``engine``: ``'auto'`` (default) runs the full path with a hand-written backward,
    its loops compiled by TorchScript, when every active cell slot is a fixed-scale per-tensor
    quantizer (estimator ``ste`` or ``clipped_ste``), else with autograd through the steps;
    ``'fused_eager'``: the same without TorchScript; ``'autograd'``: always the latter.
    """

    quant_slots = SLOTS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        qconfig: LayerQuantConfig | dict | None = None,
        force_full: bool = False,
    ) -> None:
        if proj_size:
            raise NotImplementedError(
                f"QuantLSTM does not support proj_size={proj_size} (LSTM with projections): "
                "allowed proj_size=0"
            )
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device=device, dtype=dtype)
        cfg = LayerQuantConfig.from_any(qconfig)
        cfg.check_slots(SLOTS, "QuantLSTM")
        self.quant_config = cfg
        self.force_full = force_full
        self.engine = "auto"
        wq = None
        if cfg.weight is not None:
            wq = nn.ModuleDict({
                n: FakeQuantizer(cfg.weight, tuple(getattr(self, n).shape), weight=True)
                for n in self._flat_weights_names if n.startswith("weight_")})
        self.register_module("weight_quant", wq)
        d = 2 if bidirectional else 1
        self.register_module("input_quant", _act_quantizer(cfg.input, "input", input_size))
        self.register_module("output_quant",
                             _act_quantizer(cfg.output, "output", d * hidden_size))
        for n in SLOTS:
            self.register_module(f"{n}_quant", _act_quantizer(cfg.slot(n), n, None))
        if device is not None:
            self.to(device)

    # ---- conversion -------------------------------------------------------------------------
    @classmethod
    def from_float(cls, module: nn.LSTM, config: LayerQuantConfig | dict | None = None,
                   convert_children: bool = True, force_full: bool = False) -> QuantLSTM:
        """Wrap ``module``: the wrapper shares its parameters (the float state_dict loads)."""
        if not isinstance(module, nn.LSTM) or isinstance(module, QuantLSTM):
            raise ValueError(f"QuantLSTM.from_float expects a float nn.LSTM, got "
                             f"{type(module).__name__} (a QuantLSTM: call .to_float() first)")
        w = module.weight_ih_l0
        q = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                module.batch_first, module.dropout, module.bidirectional, module.proj_size,
                device=w.device, dtype=w.dtype, qconfig=config, force_full=force_full)
        for name in module._flat_weights_names:
            setattr(q, name, getattr(module, name))
        return q.train(module.training)

    def to_float(self) -> nn.LSTM:
        """A plain nn.LSTM sharing this module's (unquantized) parameters."""
        w = self.weight_ih_l0
        m = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias,
                    self.batch_first, self.dropout, self.bidirectional,
                    device=w.device, dtype=w.dtype)
        for name in self._flat_weights_names:
            setattr(m, name, getattr(self, name))
        return m.train(self.training)

    # ---- introspection ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        """``'full'`` if a cell slot exists or ``force_full``, else ``'fast'``."""
        full = self.force_full or any(getattr(self, f"{n}_quant") is not None for n in SLOTS)
        return "full" if full else "fast"

    def quantized_weights(self) -> list[Tensor]:
        """Flat weights in ``_flat_weights_names`` order, weights fake-quantized, biases float."""
        wq = self.weight_quantizers()
        out = []
        for name in self._flat_weights_names:
            w = getattr(self, name)
            out.append(wq[name](w) if name in wq else w)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path}"

    # ---- forward ----------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        input: Tensor | PackedSequence,  # noqa: A002
        hx: _HX | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, _HX]:
        """As ``nn.LSTM.forward``; ``lengths`` (B,) marks the real steps of a padded batch.

        With ``lengths`` the result equals running nn.LSTM on the packed batch and padding the
        output again: outputs past a sequence's length are 0, ``h_n``/``c_n`` are the states at
        its last real step, and the reverse direction starts at that step.
        """
        packed = isinstance(input, PackedSequence)
        if packed and lengths is not None:
            raise ValueError("QuantLSTM.forward: pass either a PackedSequence or lengths, not both")
        if not packed and input.dim() not in (2, 3):
            raise ValueError(f"QuantLSTM: expected a 2-D or 3-D input, got {input.dim()}-D")
        if not packed and input.dim() == 2:  # unbatched
            if lengths is not None:
                raise ValueError("QuantLSTM.forward: lengths needs a batched (3-D) input")
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            out, (h, c) = self.forward(input.unsqueeze(0 if self.batch_first else 1), hx)
            return out.squeeze(0 if self.batch_first else 1), (h.squeeze(1), c.squeeze(1))
        weights = self.quantized_weights()
        if packed:
            data = input.data if self.input_quant is None else self.input_quant(input.data)
            input = PackedSequence(data, input.batch_sizes, input.sorted_indices,
                                   input.unsorted_indices)
        elif self.input_quant is not None:
            input = self.input_quant(input)
        if lengths is not None:
            lengths = self._check_lengths(input, lengths)
        if self.path == "fast":
            out, hidden = self._fast(input, hx, lengths, weights)
        else:
            out, hidden = self._full(input, hx, lengths, weights)
        if self.output_quant is not None:
            if packed:
                out = PackedSequence(self.output_quant(out.data), out.batch_sizes,
                                     out.sorted_indices, out.unsorted_indices)
            else:
                out = self.output_quant(out)
        return out, hidden

    def _check_lengths(self, x: Tensor, lengths: Tensor | Sequence[int]) -> Tensor:
        b, t = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        lengths = torch.as_tensor(lengths, device="cpu").to(torch.int64)  # pack needs cpu int64
        if lengths.shape != (b,):
            raise ValueError(f"QuantLSTM.forward: lengths must have shape ({b},) (one per "
                             f"sequence), got {tuple(lengths.shape)}")
        if b and (int(lengths.min()) < 1 or int(lengths.max()) > t):
            raise ValueError(f"QuantLSTM.forward: lengths must lie in 1..{t} (the padded "
                             f"length), got {lengths.tolist()}")
        return lengths

    def _zeros(self, x: Tensor, batch: int) -> _HX:
        d = 2 if self.bidirectional else 1
        z = torch.zeros(self.num_layers * d, batch, self.hidden_size, dtype=x.dtype,
                        device=x.device)
        return z, z.clone()

    def _fast(self, x, hx, lengths, weights) -> tuple[Tensor | PackedSequence, _HX]:
        if lengths is not None:
            packed = pack_padded_sequence(x, lengths, self.batch_first, enforce_sorted=False)
            out, hidden = self._fast(packed, hx, None, weights)
            total = x.shape[1] if self.batch_first else x.shape[0]
            return pad_packed_sequence(out, self.batch_first, total_length=total)[0], hidden
        args = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if isinstance(x, PackedSequence):
            data, sizes, order, unorder = x
            hx = self._zeros(data, int(sizes[0])) if hx is None else self.permute_hidden(hx, order)
            res = _VF.lstm(data, sizes, hx, weights, *args)
            return PackedSequence(res[0], sizes, order, unorder), self.permute_hidden(
                (res[1], res[2]), unorder)
        if hx is None:
            hx = self._zeros(x, x.shape[0] if self.batch_first else x.shape[1])
        self.check_forward_args(x, hx, None)
        res = _VF.lstm(x, hx, weights, *args, self.batch_first)
        return res[0], (res[1], res[2])

    def _full(self, x, hx, lengths, weights) -> tuple[Tensor | PackedSequence, _HX]:
        w = dict(zip(self._flat_weights_names, weights, strict=True))
        if isinstance(x, PackedSequence):
            padded, lens = pad_packed_sequence(x)  # (T, B, I), original batch order
            out, hidden = self._layers(padded, self._initial(padded, hx), lens, w)
            order = x.sorted_indices
            if order is not None:
                out, lens = out.index_select(1, order), lens[order.cpu()]  # sorted by length
            data = pack_padded_sequence(out, lens, enforce_sorted=True).data
            return PackedSequence(data, x.batch_sizes, x.sorted_indices,
                                  x.unsorted_indices), hidden
        if self.batch_first:
            x = x.transpose(0, 1)  # (B, T, I) -> (T, B, I)
        out, hidden = self._layers(x, self._initial(x, hx), lengths, w)
        return (out.transpose(0, 1) if self.batch_first else out), hidden

    def _initial(self, x: Tensor, hx: _HX | None) -> _HX:
        """Zero state, or ``hx`` checked against the time-major input ``x`` (T, B, I)."""
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {x.shape[-1]}")
        if hx is None:
            return self._zeros(x, x.shape[1])
        want = ((2 if self.bidirectional else 1) * self.num_layers, x.shape[1], self.hidden_size)
        for name, t in zip(("h_0", "c_0"), hx, strict=True):
            if tuple(t.shape) != want:
                raise RuntimeError(f"Expected hidden size {want} for {name}, got "
                                   f"{tuple(t.shape)}")
        return hx

    def _layers(self, x: Tensor, hx: _HX, lengths: Tensor | None,
                w: dict[str, Tensor]) -> tuple[Tensor, _HX]:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the cell's kernels take one dtype: float32
            with torch.autocast(dev, enabled=False):
                return self._layers(x.float(), (hx[0].float(), hx[1].float()), lengths,
                                    {k: v.float() for k, v in w.items()})
        t_len, b = x.shape[:2]
        d = 2 if self.bidirectional else 1
        valid = rev_idx = None
        if lengths is not None and int(lengths.min()) < t_len:
            lengths = lengths.to(x.device)
            steps = torch.arange(t_len, device=x.device)[:, None]  # (T, 1)
            real = steps < lengths[None, :]  # (T, B)
            valid = real[:, None, :, None]  # (T, B) -> (T, 1, B, 1)
            rev_idx = torch.where(real, lengths[None, :] - 1 - steps, steps)  # (T, B)

        def reverse(s: Tensor) -> Tensor:  # each sequence reversed within its length
            if rev_idx is None:
                return s.flip(0)
            return s.gather(0, rev_idx[:, :, None].expand_as(s))

        order = gate_order(self.hidden_size, x.device)
        slots = _CellSlots(self)
        hs, cs = [], []
        for layer in range(self.num_layers):
            sfx = [f"_l{layer}", f"_l{layer}_reverse"][:d]
            w_ih = torch.stack([w["weight_ih" + s] for s in sfx])[:, order]  # (D, 4H, I)
            w_hh = torch.stack([w["weight_hh" + s] for s in sfx])[:, order]  # (D, 4H, H)
            x_in = torch.stack([x, reverse(x)][:d]).flatten(1, 2)  # (D, T*B, I)
            if self.bias:
                bias = torch.stack([w["bias_ih" + s] + w["bias_hh" + s] for s in sfx])
                xp = torch.baddbmm(bias[:, order].unsqueeze(1), x_in, w_ih.transpose(1, 2))
            else:
                xp = torch.bmm(x_in, w_ih.transpose(1, 2))
            xp = xp.view(d, t_len, b, -1)  # (D, T*B, 4H) -> (D, T, B, 4H)
            state = hx[0][layer * d : (layer + 1) * d], hx[1][layer * d : (layer + 1) * d]
            out, h_n, c_n, stats = slots.run(xp, w_hh, *state, valid)
            slots.record(stats, valid)
            hs.append(h_n)
            cs.append(c_n)
            outs = [out[0], reverse(out[1])] if d == 2 else [out[0]]
            x = torch.cat(outs, -1)  # (T, B, D*H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = _dropout(x, self.dropout, True)
        slots.finish()
        return x, (torch.cat(hs), torch.cat(cs))


register_quant_module(nn.LSTM, QuantLSTM)
