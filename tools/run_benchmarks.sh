#!/usr/bin/env bash
# The GPU measurements behind the README's figures. On a GPU machine, from the repo root:
#   bash tools/run_benchmarks.sh single [RESULTS.jsonl]   # one GPU: LoRA, Q-LoRA, full, Liger, on a 1.5B shape
#   bash tools/run_benchmarks.sh scaling [RESULTS.jsonl]  # 1 vs 2 GPUs: ZeRO-2 LoRA, ZeRO-3 full
#   bash tools/run_benchmarks.sh launchers               # finetune/*.sh end to end on a 0.5B shape, outputs reload
# Each line of RESULTS is one tools/benchmark.py result (tokens/s per GPU, peak memory).
set -uo pipefail
suite=${1:?usage: run_benchmarks.sh single|scaling [RESULTS.jsonl]}
results=${2:-bench-results.jsonl}
work=${BENCH_WORKDIR:-/tmp/llmft-bench}
common=(--shape "${BENCH_SHAPE:-1.5b}" --workdir "$work" --results "$results" --steps "${BENCH_STEPS:-30}")
train=(--per_device_train_batch_size 4 --bf16 True --gradient_checkpointing True)
bench() { local label=$1; shift; echo "== $label"; python3 tools/benchmark.py "${common[@]}" --label "$label" -- "$@" 2>&1 \
  | grep -E "BENCH|Error|error|Traceback" ; }
bench2() { local label=$1; shift; echo "== $label"; torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29511}" \
  tools/benchmark.py "${common[@]}" --label "$label" -- "$@" 2>&1 | grep -E "BENCH|Error|error|Traceback" ; }

case $suite in
  single)
    bench lora "${train[@]}" --use_lora True --learning_rate 3e-4
    bench lora-liger "${train[@]}" --use_lora True --learning_rate 3e-4 --use_liger_kernel True
    bench qlora-nf4 "${train[@]}" --use_lora True --q_lora True --optim paged_adamw_8bit --learning_rate 2e-4
    bench full "${train[@]}" --learning_rate 1e-5
    bench full-liger "${train[@]}" --learning_rate 1e-5 --use_liger_kernel True
    ;;
  scaling)
    bench lora-zero2-1gpu "${train[@]}" --use_lora True --deepspeed ds_configs/zero2.json
    bench2 lora-zero2-2gpu "${train[@]}" --use_lora True --deepspeed ds_configs/zero2.json
    bench full-zero3-1gpu "${train[@]}" --deepspeed ds_configs/zero3.json
    bench2 full-zero3-2gpu "${train[@]}" --deepspeed ds_configs/zero3.json
    # the outputs of the 2-GPU runs load with plain transformers / PEFT and generate
    python3 - "$work" <<'PY' 2>&1 | grep -E "^LOAD|Error"
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
for name, cls in (("out-lora-zero2-2gpu", AutoPeftModelForCausalLM), ("out-full-zero3-2gpu", AutoModelForCausalLM)):
    path = f"{sys.argv[1]}/{name}"
    model = cls.from_pretrained(path, dtype=torch.bfloat16).cuda()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")["input_ids"].cuda()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    print("LOAD", name, type(model).__name__, "params", sum(p.numel() for p in model.parameters()), "generated", out.shape[1] - ids.shape[1])
PY
    ;;
  launchers)  # the shipped launchers end to end on this machine's GPUs, then the outputs reload
    BENCH_SHAPE=0.5b python3 -c "from tools.benchmark import prepare; from pathlib import Path; prepare(Path('$work'), '0.5b', 200, 300)"
    for launcher in finetune_lora_ds.sh finetune_ds.sh finetune_qlora_single_gpu.sh; do
      echo "== $launcher"
      PYTHON=python3 bash finetune/$launcher -m "$work/model-0.5b" -d "$work/data-200x300.jsonl" -o "$work/launch-${launcher%.sh}" \
        -- --max_steps 10 --save_steps 5 --logging_steps 5 --overwrite_output_dir True 2>&1 | grep -E "'loss'|saved|Error|error:" | tail -4
    done
    python3 - "$work" <<'PY' 2>&1 | grep -E "^LOAD|Error"
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
for name in ("launch-finetune_lora_ds", "launch-finetune_ds", "launch-finetune_qlora_single_gpu"):
    path = f"{sys.argv[1]}/{name}"
    cls = AutoModelForCausalLM if name == "launch-finetune_ds" else AutoPeftModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.bfloat16).cuda()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")["input_ids"].cuda()
    print("LOAD", name, type(model).__name__, "generated", model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])
PY
    ;;
  *) echo "unknown suite $suite" >&2; exit 2 ;;
esac
cat "$results"
