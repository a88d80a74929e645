"""Merge a LoRA or Q-LoRA adapter into its base model and write a standalone model folder.

    llmft merge --adapter output/lora --output_dir output/merged        # or: python tools/merge_lora.py ...
    llmft merge --adapter output/lora --output_dir output/merged --dtype bfloat16 --max_shard_size 2GB
    llmft merge --adapter output/lora --output_dir output/merged --data_path data.json --overwrite_output_dir
    llmft merge --adapter output/lora-on-gptq --base /models/Qwen2-7B-Instruct --output_dir merged
    llmft merge --adapter output/lora --base /copies/Qwen2-7B --output_dir merged --allow_base_mismatch

The base is the one the adapter records (`base_model_name_or_path` in adapter_config.json) unless `--base` names
another. It is loaded unquantized: a Q-LoRA adapter merges into the original model that training quantized on load.
An adapter trained on a GPTQ checkpoint needs `--base` with the unquantized model of the same architecture (see
`merge_base`). Embeddings are grown first when training added tokens.

The base must be the model the adapter was trained on: finetune.py records a fingerprint of it in the adapter's
llmft_run.json (`llmft.saving.base_fingerprint`: its config, and the shape and a sample of every tensor), and a base
whose fingerprint differs (another model of the same shape, or the recorded folder since overwritten) is refused unless
`--allow_base_mismatch`. The parity check below cannot catch this: it compares the adapter on that same base. A base
that ships its own Python code (`auto_map`) is refused unless `--trust_remote_code True`.

The output holds sharded safetensors, the adapter folder's tokenizer with its chat template, and a generation config
that stops at the end-of-turn token; `AutoModelForCausalLM.from_pretrained(output)` loads it. It is written into a
hidden sibling folder that takes the output's name only when complete; `--overwrite_output_dir` replaces an existing
output then. An interrupt or a SIGTERM removes the partial folder.

Parity check, printed at the end: logits of the base with the adapter unmerged against the merged model reloaded from
the output, on a few conversations (the first of `--data_path`, or two built in) rendered with the chat template.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


import torch

from llmft.data.records import load_conversations, parse_record
from llmft.data.render import render_conversation
from llmft.errors import ConfigError, LlmftError, exit_on_user_error
from llmft.model_card import derived_card_facts, write_model_card
from llmft.model_folder import ADAPTER_CONFIG, model_folder, require_adapter, require_model
from llmft.inference import (
    DTYPE_CHOICES,
    DTYPES,
    check_weights_finite,
    load_adapter_model,
    load_model,
    load_tokenizer,
    set_generation_stops,
)
from llmft.tools.cli_flags import add_overwrite_output_dir_flag, add_trust_remote_code_flag
from llmft.run_folder import staged_output_dir
from llmft.saving import FINGERPRINT_SCHEME, RUN_FILE, base_fingerprint, base_fingerprint_v1

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("merge_lora")

# Conversations for the parity check when no data is given: a short one, and one with a system prompt and newlines.
BUILTIN_CONVERSATIONS = (
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "The waves rise,\nthe wind sings,\nand the gulls fly home."},
        ]
    },
)
PARITY_MAX_TOKENS = 256  # per conversation: enough to cover every kind of token, small enough to keep the logits

# Settings that must agree between a GPTQ checkpoint and the unquantized model its adapter is merged into.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass
class MergeResult:
    output_dir: Path
    base: str
    max_abs_diff: float  # largest |logit difference|, adapter unmerged vs the merged model reloaded from output_dir
    argmax_agreement: float  # fraction of positions where both predict the same next token
    num_tokens: int  # positions compared


def recorded_run(adapter: str | Path) -> dict:
    """The adapter's llmft_run.json (finetune.py's `describe_run`), or {} for an adapter trained elsewhere."""
    path = os.path.join(adapter, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise LlmftError(f"cannot read {path}: {e}") from None
    return run if isinstance(run, dict) else {}


def _quantized_note(adapter: str) -> str:
    """Says so when training quantized the base on load (finetune.py records it in llmft_run.json)."""
    quantization = recorded_run(adapter).get("base_quantization") or {}
    if quantization.get("method") != "bitsandbytes":
        return ""
    return (
        f" (a Q-LoRA adapter, trained on a {quantization.get('type')} copy of these weights: it merges into "
        "the original weights, never into the quantized ones)"
    )


def merge_base(adapter_dir: str | Path, base: str | None = None, *, trust_remote_code: bool = False) -> str:
    """The unquantized model to merge into: `base` if given, else the one the adapter records.

    A recorded base stored quantized (GPTQ) is refused: its weights are a rounded copy of the original, and rounded
    weights plus the LoRA delta are neither the model that was trained nor one that quantizes cleanly again. The
    delta belongs on the original weights, and the merged model is then quantized anew (tools/run_gptq.py).
    """
    recorded = require_adapter(adapter_dir, "--adapter", trust_remote_code=trust_remote_code).adapter_base
    what = f"the base model recorded in {adapter_dir}/{ADAPTER_CONFIG}"
    recorded_folder = model_folder(recorded)
    if base is None:
        if recorded_folder.quant_method:
            raise LlmftError(
                f"the adapter was trained on {recorded}, a {recorded_folder.quant_method.upper()}-quantized "
                "checkpoint. Merging into its dequantized weights would add the LoRA delta to rounded weights: not "
                "the original model, and a poor start for quantizing again. Pass --base with the unquantized model "
                "that checkpoint was made from (same architecture); quantize the merged model afterwards with "
                "tools/run_gptq.py"
            )
        require_model(recorded, what, trust_remote_code=trust_remote_code)
        return recorded
    given = require_model(base, "--base", trust_remote_code=trust_remote_code)
    if given.quant_method:
        raise LlmftError(
            f"--base {base} is itself quantized ({given.quant_method}): merging needs the unquantized weights"
        )
    if recorded_folder.quant_method:
        problems = _architecture_mismatch(recorded_folder.config, given.config or {})
        if problems:
            raise LlmftError(
                f"--base {base} is not the architecture of the adapter's base {recorded}: " + "; ".join(problems)
            )
    return base


def check_base_fingerprint(adapter_dir: str | Path, base_path: str, *, allow_mismatch: bool = False) -> None:
    """Refuse `base_path` unless it is the model the adapter was trained on, by the fingerprint training recorded.

    Not checked for an adapter without one (trained outside llmft), nor for one trained on a GPTQ checkpoint: that
    fingerprint is of the quantized weights, which the unquantized base to merge into never matches (its architecture
    is checked instead, `merge_base`)."""
    run = recorded_run(adapter_dir)
    recorded = run.get("base_fingerprint")
    if not recorded:
        logger.info(
            "%s records no fingerprint of its base (trained outside llmft?): %s is taken on trust",
            adapter_dir,
            base_path,
        )
        return
    if (run.get("base_quantization") or {}).get("method") not in (None, "bitsandbytes"):
        return
    actual = (base_fingerprint if recorded.startswith(FINGERPRINT_SCHEME) else base_fingerprint_v1)(base_path)
    if actual == recorded:
        return
    trained_on = run.get("base_model") or model_folder(adapter_dir).adapter_base
    message = (
        f"the base {base_path} is not the model the adapter {adapter_dir} was trained on ({trained_on}): "
        f"its fingerprint (config and a sample of every weight) is {actual or 'unreadable'}, training recorded "
        f"{recorded} in {RUN_FILE}"
    )
    if allow_mismatch:
        logger.warning("%s; merging anyway (--allow_base_mismatch)", message)
        return
    raise LlmftError(
        f"{message}. Merging into other weights gives a model that was never trained: pass the "
        "original with --base, or --allow_base_mismatch if these are the same weights re-saved"
    )


def _architecture_mismatch(recorded: dict, given: dict) -> list[str]:
    return [
        f"{key} {given.get(key)} != {recorded.get(key)}"
        for key in ARCHITECTURE_KEYS
        if key in recorded and given.get(key) != recorded.get(key)
    ]


def parity_inputs(tokenizer: PreTrainedTokenizerBase, data_path: str | None = None, count: int = 4) -> list[list[int]]:
    """Token ids of the conversations the parity check runs: the first `count` of `data_path`, else the built-in
    ones, rendered as training renders them."""
    if data_path:
        conversations = load_conversations(data_path)[:count]
    else:
        conversations = [parse_record(record, "built-in", str(i)) for i, record in enumerate(BUILTIN_CONVERSATIONS)]
    inputs = []
    for conversation in conversations:
        sample = render_conversation(conversation, tokenizer, max_length=PARITY_MAX_TOKENS)
        if sample is not None:
            inputs.append(sample.input_ids)
    if not inputs:
        raise LlmftError(f"--data_path {data_path}: no conversation fits in {PARITY_MAX_TOKENS} tokens")
    return inputs


@torch.inference_mode()
def all_logits(model: PreTrainedModel | PeftModel, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Float32 CPU logits of each input, one forward pass per conversation (no padding to get wrong)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def compare_logits(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, float, int]:
    """(max abs difference, fraction of positions with the same argmax, positions compared)."""
    diff, same, total = 0.0, 0, 0
    for a, b in zip(expected, actual, strict=True):
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # max(0.0, nan) would report a diff of 0
            which = "the adapter unmerged" if not torch.isfinite(a).all() else "the merged model"
            raise LlmftError(f"the parity check got NaN or infinite logits from {which}: the merge is not usable")
        diff = max(diff, (a - b).abs().max().item())
        same += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
    return diff, same / total, total


def merge_lora(
    adapter: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    data_path: str | None = None,
    parity_samples: int = 4,
    overwrite_output_dir: bool = False,
    allow_base_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge `adapter` into its base and write the result to `output_dir` (see the module docstring)."""
    problems = []
    if dtype not in DTYPE_CHOICES:
        problems.append(f"--dtype {dtype!r}: choose one of {DTYPE_CHOICES}")
    if parity_samples < 1:
        problems.append(f"--parity_samples must be at least 1, got {parity_samples}")
    if data_path and not os.path.isfile(data_path):
        problems.append(f"--data_path {data_path}: no such file")
    if problems:
        raise ConfigError(problems)
    trust = {"trust_remote_code": trust_remote_code}
    require_adapter(adapter, "--adapter", **trust)
    base_path = merge_base(adapter, base, **trust)
    check_base_fingerprint(adapter, base_path, allow_mismatch=allow_base_mismatch)
    torch_dtype = DTYPES.get(dtype, "auto")

    inputs = {"--adapter": adapter, "the base": base_path, "--data_path": data_path}
    with staged_output_dir(output_dir, force=overwrite_output_dir, inputs=inputs) as staging:
        tokenizer = load_tokenizer(adapter, base=base_path, **trust)
        inputs = parity_inputs(tokenizer, data_path, parity_samples)
        logger.info("merging %s into the unquantized weights of %s%s", adapter, base_path, _quantized_note(adapter))
        model = load_adapter_model(adapter, base=base_path, dtype=torch_dtype, **trust)
        check_weights_finite(model, f"the adapter {adapter} on its base {base_path}")
        expected = all_logits(model, inputs)

        merged = model.merge_and_unload()
        merged.config.use_cache = True
        if os.path.isfile(os.path.join(adapter, "generation_config.json")):
            from transformers import GenerationConfig

            merged.generation_config = GenerationConfig.from_pretrained(adapter)
        set_generation_stops(merged, tokenizer)
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        vocab_rows = merged.get_input_embeddings().weight.shape[0]
        del model, merged
        gc.collect()

        reloaded = load_model(staging, dtype=torch_dtype, what="the merged model", **trust)
        if reloaded.get_input_embeddings().weight.shape[0] != vocab_rows:
            raise RuntimeError(
                f"the merged model reloads with {reloaded.get_input_embeddings().weight.shape[0]} "
                f"embedding rows, not the {vocab_rows} it was saved with"
            )
        max_diff, agreement, num_tokens = compare_logits(expected, all_logits(reloaded, inputs))
        del reloaded
        parity = {"max_diff": max_diff, "agreement": agreement, "tokens": num_tokens}
        write_model_card(staging, derived_card_facts("merged", adapter, staging, base_model=base_path, merge=parity))

    print(f"merged {adapter} into {base_path} -> {output_dir}")
    print(
        f"parity on {len(inputs)} conversations ({num_tokens} tokens), adapter unmerged vs merged model: "
        f"max |logit diff| {max_diff:.3g}, argmax agreement {agreement:.2%}"
    )
    return MergeResult(Path(output_dir), base_path, max_diff, agreement, num_tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder written by LoRA / Q-LoRA training")
    parser.add_argument(
        "--output_dir", "--output", dest="output_dir", required=True, metavar="DIR", help="folder for the merged model"
    )
    parser.add_argument("--base", help="unquantized base model to merge into (default: the adapter's recorded base)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="dtype of the merged weights; auto keeps the base's"
    )
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    parser.add_argument("--data_path", help="conversations for the parity check (default: two built-in ones)")
    parser.add_argument("--parity_samples", type=int, default=4, help="conversations the parity check runs")
    add_overwrite_output_dir_flag(parser, "the merge succeeds")
    parser.add_argument(
        "--allow_base_mismatch",
        action="store_true",
        help="merge into a base whose fingerprint differs from the one the adapter was trained on",
    )
    add_trust_remote_code_flag(parser)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    merge_lora(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
