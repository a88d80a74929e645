"""The final save of a run, in the shape inference tools load without help.

- LoRA / Q-LoRA: the PEFT adapter (safetensors, modules_to_save included) + tokenizer with its chat template +
  generation config; `AutoPeftModelForCausalLM.from_pretrained(output_dir)` loads it.
- Full: a standalone model directory; `AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

`Trainer.save_model` does the sharding-aware part: ZeRO-3 gathers the 16-bit weights on every rank, FSDP gathers a
FULL_STATE_DICT onto rank 0. It writes into a staging folder inside output_dir, which rank 0 checks, completes and
then moves into place file by file, so an interrupted or incomplete save never leaves an output directory that looks
finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from llmft.errors import LlmftError

logger = logging.getLogger(__name__)

STAGING = ".llmft-saving"
RUN_FILE = "llmft_run.json"


def describe_run(model_args, lora_args, quant_args, added_tokens) -> dict:
    """What tools after training need to know and cannot read from the adapter: how the base was loaded."""
    from llmft.args import base_quant_method

    quantization = None
    if quant_args.q_lora:
        quantization = {"method": "bitsandbytes", "bits": quant_args.quant_bits,
                        "type": quant_args.quant_type if quant_args.quant_bits == 4 else "int8"}
    elif (method := base_quant_method(model_args)) is not None:
        quantization = {"method": method}
    mode = "full" if not lora_args.use_lora else ("qlora" if quant_args.q_lora else "lora")
    return {"mode": mode, "base_model": model_args.model_name_or_path, "base_quantization": quantization,
            "added_tokens": list(added_tokens)}


def save_for_inference(trainer, tokenizer, output_dir: str, run: dict | None = None) -> None:
    """Save the trained model (or adapter) with its tokenizer, generation config and `llmft_run.json` (the
    `describe_run` record) into output_dir."""
    staging = os.path.join(output_dir, STAGING)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # training turned the KV cache off; inference wants it back
    trainer.save_model(staging)  # every rank takes part: ZeRO-3 and FSDP gather the sharded weights here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        if run is not None:
            with open(os.path.join(staging, RUN_FILE), "w", encoding="utf-8") as f:
                json.dump(run, f, indent=2)
        if hasattr(model, "peft_config"):
            check_adapter_complete(staging, model)
        else:
            check_model_written(staging)
        for name in os.listdir(staging):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
        logger.warning("saved %s to %s", "adapter" if hasattr(model, "peft_config") else "model", output_dir)
    trainer.accelerator.wait_for_everyone()


def check_adapter_complete(path: str, model) -> None:
    """Fail loudly when a saved adapter lacks LoRA weights or holds only one rank's shard of them. Sharded training
    can otherwise write an adapter that loads and silently does nothing: DeepSpeed ZeRO-3 one of empty (partitioned)
    tensors, FSDP one without the LoRA layers it could not find (inside activation-checkpoint wrappers)."""
    from safetensors import safe_open

    expected = _lora_shapes(model)
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise LlmftError(f"the adapter was not written: {file} is missing")
    with safe_open(file, framework="pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    empty = [key for key, shape in saved.items() if not shape or 0 in shape]
    missing = sorted(set(expected) - set(saved))
    partial = sorted(key for key in set(expected) & set(saved)
                     if expected[key] is not None and saved[key] != expected[key])
    if empty or missing or partial:
        example = (missing or partial or empty)[0]
        raise LlmftError(
            f"the saved adapter {file} is incomplete: of {len(expected)} LoRA tensors {len(missing)} missing, "
            f"{len(partial)} of the wrong shape, {len(empty)} empty (e.g. {example}); under ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save, under FSDP use state_dict_type FULL_STATE_DICT and no "
            "activation_checkpointing in --fsdp_config"
        )


def _lora_shapes(model) -> dict[str, tuple[int, ...] | None]:
    """The adapter file's key for each trainable lora_A and lora_B weight, with the whole weight's shape (None where
    the model cannot tell it: FSDP1's flattened shards). ZeRO-3 keeps the shape of a partitioned weight in `ds_shape`;
    an FSDP2 weight is a DTensor, whose shape is the whole one."""
    adapter = getattr(model, "active_adapter", "default")
    shapes = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or not (".lora_A." in name or ".lora_B." in name):
            continue
        shape = None if "_fsdp_wrapped_module." in name else tuple(getattr(param, "ds_shape", param.shape))
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            name = name.replace(wrapper, "")
        shapes[name.replace(f".{adapter}.", ".")] = shape
    return shapes


def check_model_written(path: str) -> None:
    """Fail loudly when a full fine-tune saved no weights: transformers writes none under FSDP with a sharded state
    dict, nor under ZeRO-3 without stage3_gather_16bit_weights_on_model_save (only a DeepSpeed checkpoint then)."""
    names = os.listdir(path)
    if not any(n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        raise LlmftError(
            f"the model weights were not written to {path} (files: {', '.join(sorted(names))}); under ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save, under FSDP use state_dict_type FULL_STATE_DICT"
        )
