#!/usr/bin/env bash
# The GPU measurements behind the README's speed table and BENCHMARKS.md. On a GPU machine, from the repo root:
#   bash tools/run_benchmarks.sh speed RESULTS.jsonl     # the speed table: full 1.5B, Q-LoRA 7B, LoRA 7B vs the plain recipe
#   bash tools/run_benchmarks.sh variants RESULTS.jsonl  # what each default costs or saves (attention, Liger, checkpointing,
#                                                         # dropout, the lean recompute)
#   bash tools/run_benchmarks.sh launchers RESULTS.jsonl # the launchers' own recipes on one GPU against finetune.py
#   bash tools/run_benchmarks.sh scaling RESULTS.jsonl   # tokens/s per GPU through the launchers on 1 and 2 GPUs
#   bash tools/run_benchmarks.sh memory RESULTS.jsonl    # the memory preflight's estimate beside the measured peak, 8 configurations
#   bash tools/run_benchmarks.sh first-step RESULTS.jsonl  # the first optimizer step from empty compile caches, each speed
#                                                           # row, and finetune_qlora_ds.sh end to end, cold then cached
#   bash tools/run_benchmarks.sh long RESULTS.jsonl      # one 32,768-token conversation a step: LoRA and Q-LoRA 7B
# Every line of RESULTS is one tools/benchmark.py result; each invocation also prints its table.
# Data: log-normal chat lengths (median 400 tokens, sigma 0.8, capped at 2,048), real (non-padding) tokens counted.
set -uo pipefail
suite=${1:?usage: run_benchmarks.sh speed|variants|launchers|scaling|memory|first-step|long RESULTS.jsonl}
results=${2:-bench-results.jsonl}
work=${BENCH_WORKDIR:-/tmp/llmft-bench}
steps=(--steps "${BENCH_STEPS:-15}" --warmup "${BENCH_WARMUP:-4}")
bench() { python3 tools/benchmark.py --workdir "$work" --results "$results" "${steps[@]}" "$@" 2>&1 \
  | grep -E "^BENCH|^PROFILE|^[a-z]+ +[0-9,]+ |^arm |^(tiny|0.5b|1.5b|7b) |^end-to-end |Error|error:|Traceback|out of memory" ; }
full=(--bf16 True --learning_rate 1e-5)
lora=(--bf16 True --use_lora True --learning_rate 2e-4)
qlora=(--bf16 True --use_lora True --q_lora True --learning_rate 2e-4 --optim paged_adamw_8bit)
budget=(--max_tokens_per_batch "${BENCH_BUDGET:-16384}")

