#!/usr/bin/env bash
# Q-LoRA (4-bit NF4 base) fine-tuning on one or more nodes, DeepSpeed ZeRO-2 by default.
# Usage: finetune/finetune_qlora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
# --help prints its options, recipe and environment variables (from LAUNCHERS in llmft/launch/launcher.py).
# Example: finetune/finetune_qlora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_qlora
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
