"""Capture intermediate tensors (hidden states, attention maps) with forward hooks.

``FeatureCapture(model, hidden=[names], attention=[names or ints])`` is a context manager (or
``attach()`` / ``detach()``) that records, for the **last** call of each named submodule:

* hidden: the module output (the first tensor of a tuple / ModelOutput output, e.g. the
  sequence output of ``nn.LSTM``);
* attention, by module name: for ``nn.MultiheadAttention`` (and subclasses with the same
  forward, e.g. qat's QuantMultiheadAttention) a forward pre-hook forces ``need_weights=True,
  average_attn_weights=False`` and the per-head weights (B, H, T, S) are recorded, with the
  key padding mask the module received (True = padding). For other modules (e.g. a Hugging
  Face self-attention) the second element of the output is recorded: use
  ``attn_implementation="eager"`` (SDPA returns no weights);
* attention, by int ``i``: ``outputs.attentions[i]`` of the root call, which is called with
  ``output_attentions=True`` (Hugging Face models; needs the eager attention too).

The root module's last call is recorded too (``args``, ``kwargs``, ``output``). Forcing
``need_weights`` makes attention use the explicit softmax path (slower, and in training the
returned maps are the post-dropout probabilities). While attached, PyTorch's MHA / Transformer
fast path is switched off (``torch.backends.mha.set_fastpath_enabled(False)``), because in eval
mode ``nn.TransformerEncoder`` would otherwise pass nested tensors or call a fused kernel that
skips ``self_attn``; the previous setting is restored by ``detach()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureCapture", "first_tensor", "feature_widths"]


def first_tensor(out: Any) -> Tensor:
    """The main tensor of a module output: itself, ``last_hidden_state``/``logits`` or [0]."""
    if isinstance(out, Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        v = getattr(out, key, None)
        if isinstance(v, Tensor):
            return v
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise ValueError(f"cannot find a tensor in a module output of type {type(out).__name__}")


def _padding(kpm: Tensor | None) -> Tensor | None:
    """A key padding mask as bool, True = padding (float masks: large negative = padding)."""
    if kpm is None:
        return None
    return kpm if kpm.dtype == torch.bool else kpm < -1e4


class FeatureCapture:
    """Records hidden states and attention maps of named submodules during forward calls."""

    def __init__(
        self,
        model: nn.Module,
        hidden: Sequence[str] = (),
        attention: Sequence[str | int] = (),
    ) -> None:
        self.model = model
        self.hidden_names = list(hidden)
        self.attention_keys = list(attention)
        modules = dict(model.named_modules())
        for name in self.hidden_names + [a for a in self.attention_keys if isinstance(a, str)]:
            if name not in modules:
                close = [n for n in modules if n and (n.endswith(name) or name in n)][:5]
                raise ValueError(f"{type(model).__name__} has no submodule {name!r}"
                                 + (f"; similar: {close}" if close else ""))
        self._modules = modules
        self._handles: list[Any] = []
        self._fastpath: bool | None = None
        self.clear()

    # ---- records ---------------------------------------------------------------------------
    def clear(self) -> None:
        self.hidden: dict[str, Tensor] = {}
        self.attention: dict[str | int, Tensor] = {}
        self.padding: dict[str | int, Tensor | None] = {}
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}
        self.output: Any = None
        self.calls = 0

    def hidden_list(self) -> list[Tensor]:
        """Recorded hidden states in the order of ``hidden``."""
        missing = [n for n in self.hidden_names if n not in self.hidden]
        if missing:
            raise RuntimeError(f"submodule {missing[0]!r} was not called during the forward")
        return [self.hidden[n] for n in self.hidden_names]

    def attention_list(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """Recorded attention maps (B, H, T, S) and key padding masks, in ``attention`` order."""
        if any(isinstance(a, int) for a in self.attention_keys):
            atts = getattr(self.output, "attentions", None)
            if not atts:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned no attentions: load Hugging Face "
                    "models with attn_implementation='eager' to distill attention maps")
            for a in self.attention_keys:
                if isinstance(a, int):
                    self.attention[a] = atts[a]
                    self.padding[a] = None
        missing = [a for a in self.attention_keys if a not in self.attention]
        if missing:
            raise RuntimeError(f"attention module {missing[0]!r} was not called")
        return ([self.attention[a] for a in self.attention_keys],
                [self.padding.get(a) for a in self.attention_keys])

    # ---- hooks ---------------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if any(isinstance(a, int) for a in self.attention_keys):
            kwargs = {**kwargs, "output_attentions": True}
        return args, kwargs

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.args, self.kwargs, self.output = args, kwargs, out
        self.calls += 1

    def _hidden_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            self.hidden[name] = first_tensor(out)

        return hook

    def _mha_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        args = list(args)
        # forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_w.)
        for pos, key, value in ((4, "need_weights", True), (6, "average_attn_weights", False)):
            if len(args) > pos:
                args[pos] = value
            else:
                kwargs[key] = value
        return tuple(args), kwargs

    def _attention_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            w = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if not isinstance(w, Tensor):
                raise RuntimeError(
                    f"attention module {name!r} returned no attention weights: for Hugging Face "
                    "models use attn_implementation='eager'")
            self.attention[name] = w
            kpm = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
            self.padding[name] = _padding(kpm) if isinstance(module, nn.MultiheadAttention) \
                else None

        return hook

    def attach(self) -> FeatureCapture:
        if self._handles:
            return self
        self.clear()
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._root_post, with_kwargs=True))
        for name in self.hidden_names:
            self._handles.append(self._modules[name].register_forward_hook(
                self._hidden_hook(name)))
        for key in self.attention_keys:
            if isinstance(key, int):
                continue
            mod = self._modules[key]
            if isinstance(mod, nn.MultiheadAttention):
                self._handles.append(mod.register_forward_pre_hook(self._mha_pre,
                                                                   with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._attention_hook(key),
                                                           with_kwargs=True))
        if any(isinstance(x, nn.MultiheadAttention) for x in self._modules.values()):
            self._fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


@torch.no_grad()
def feature_widths(model: nn.Module, names: Sequence[str], *args: Any, **kwargs: Any) -> list[int]:
    """Feature width (last dimension) of each named submodule's output on one example call."""
    was_training = model.training
    model.eval()
    try:
        with FeatureCapture(model, hidden=names) as cap:
            model(*args, **kwargs)
        return [int(t.shape[-1]) for t in cap.hidden_list()]
    finally:
        model.train(was_training)
