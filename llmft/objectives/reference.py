"""The reference log-probabilities of a full fine-tune's preference run (DPO, KTO), computed once before the first
step and kept in the run folder, so that a resumed run reads them back instead of computing them again.

`REFERENCE_FILE` in --output_dir holds {"fingerprint", "train", "eval"}: for each dataset, each row's reference
values (pairs: [chosen, rejected] summed log-probabilities; KTO: [answer, KL sequence]). The fingerprint covers the
rendered rows themselves (so the data files, tokenizer, chat template and length limit), the objective, the base
model (its weights' fingerprint, llmft.saving.base_fingerprint, or its name where it has none) and the compute
dtype: values computed for anything else are computed again. They are computed when training starts, through the
model as training wraps it (DDP, DeepSpeed at any ZeRO stage, FSDP), before the first step; rank 0 writes them
(recorded as written by the run, llmft.run_folder.record_written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING

import torch

from llmft.distributed import runs_on_several_ranks
from llmft.errors import DataError
from llmft.objectives.forward import precompute_kto_reference, precompute_pair_reference
from llmft.run_folder import record_written

if TYPE_CHECKING:
    from transformers import PreTrainedModel, TrainingArguments

    from llmft.data.preference_dataset import PreferenceDataset
    from llmft.plan import RunPlan

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.json"
KEYS = {"kto": ("ref_logps", "ref_kl_logps")}
PAIR_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_fingerprint(datasets: dict[str, PreferenceDataset | None], plan: RunPlan) -> str:
    """What the reference values depend on (see the module docstring), as a hex digest."""
    from llmft.saving import base_fingerprint

    base = base_fingerprint(plan.base_model) or plan.base_model
    h = hashlib.sha256()
    h.update(json.dumps([plan.objective, base, str(plan.compute_dtype)]).encode())
    for name in sorted(datasets):
        dataset = datasets[name]
        h.update(name.encode())
        for row in dataset.rows if dataset is not None else ():
            h.update(json.dumps({k: v for k, v in row.items() if not k.startswith("ref_")}, sort_keys=True).encode())
    return h.hexdigest()


def keep_reference_log_probs(
    model: PreTrainedModel,
    datasets: dict[str, PreferenceDataset | None],
    plan: RunPlan,
    training_args: TrainingArguments,
    max_tokens: int,
    resumed: bool = False,
) -> None:
    """Add the reference values to every row of `datasets` ({"train": ..., "eval": ...}): read from REFERENCE_FILE
    in --output_dir when its fingerprint matches, otherwise computed with `model` as it is before training (in eval
    mode, `max_tokens` tokens a forward) and written there by rank 0.

    Every rank calls it, with the model as training wraps it (so that a model ZeRO-3 or FSDP shards runs its
    forwards with every rank taking part): rank 0 reads the file and hands what it read to the others, and when
    there is nothing to read every rank computes every row. A `resumed` run has trained weights, no reference: it
    reads the values or stops (a DataError) rather than computing wrong ones."""
    keys = KEYS.get(plan.objective, PAIR_KEYS)
    path = os.path.join(training_args.output_dir, REFERENCE_FILE)
    fingerprint = reference_fingerprint(datasets, plan)
    stored = _read(path) if training_args.process_index == 0 else None
    if runs_on_several_ranks(training_args):
        shared = [stored]
        torch.distributed.broadcast_object_list(shared, src=0)
        stored = shared[0]
    if stored is not None and stored.get("fingerprint") == fingerprint:
        logger.warning("reference log-probabilities: read from %s", path)
        values = stored
    elif resumed:
        raise DataError(
            f"{path}: the reference log-probabilities this run computed before its first step are missing or were "
            "computed for other data or another base; a resumed run cannot compute them from trained weights: "
            "start the run again (--overwrite_output_dir True)"
        )
    else:
        values = {"fingerprint": fingerprint, **_compute(model, datasets, plan, max_tokens, keys)}
        if training_args.process_index == 0:
            record_written(training_args.output_dir, REFERENCE_FILE)
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "w", encoding="utf-8") as f:
                json.dump(values, f)
            os.replace(partial, path)
    for name, dataset in datasets.items():
        if dataset is not None:
            dataset.rows = [{**row, keys[0]: a, keys[1]: b} for row, (a, b) in zip(dataset.rows, values[name])]


def _compute(
    model: PreTrainedModel,
    datasets: dict[str, PreferenceDataset | None],
    plan: RunPlan,
    max_tokens: int,
    keys: tuple[str, str],
) -> dict[str, list[list[float]]]:
    precompute = precompute_kto_reference if plan.objective == "kto" else precompute_pair_reference
    was_training = model.training
    model.eval()  # no dropout: the reference is the model itself
    try:
        out = {}
        for name, dataset in datasets.items():
            if dataset is None:
                continue
            logger.warning("reference log-probabilities: computing them for the %d %s rows", len(dataset), name)
            with torch.no_grad():
                rows = precompute(model, dataset.rows, max_tokens)
            out[name] = [[row[keys[0]], row[keys[1]]] for row in rows]
        return out
    finally:
        model.train(was_training)


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
