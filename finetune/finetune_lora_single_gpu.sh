#!/usr/bin/env bash
USAGE="\
Usage: finetune/finetune_lora_single_gpu.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
LoRA fine-tuning in one process on one GPU (the first in CUDA_VISIBLE_DEVICES): the base model stays frozen and
only the adapter trains. No DeepSpeed unless --deepspeed is given (zero2_offload moves optimizer state to CPU RAM).

Example:
  finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen2.5-1.5B-Instruct -d examples/conversations.json -- --num_train_epochs 1
"
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DISTRIBUTED=0
DS_CONFIG=""
OUTPUT_DIR=output_lora
# finetune.py arguments of this recipe: common.sh's adapter recipe, on top of its SHARED_RECIPE.
RECIPE=("${ADAPTER_RECIPE[@]}")
launcher_main "$@"
