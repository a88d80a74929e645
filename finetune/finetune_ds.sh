#!/usr/bin/env bash
USAGE="\
Usage: finetune/finetune_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Full-parameter fine-tuning on one or more nodes with DeepSpeed ZeRO, or PyTorch FSDP (--fsdp fsdp): weights,
gradients and optimizer state are sharded over all ranks, and the saved model is gathered back into one safetensors
checkpoint.

Example:
  finetune/finetune_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_full
  finetune/finetune_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json --fsdp fsdp
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 finetune/finetune_ds.sh -m ... -d ...   # on node1; NODE_RANK=1 on node2
"
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DISTRIBUTED=1
DS_CONFIG=zero3
OUTPUT_DIR=output_full
# finetune.py arguments of this recipe, on top of SHARED_RECIPE in common.sh (these win where both set one).
RECIPE=(
    --model_max_length 2048
    --max_tokens_per_batch 8192
    --gradient_accumulation_steps 2
    --learning_rate 1e-5
    --save_total_limit 2
)
launcher_main "$@"
