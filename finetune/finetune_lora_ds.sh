#!/usr/bin/env bash
# LoRA fine-tuning on one or more nodes, DeepSpeed ZeRO-2 by default or FSDP (--fsdp fsdp).
# Usage: finetune/finetune_lora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
# --help prints its options, recipe and environment variables (from LAUNCHERS in llmft/launch/launcher.py).
# Example: finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -- --lora_r 16
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
