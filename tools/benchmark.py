"""Throughput and memory of finetune.py on a GPU: tokens/s per GPU and peak memory, after warm-up steps.

    # one GPU: a Qwen2.5-1.5B-shaped random model, LoRA
    python tools/benchmark.py --shape 1.5b --workdir /tmp/bench -- --use_lora True --bf16 True
    # several GPUs: the same under torchrun, finetune.py flags after `--`
    torchrun --nproc_per_node 2 tools/benchmark.py --shape 1.5b --workdir /tmp/bench -- \
        --use_lora True --bf16 True --deepspeed ds_configs/zero2.json

Rank 0 builds the model (random weights, Qwen's real vocabulary) and a synthetic data set once per workdir, every
rank trains `--steps` steps, and rank 0 prints one JSON line (and appends it to `--results`): tokens per second per
GPU over the steps after `--warmup` (all tokens of the padded batches — the synthetic samples are of near-equal length, so
padding is a few tokens a sample — all ranks together divided by the number of ranks), peak
GPU memory, and the mean loss. Random weights train at the same speed as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SHAPES = {  # Qwen2.5 shapes: hidden, intermediate, layers, heads, kv heads
    "tiny": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4),
}
WORDS = ("the model reads every token of a long answer and learns to write it again with care while the user "
         "asks about data sets kernels memory and speed on large machines").split()


class Throughput(TrainerCallback):
    """Times the steps after warm-up and counts the non-padding tokens they saw, over all ranks."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.tokens_at_start = warmup, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen - self.tokens_at_start  # summed over ranks by the Trainer
        self.steps = state.global_step - self.warmup


def synthetic_data(path: Path, samples: int, words: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(samples):
            question = " ".join(rng.choices(WORDS, k=words // 8))
            answer = " ".join(rng.choices(WORDS, k=words))
            f.write(json.dumps({"id": i, "conversations": [{"from": "user", "value": question},
                                                            {"from": "assistant", "value": answer}]}) + "\n")


def prepare(workdir: Path, shape: str, samples: int, words: int) -> tuple[Path, Path]:
    from tools.make_tiny_model import make_tiny_model

    model, data = workdir / f"model-{shape}", workdir / f"data-{samples}x{words}.jsonl"
    if not (model / "config.json").exists():
        make_tiny_model(model, tokenizer="qwen", **SHAPES[shape])
    if not data.exists():
        synthetic_data(data, samples, words)
    return model, data


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1.5b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmft-bench"))
    parser.add_argument("--label", default="", help="name of this measurement in the results")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--words", type=int, default=900, help="answer length in words (about as many tokens)")
    parser.add_argument("--results", type=Path, default=None, help="JSONL file to append the result to")
    args = parser.parse_args(ours)

    rank = int(os.environ.get("RANK", 0))
    args.workdir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        model, data = prepare(args.workdir, args.shape, args.samples, args.words)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
    model, data = prepare(args.workdir, args.shape, args.samples, args.words)  # present now: only paths

    import finetune

    meter = Throughput(args.warmup)
    out = args.workdir / f"out-{args.label or 'run'}"
    flags = ["--model_name_or_path", model, "--data_path", data, "--output_dir", out, "--overwrite_output_dir",
             "True", "--max_steps", args.steps, "--save_strategy", "no", "--logging_steps", "5", "--report_to",
             "none", "--include_num_input_tokens_seen", "True", "--model_max_length", "2048",
             "--dataloader_num_workers", "2", *theirs]
    trainer = finetune.main([str(f) for f in flags], callbacks=[meter])
    world = trainer.args.world_size
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        result = {
            "label": args.label, "shape": args.shape, "gpus": world,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "tokens_per_s_per_gpu": round(meter.tokens / meter.seconds / world),
            "step_s": round(meter.seconds / meter.steps, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "last_loss": losses[-1] if losses else None, "flags": " ".join(theirs),
        }
        print("BENCH " + json.dumps(result), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
