"""The padding collator: rendered samples -> one right-padded batch, for evaluation and unpacked training.

Packed training has its own collator (llmft/data/packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DataCollatorForSeq2Seq

from llmft.data.render import IGNORE_INDEX


@dataclass
class PaddingCollator(DataCollatorForSeq2Seq):
    """Samples ({"input_ids", "labels"} lists of equal length) -> a batch of `input_ids`, `labels` and
    `attention_mask`, right-padded (the tokenizer's padding side) to the longest sample rounded up to a multiple of
    `pad_to_multiple_of`: the pad token in the ids, IGNORE_INDEX (-100) in the labels, 0 in the mask.

    A causal LM's batches need exactly this, and transformers' DataCollatorForSeq2Seq does it: it is the collator that
    pads precomputed labels next to the ids (DataCollatorForLanguageModeling would rebuild the labels from the ids
    and train on the prompt), and nothing in it is sequence-to-sequence unless it is given a `model`, which llmft
    never does. This subclass only names it for what it does here and sets llmft's defaults."""

    pad_to_multiple_of: int | None = 8
    label_pad_token_id: int = IGNORE_INDEX
