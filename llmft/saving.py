"""The final save of a run, in the shape inference tools load without help.

- LoRA / Q-LoRA: the PEFT adapter (safetensors, modules_to_save included) + tokenizer with its chat template +
  generation config; `AutoPeftModelForCausalLM.from_pretrained(output_dir)` loads it.
- Full: a standalone model directory; `AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

`Trainer.save_model` does the ZeRO-aware part (ZeRO-3 gathers the 16-bit weights on every rank). It writes into a
staging folder inside output_dir, which rank 0 completes and then moves into place file by file, so an interrupted
save never leaves an output directory that looks finished.
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
    elif base_quant_method(model_args):
        quantization = {"method": base_quant_method(model_args)}
    mode = "full" if not lora_args.use_lora else ("qlora" if quant_args.q_lora else "lora")
    return {"mode": mode, "base_model": model_args.model_name_or_path, "base_quantization": quantization,
            "added_tokens": list(added_tokens)}


def save_for_inference(trainer, tokenizer, output_dir: str, run: dict | None = None) -> None:
    """Save the trained model (or adapter) with its tokenizer, generation config and `llmft_run.json` (the
    `describe_run` record) into output_dir."""
    staging = os.path.join(output_dir, STAGING)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # training turned the KV cache off; inference wants it back
    trainer.save_model(staging)  # every rank takes part: ZeRO-3 gathers the partitioned weights here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        if run is not None:
            with open(os.path.join(staging, RUN_FILE), "w", encoding="utf-8") as f:
                json.dump(run, f, indent=2)
        if hasattr(model, "peft_config"):
            check_adapter_complete(staging, model)
        for name in os.listdir(staging):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
        logger.warning("saved %s to %s", "adapter" if hasattr(model, "peft_config") else "model", output_dir)
    trainer.accelerator.wait_for_everyone()


def check_adapter_complete(path: str, model) -> None:
    """Fail loudly when a saved adapter lacks weights: DeepSpeed ZeRO-3 can otherwise write an adapter of empty
    (partitioned) tensors, a file of a few hundred KB that loads and silently does nothing."""
    from safetensors import safe_open

    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise LlmftError(f"the adapter was not written: {file} is missing")
    with safe_open(file, framework="pt") as f:
        saved = {key: f.get_slice(key).get_shape() for key in f.keys()}
    empty = [key for key, shape in saved.items() if not shape or 0 in shape]
    if empty or len(saved) < len([n for n in expected if "lora_" in n]):
        raise LlmftError(
            f"the saved adapter {file} is incomplete ({len(saved)} tensors, {len(empty)} empty, "
            f"{len(expected)} trainable parameters): under ZeRO-3 set stage3_gather_16bit_weights_on_model_save"
        )
