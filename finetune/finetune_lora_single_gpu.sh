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
# finetune.py arguments of this recipe, on top of SHARED_RECIPE in common.sh (these win where both set one).
RECIPE=(
    --use_lora True
    --model_max_length 2048
    --per_device_train_batch_size 2
    --gradient_accumulation_steps 8
    --learning_rate 3e-4
    --save_total_limit 3
)
launcher_main "$@"