case $suite in
  speed)
    bench --shape 1.5b --label full-1.5b --compare -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label qlora-7b --compare --profile 2 -- "${qlora[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label lora-7b --compare -- "${lora[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label lora-7b-no-checkpointing -- "${lora[@]}" --max_tokens_per_batch 8192 --gradient_checkpointing False
    bench --shape 1.5b --label full-1.5b-no-checkpointing -- "${full[@]}" "${budget[@]}" --gradient_checkpointing False
    ;;
  variants)
    bench --shape 1.5b --label full-1.5b-no-checkpointing-8k -- "${full[@]}" --max_tokens_per_batch 8192 --gradient_checkpointing False
    bench --shape 1.5b --label full-1.5b-sdpa -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True --attn_implementation sdpa
    bench --shape 1.5b --label full-1.5b-no-liger -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True --use_liger_kernel False
    bench --shape 7b --label qlora-7b-dropout -- "${qlora[@]}" "${budget[@]}" --gradient_checkpointing True --lora_dropout 0.05
    bench --shape 7b --label qlora-7b-no-lean-recompute -- "${qlora[@]}" "${budget[@]}" --gradient_checkpointing True \
      --lean_recompute False
    bench --shape 7b --label lora-7b-no-lean-recompute -- "${lora[@]}" "${budget[@]}" --gradient_checkpointing True \
      --lean_recompute False
    bench --shape 1.5b --label full-1.5b-lean-recompute -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True \
      --lean_recompute True
    ;;
  launchers)
    for launcher in finetune_qlora_ds.sh finetune_qlora_single_gpu.sh finetune_lora_single_gpu.sh finetune_lora_ds.sh; do
      bench --shape 0.5b --samples 3000 --label "launcher-${launcher%.sh}" --launcher "$launcher" -- --num_train_epochs 1
    done
    ;;
  scaling)  # the same launcher on one GPU, then on two: compare tokens/s per GPU
    for gpus in 1 2; do
      GPUS_PER_NODE=$gpus bench --shape 1.5b --no_llmft --label "lora-zero2-${gpus}gpu" --launcher finetune_lora_ds.sh \
        -- --num_train_epochs 1
      GPUS_PER_NODE=$gpus bench --shape 1.5b --no_llmft --label "full-zero3-${gpus}gpu" --launcher finetune_ds.sh \
        -- --num_train_epochs 1
    done
    ;;
  memory)  # est_gib (llmft/preflight.py) beside peak_gib (torch.cuda.max_memory_allocated), est_error_pct; the peak
    # comes in the first two steps (the optimizer states from the first on), so few steps do
    steps=(--steps "${BENCH_STEPS:-6}" --warmup "${BENCH_WARMUP:-2}")
    bench --shape 1.5b --label mem-full-1.5b -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 1.5b --label mem-full-1.5b-no-checkpointing -- "${full[@]}" "${budget[@]}" --gradient_checkpointing False
    bench --shape 1.5b --label mem-full-1.5b-no-liger -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True --use_liger_kernel False
    bench --shape 0.5b --label mem-full-0.5b-batches-of-8 -- "${full[@]}" --max_tokens_per_batch 0 --per_device_train_batch_size 8 --gradient_checkpointing True
    bench --shape 7b --label mem-lora-7b -- "${lora[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label mem-lora-7b-no-checkpointing -- "${lora[@]}" --max_tokens_per_batch 8192 --gradient_checkpointing False
    bench --shape 7b --label mem-qlora-7b -- "${qlora[@]}" "${budget[@]}" --gradient_checkpointing True
    GPUS_PER_NODE=1 bench --shape 1.5b --no_llmft --label mem-lora-zero2-1gpu --launcher finetune_lora_ds.sh -- --num_train_epochs 1
    ;;
  first-step)  # first_step_s: from Trainer.train's call to the end of the first optimizer step, nothing compiled before
    steps=(--steps "${BENCH_STEPS:-3}" --warmup "${BENCH_WARMUP:-1}")
    bench --shape 1.5b --label first-full-1.5b --cold -- "${full[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label first-qlora-7b --cold -- "${qlora[@]}" "${budget[@]}" --gradient_checkpointing True
    bench --shape 7b --label first-lora-7b --cold -- "${lora[@]}" "${budget[@]}" --gradient_checkpointing True
    # as a user runs it: the whole command; first with the run's own compile cache (OUTPUT/_compile_cache) empty,
    # then again into the same output folder, which reuses it
    rm -rf "$work/out-end-to-end-e2e-qlora-1.5b/_compile_cache"
    for _ in cold cached; do
      bench --shape 1.5b --label e2e-qlora-1.5b --no_llmft --steps 26 --warmup 1 --end_to_end finetune_qlora_ds.sh
    done
    ;;
  long)  # how long a single sample can be: every micro-batch one conversation of 32,768 tokens
    steps=(--steps "${BENCH_STEPS:-4}" --warmup "${BENCH_WARMUP:-2}")
    long=(--lengths fixed:32768 --samples 16)
    bench --shape 7b --label long-lora-7b "${long[@]}" -- "${lora[@]}" --max_tokens_per_batch 32768 --gradient_checkpointing True
    bench --shape 7b --label long-qlora-7b "${long[@]}" -- "${qlora[@]}" --max_tokens_per_batch 32768 --gradient_checkpointing True
    ;;
  *) echo "unknown suite $suite" >&2; exit 2 ;;
esac
