"""The forward passes of preference training over packed rows: the policy's log-probabilities, the reference's, and
`micro_batch_loss`, what a trainer's `compute_loss` calls for each micro-batch.

The reference costs no second copy of the model. With adapters (LoRA and its variants), the reference is the base:
the same model with its adapters switched off for a no-grad forward (`reference_log_probs`). With all weights
trained, the reference is the model before training: its log-probabilities are computed once before the first step
(`precompute_pair_reference`, `precompute_kto_reference`) and travel with the dataset rows (`ref_*` keys, which the
collators turn into `reference_logps` / `reference_kl_logps`), so a full fine-tune never holds two models.

A batch here is what `llmft.data.preference`'s collators give: `input_ids`, `position_ids` (and, for variable-length
attention kernels, `cu_seq_lens_q` ... ) of one packed row; KTO's KL row is the same keys prefixed `kl_`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from llmft.data.preference import KtoPackedCollator, PairPackedCollator
from llmft.objectives.preference import (
    REFERENCE_OBJECTIVES,
    Metrics,
    SequenceLogProbs,
    compute_preference_loss,
    sequence_log_probs,
    target_mask,
    token_log_probs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from llmft.args import PreferenceArguments

MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_log_probs(model: PreTrainedModel, batch: dict, prefix: str = "") -> SequenceLogProbs:
    """Per-sequence log-probabilities of the packed row `batch[prefix + ...]` under `model` (with gradient when
    autograd is on).

    The vocabulary-wide logits of the whole row never exist: the model runs as training wraps it (DeepSpeed, FSDP,
    PEFT), asked for the last position's logits only, its final hidden states are taken from its decoder, and the
    output head scores the rows that predict a target, `HEAD_CHUNK_BYTES` of fp32 logits at a time
    (`head_log_probs`). A model whose head does more than one linear layer (soft-capped or scaled logits), or whose
    weights ZeRO-3 partitions (its head is gathered for the model's own forward only), is scored from its whole
    logits instead."""
    inputs = {key: batch[prefix + key] for key in MODEL_KEYS if prefix + key in batch}
    labels, positions = batch[prefix + "labels"], batch[prefix + "position_ids"]
    causal_lm = _causal_lm(model)
    if not plain_head(causal_lm.config) or _zero3_partitioned(causal_lm):
        logits = model(**inputs, use_cache=False).logits
        return sequence_log_probs(token_log_probs(logits, labels, positions), labels, positions)
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm.get_decoder().register_forward_hook(keep)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured[-1].reshape(-1, captured[-1].shape[-1])
    flat_labels = labels.reshape(-1)
    predicting = target_mask(flat_labels, positions)[1:]  # hidden state t-1 predicts token t
    picked = head_log_probs(causal_lm.get_output_embeddings(), hidden[:-1][predicting], flat_labels[1:][predicting])
    token_logps = torch.zeros(flat_labels.numel(), dtype=picked.dtype, device=picked.device)
    token_logps = token_logps.masked_scatter(torch.cat([predicting.new_zeros(1), predicting]), picked)
    return sequence_log_probs(token_logps, labels, positions)


HEAD_CHUNK_BYTES = 512 * 2**20  # fp32 logits of one chunk of `head_log_probs`


def head_chunk_rows(vocab_size: int) -> int:
    """Rows `head_log_probs` scores at a time: `HEAD_CHUNK_BYTES` of fp32 logits."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab_size))


def head_log_probs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the output head `head`, float32, shape (N,), for hidden states (N, H).

    The logits are made `head_chunk_rows` rows at a time, normalised in float32 and dropped; with autograd on, each
    chunk is checkpointed, so backward makes its logits again rather than keeping them: one more head matmul per
    scored token, for tokens x vocabulary fewer bytes held."""
    rows = head_chunk_rows(head.weight.shape[0])
    parts = []
    for start in range(0, hidden.shape[0], rows):
        chunk, chunk_targets = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_log_probs, head, chunk, chunk_targets, use_reentrant=False))
        else:
            parts.append(_chunk_log_probs(head, chunk, chunk_targets))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_log_probs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def plain_head(config: object) -> bool:
    """Whether the model's logits are its output head's linear layer alone: no soft-capping (Gemma 2) and no scale
    (Cohere's logit_scale, Granite's logits_scaling), so `head_log_probs` scores as the model does."""
    return (
        getattr(config, "final_logit_softcapping", None) is None
        and not hasattr(config, "logit_scale")
        and not hasattr(config, "logits_scaling")
    )


def _zero3_partitioned(model: torch.nn.Module) -> bool:
    return hasattr(model.get_output_embeddings().weight, "ds_id")


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside the training wrappers (DeepSpeed's engine, DDP, FSDP, PEFT)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def adapters_off(model: PreTrainedModel) -> Iterator[None]:
    """The model as its base: PEFT's adapters disabled inside the block; a model without adapters as it is."""
    if has_adapters(model):
        with model.disable_adapter():
            yield
    else:
        yield


@torch.no_grad()
def reference_log_probs(model: PreTrainedModel, batch: dict, prefix: str = "") -> torch.Tensor:
    """Summed log-probabilities of the row's sequences under the reference: `model` with its adapters off, no
    gradient. Only meaningful for a model with adapters (the base is the reference); a full fine-tune reads the
    precomputed values from the batch instead."""
    with adapters_off(model):
        return packed_log_probs(model, batch, prefix).sums


def has_adapters(model: PreTrainedModel) -> bool:
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


def micro_batch_loss(
    model: PreTrainedModel, batch: dict, settings: PreferenceArguments
) -> tuple[torch.Tensor, Metrics]:
    """The preference loss of one packed micro-batch and its metrics: the policy's forward with gradient; the
    reference's from the batch (`reference_logps`, precomputed) or, for a model with adapters, from a no-grad forward
    with them off; for KTO, the KL row's forward under both, without gradient."""
    policy = packed_log_probs(model, batch)
    reference = reference_kl = kl = None
    if settings.objective in REFERENCE_OBJECTIVES:
        reference = _reference(model, batch, "reference_logps", "")
    if settings.objective == "kto":
        with torch.no_grad():
            kl = packed_log_probs(model, batch, "kl_").sums
        reference_kl = _reference(model, batch, "reference_kl_logps", "kl_")
    return compute_preference_loss(settings, policy, batch, reference, kl, reference_kl)


def _reference(model: PreTrainedModel, batch: dict, key: str, prefix: str) -> torch.Tensor:
    if key in batch:
        return batch[key]
    if not has_adapters(model):
        raise ValueError(
            f"no {key} in the batch and no adapters to switch off: a full fine-tune needs the reference "
            "log-probabilities computed before training (precompute_pair_reference / precompute_kto_reference)"
        )
    return reference_log_probs(model, batch, prefix)


def _groups(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Consecutive row indices in groups of at most `max_tokens` tokens (a longer row alone)."""
    group, total = [], 0
    for i, length in enumerate(lengths):
        if group and total + length > max_tokens:
            yield group
            group, total = [], 0
        group.append(i)
        total += length
    if group:
        yield group


@torch.no_grad()
def precompute_pair_reference(model: PreTrainedModel, rows: Sequence[dict], max_tokens: int = 8192) -> list[dict]:
    """The pair rows with `ref_chosen_logps` and `ref_rejected_logps`: their sides' summed log-probabilities under
    `model` as it is now (adapters, if any, off), packed `max_tokens` tokens at a time."""
    from llmft.data.preference import pair_lengths

    out = [dict(row) for row in rows]
    for group in _groups(pair_lengths(rows), max_tokens):
        batch = PairPackedCollator()([rows[i] for i in group])
        sums = reference_log_probs(model, _to(batch, model)).cpu()
        for n, i in enumerate(group):
            out[i]["ref_chosen_logps"], out[i]["ref_rejected_logps"] = sums[2 * n].item(), sums[2 * n + 1].item()
    return out


@torch.no_grad()
def precompute_kto_reference(model: PreTrainedModel, rows: Sequence[dict], max_tokens: int = 8192) -> list[dict]:
    """The KTO rows (with their KL sequences) with `ref_logps` and `ref_kl_logps` under `model` as it is now."""
    from llmft.data.preference import kto_lengths

    out = [dict(row) for row in rows]
    for group in _groups(kto_lengths(rows), max_tokens):
        batch = _to(KtoPackedCollator()([rows[i] for i in group]), model)
        sums, kl_sums = reference_log_probs(model, batch).cpu(), reference_log_probs(model, batch, "kl_").cpu()
        for n, i in enumerate(group):
            out[i]["ref_logps"], out[i]["ref_kl_logps"] = sums[n].item(), kl_sums[n].item()
    return out


def _to(batch: dict, model: PreTrainedModel) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
