#!/usr/bin/env bash
# LoRA fine-tuning in one process on one GPU (the first in CUDA_VISIBLE_DEVICES).
# Usage: finetune/finetune_lora_single_gpu.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
# --help prints its options, recipe and environment variables (from LAUNCHERS in llmft/launch/launcher.py).
# Example: finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen2.5-1.5B-Instruct -d examples/conversations.json
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
