#!/usr/bin/env bash
USAGE="\
Usage: finetune/finetune_lora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
LoRA fine-tuning on one or more nodes with DeepSpeed ZeRO, or PyTorch FSDP (--fsdp fsdp): the base model stays
frozen and only the adapter trains, with its gradients and optimizer state sharded over all ranks.

Example:
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -- --lora_r 16
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-72B-Instruct -d examples/conversations.json --deepspeed zero3
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-72B-Instruct -d examples/conversations.json --fsdp fsdp
"
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DISTRIBUTED=1
DS_CONFIG=zero2
OUTPUT_DIR=output_lora
# finetune.py arguments of this recipe: common.sh's adapter recipe, on top of its SHARED_RECIPE.
RECIPE=("${ADAPTER_RECIPE[@]}")
launcher_main "$@"
