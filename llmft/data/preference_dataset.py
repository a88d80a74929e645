"""Training and evaluation datasets of a preference objective: the files --data_path and --eval_data_path name, read
and rendered by llmft.data.preference (with SFT's per-record errors, template and masks) into rows its collators
pack, held in memory with each row's token count (the unit the token-budget sampler bins: a pair, or a KTO example
with its KL sequence, never split).

A full fine-tune adds the reference model's log-probabilities to the rows before training
(llmft.objectives.reference); `PreferenceDataset.rows` is replaced then, its lengths stay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from llmft.data.packing import Packing
from llmft.data.preference import KtoPackedCollator, PairPackedCollator, kto_lengths, pair_lengths, preference_rows
from llmft.data.reading import check_data_file
from llmft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from llmft.args import DataArguments
    from llmft.kernels import Kernels

logger = logging.getLogger(__name__)


class PreferenceDataset(torch.utils.data.Dataset):
    """Rendered preference rows (`preference_rows`) and their token counts (`lengths`), for `objective`."""

    def __init__(self, rows: list[dict], objective: str) -> None:
        self.rows, self.objective = rows, objective
        self.lengths = kto_lengths(rows) if objective == "kto" else pair_lengths(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def build_preference_datasets(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, training_args: TrainingArguments, objective: str
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """(train, eval or None) for a preference `objective`: every rank reads and renders the files itself (a
    DataError names the first bad record). Pairs with a side over --model_max_length tokens are dropped whole and
    counted in the log."""
    result = []
    for path, name in ((data_args.data_path, "train"), (data_args.eval_data_path, "eval")):
        if path is None:
            result.append(None)
            continue
        check_data_file(path)
        rendered = preference_rows(
            path,
            tokenizer,
            objective,
            default_system=data_args.system_prompt,
            max_length=data_args.model_max_length,
        )
        dataset = PreferenceDataset(rendered.rows, objective)
        unit = "examples" if objective == "kto" else "pairs"
        logger.warning(
            "%s data %s: %d %s, %d tokens, %d dropped as over-long (a side over %d tokens)",
            name,
            path,
            len(dataset),
            unit,
            sum(dataset.lengths),
            rendered.dropped,
            data_args.model_max_length,
        )
        if len(dataset) == 0:
            raise DataError(f"{path}: no {unit} left to train on ({rendered.dropped} dropped as over-long)")
        result.append(dataset)
    return tuple(result)


def preference_packing(data_args: DataArguments, objective: str, kernels: Kernels) -> tuple[object, Packing]:
    """(the evaluation collator, the training micro-batches' Packing) of a preference objective: both pack whole
    pairs (KTO: examples) into one row without padding, with the sequences' offsets when the attention kernel takes
    them; training by --max_tokens_per_batch when set, else --per_device_train_batch_size pairs."""
    collator_class = KtoPackedCollator if objective == "kto" else PairPackedCollator
    collator = collator_class(sample_boundaries=kernels.takes_sample_boundaries)
    return collator, Packing(collator, data_args.max_tokens_per_batch or None, data_args.packing_window)
