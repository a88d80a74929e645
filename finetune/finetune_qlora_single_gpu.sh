#!/usr/bin/env bash
USAGE="\
Usage: finetune/finetune_qlora_single_gpu.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Q-LoRA fine-tuning in one process on one GPU (the first in CUDA_VISIBLE_DEVICES): a LoRA adapter trains on a frozen
base loaded in 4-bit NF4. No DeepSpeed unless --deepspeed is given.

Example:
  finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_qlora
"
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DISTRIBUTED=0
DS_CONFIG=""
OUTPUT_DIR=output_qlora
# finetune.py arguments of this recipe: common.sh's adapter recipe, on top of its SHARED_RECIPE.
RECIPE=("${ADAPTER_RECIPE[@]}" --q_lora True)
launcher_main "$@"
