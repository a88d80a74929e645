#!/usr/bin/env bash
USAGE="\
Usage: finetune/finetune_qlora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Q-LoRA fine-tuning on one or more nodes with DeepSpeed ZeRO: a LoRA adapter trains on a frozen base loaded in
4-bit NF4; the adapter's gradients and optimizer state are sharded over all ranks.

Example:
  finetune/finetune_qlora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_qlora
"
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DISTRIBUTED=1
DS_CONFIG=zero2
NO_FSDP="the 4-bit base is placed whole on each rank, which FSDP cannot shard (--deepspeed zero3 shards it)"
OUTPUT_DIR=output_qlora
# finetune.py arguments of this recipe: common.sh's adapter recipe, on top of its SHARED_RECIPE.
RECIPE=("${ADAPTER_RECIPE[@]}" --q_lora True)
launcher_main "$@"
