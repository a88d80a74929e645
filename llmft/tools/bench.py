"""Training throughput and memory on a GPU, on chat data of realistic, uneven lengths.

    # Q-LoRA on a Qwen2.5-7B shape, next to the plain Hugging Face recipe in the same invocation
    python tools/benchmark.py --shape 7b --compare -- --use_lora True --q_lora True --bf16 True \
        --gradient_checkpointing True --max_tokens_per_batch 16384
    # a launcher's own recipe (one GPU or several) against the same settings through finetune.py
    python tools/benchmark.py --shape 0.5b --launcher finetune_qlora_ds.sh -- --max_tokens_per_batch 16384
    # the first optimizer step on a machine that never compiled these kernels, and a launcher's whole command
    python tools/benchmark.py --shape 1.5b --cold --end_to_end finetune_qlora_ds.sh -- --max_tokens_per_batch 16384
    # how long one sample can be: every conversation 32,768 tokens
    python tools/benchmark.py --shape 7b --lengths fixed:32768 --steps 4 --warmup 2 -- --use_lora True \
        --bf16 True --gradient_checkpointing True --max_tokens_per_batch 32768
    # LoRA DPO against llmft's SFT on the same sequences, and TRL's DPOTrainer, in one invocation
    python tools/benchmark.py --shape 7b --objective dpo --compare -- --use_lora True --bf16 True \
        --gradient_checkpointing True --max_tokens_per_batch 16384 --beta 0.1

The main process builds, once per --workdir, a random-weight model of the asked Qwen2.5 shape with Qwen's real
vocabulary (on the GPU, in bf16) and a JSONL of chat conversations whose token lengths follow a log-normal law
(median --median, sigma --sigma, capped at --max_length: most SFT sets look like this), or with `--lengths fixed:N`
all of about N tokens. Then each measured arm runs in a process of its own, so that its peak memory is its own:
- llmft: finetune.py's main() with the flags after `--` (the real data pipeline, model builder and Trainer);
- plain (with --compare): the plain recipe people already have: transformers.Trainer, PEFT and bitsandbytes as
  their documentation sets them up (prepare_model_for_kbit_training for Q-LoRA, LoRA dropout 0.05, paged 8-bit AdamW
  for Q-LoRA), SDPA attention, each micro-batch of --plain_batch_size samples padded to its longest, no packing, no
  fused kernels; the same rendered samples, LoRA rank and targets, checkpointing and precision as the llmft arm;
- launcher (with --launcher NAME): finetune/NAME run as a user runs it, with the flags after `--` added to its
  recipe, and this file as its entry point so it is measured the same way;
- end-to-end (with --end_to_end NAME): finetune/NAME run as a user runs it, finetune.py its entry point, for --steps
  steps and its final save; timed as a whole command, its other figures from the run report it writes.

With `--objective dpo|simpo|orpo|kto` the data are preference pairs instead: a prompt and two answers, each side's
whole sequence (prompt + answer) of a log-normal length drawn as above, the prompt a tenth of the shorter side
(--samples counts pairs; kto reads each pair as a desirable and an undesirable example). The arms become:
- llmft: finetune.py with `--objective` and the flags after `--`;
- sft: finetune.py's SFT with the same flags (less the preference ones) on the same sequences, each side of each pair
  a conversation of its own: llmft's SFT speed on the very tokens the preference arm trains on, the table's baseline;
- trl (with --compare, dpo only): TRL's DPOTrainer on the same pairs (its conversational form, so its chat template
  renders them), model, LoRA settings, checkpointing and precision as the plain recipe sets them up, --plain_batch_size
  pairs a micro-batch, padded (TRL 1.16 has padding-free DPO switched off), the reference its adapters switched off
  (full fine-tuning: its reference copy of the model).
Every arm counts the tokens of its training forward passes (llmft.report.TrainingTokenCounter): for a pair, its
chosen and rejected sequences; the reference's and KTO's KL forwards run without gradients and are not counted.
With --cold every arm starts with empty compile caches (inductor's and Triton's in a new folder in --workdir), so
its first step includes compiling every kernel, as on a fresh machine; without it, an arm reuses what earlier runs
compiled (finetune.py keeps it in its output folder, llmft/compile_cache.py).

Each arm times the optimizer steps after --warmup, counts the tokens every forward pass sees that are not padding
(all ranks together), and prints one `BENCH {json}` line: real tokens/s per GPU, seconds per step, the share of
computed tokens that were padding, peak allocated and reserved GPU memory, the memory preflight's estimate of the
peak allocated beside it (`est_gib`, `peak_gib`, `est_error_pct`; finetune.py arms, which run with --preflight False
so that a pessimistic estimate does not stop what is being measured), and MFU (model FLOPs per real token — 6N
for full fine-tuning, 4N for adapters, N the parameters of the matmuls including the output head, attention
excluded; plus 2N for each forward without gradients a preference arm runs per token: the reference with
adapters, TRL's reference copy, KTO's KL row — times tokens/s, over the GPU's dense bf16 peak), and the time from
Trainer.train's call to the end of the first optimizer step (`first_step_s`: the run report's for finetune.py arms,
with its tokens/s over the whole run and after the first step; the plain recipe's timed here). The table at the end
gives each arm's ratio to the plain recipe (with --objective: to the sft arm, and llmft's to TRL's on a line of its
own). Random weights train at the speed real ones do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn


import torch
from transformers import TrainerCallback

from llmft.config import parse_bool
from llmft.model_folder import model_folder

if TYPE_CHECKING:
    from transformers import (
        PretrainedConfig,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from llmft.preflight import MemoryEstimate
    from llmft.trainer import LlmftTrainer

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "tools" / "benchmark.py"  # the launcher arm's entry point: launchers come with a checkout
# Each measured arm's process: this module, found wherever llmft is installed (a wheel has no tools/ folder).
ARM = ("-m", "llmft.tools.bench")
SHAPES = {  # Qwen2.5 shapes: hidden, intermediate, layers, heads, kv heads, tied embeddings
    "tiny": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, tied=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, tied=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, tied=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, tied=False),
}
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("4090", 165e12),
)
WORDS = (
    "the model reads every token of a long answer and learns to write it again with care while the user asks "
    "about data sets kernels memory speed large machines training steps loss gradients and what comes next"
).split()
BENCH_ENV = "LLMFT_BENCHMARK"  # set: this file runs as finetune.py, measured (the launcher arm's entry point)


# --- model and data ------------------------------------------------------------------------------------------------


def build_random_model(path: Path, shape: str) -> None:
    """A random-weight Qwen2 model of `shape` with Qwen's vocabulary, saved in bf16 (built on the GPU if any)."""
    from transformers import Qwen2ForCausalLM

    from llmft.tools.tiny_model import generation_config, make_tokenizer, model_config

    sizes = dict(SHAPES[shape])
    tied = sizes.pop("tied")
    tokenizer = make_tokenizer("qwen", chat=True)
    config = model_config(tokenizer, **sizes)
    config.tie_word_embeddings = tied
    config.max_position_embeddings = 32768
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = generation_config(tokenizer)
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    del model
    torch.cuda.empty_cache()  # the arms run in processes of their own: leave them the whole GPU


def lognormal_lengths(count: int, median: int, sigma: float, cap: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(32, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(count)]


def parse_lengths(text: str) -> int | None:
    """--lengths: "lognormal" (None: --median, --sigma, capped at --max_length) or "fixed:N" (N: every conversation
    about N tokens long, for how long a single sample can be)."""
    if text == "lognormal":
        return None
    kind, _, number = text.partition(":")
    if kind != "fixed" or not number.isdigit() or int(number) < 64:
        raise argparse.ArgumentTypeError(f"'{text}': give lognormal, or fixed:N with N tokens, at least 64")
    return int(number)


def write_data(path: Path, lengths: list[int]) -> None:
    """Conversations of one question and one answer, one per length, each rendered to about that many tokens: about
    a tenth of it question, the rest answer (each word is one token of Qwen's vocabulary, with the template's ~12)."""
    rng = random.Random(1)
    with open(path.with_suffix(".partial"), "w") as f:
        for i, length in enumerate(lengths):
            words = max(length - 12, 4)
            question = " ".join(rng.choices(WORDS, k=max(words // 10, 2)))
            answer = " ".join(rng.choices(WORDS, k=words - max(words // 10, 2)))
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
                    }
                )
                + "\n"
            )
    path.with_suffix(".partial").rename(path)


def write_pair_data(path: Path, lengths: list[int]) -> None:
    """Preference pairs, one per two lengths (the chosen side's, the rejected side's), each side rendered to about its
    length: a user prompt of a tenth of the shorter side, then the answer; in TRL's conversational form with an
    explicit prompt, which llmft reads too. Beside it, `sides_path(path)`: each side as an SFT conversation."""
    rng = random.Random(1)
    sides = sides_path(path)
    with open(path.with_suffix(".partial"), "w") as f, open(sides.with_suffix(".partial"), "w") as g:
        for i in range(len(lengths) // 2):
            words = [max(length - 12, 4) for length in lengths[2 * i : 2 * i + 2]]
            prompt_words = max(min(words) // 10, 2)
            question = " ".join(rng.choices(WORDS, k=prompt_words))
            chosen, rejected = (" ".join(rng.choices(WORDS, k=n - prompt_words)) for n in words)
            if rejected == chosen:  # a pair of identical answers is refused
                rejected += " " + WORDS[0]
            user = [{"role": "user", "content": question}]
            answers = {"chosen": chosen, "rejected": rejected}
            pair = {"id": i, "prompt": user} | {
                side: [{"role": "assistant", "content": a}] for side, a in answers.items()
            }
            f.write(json.dumps(pair) + "\n")
            for side, answer in answers.items():
                conversation = user + [{"role": "assistant", "content": answer}]
                g.write(json.dumps({"id": f"{i}/{side}", "messages": conversation}) + "\n")
    sides.with_suffix(".partial").rename(sides)
    path.with_suffix(".partial").rename(path)


def sides_path(pairs: Path) -> Path:
    """The SFT file of a pair file's sequences (`write_pair_data`): the sft arm's data."""
    return pairs.with_name(pairs.stem + "-sides.jsonl")


def prepare(
    workdir: Path,
    shape: str,
    samples: int,
    median: int,
    sigma: float,
    cap: int,
    fixed: int | None = None,
    pairs: bool = False,
) -> tuple[Path, Path]:
    """The model of `shape` and the data in workdir, each built once: `samples` conversations of log-normal lengths
    (`median`, `sigma`, at most `cap` tokens), or with `fixed` all of about that many tokens; with `pairs`, that many
    preference pairs whose sides have such lengths (`write_pair_data`)."""
    model = workdir / f"model-{shape}"
    kind = "pairs" if pairs else "chat"
    if fixed is None:
        data = workdir / f"{kind}-{samples}-lognormal-{median}-{sigma}-{cap}.jsonl"
    else:
        data = workdir / f"{kind}-{samples}-fixed-{fixed}.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    if not model_folder(model).is_model:
        build_random_model(model, shape)
    if not data.exists():  # a rendered conversation is the words plus about 12 template tokens: 16 keeps it in cap
        count = 2 * samples if pairs else samples
        lengths = lognormal_lengths(count, median, sigma, cap - 16) if fixed is None else [fixed - 16] * count
        (write_pair_data if pairs else write_data)(data, lengths)
    return model, data


# --- measuring -----------------------------------------------------------------------------------------------------


class Meter(TrainerCallback):
    """Times the optimizer steps after `warmup` and counts what every training forward pass computes: all tokens,
    and those that are not padding (llmft.report.TrainingTokenCounter, the run report's own count: the attention mask
    of a padded batch, a packed row's padding tail). Counters stay on the GPU until the end, so counting adds no
    synchronisation."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.tokens = None
        self.train_called = None  # perf_counter when Trainer.train was called (the plain recipe's arm sets it)
        self.first_step_end = None  # perf_counter when the first optimizer step's work had run
        self.end_counts = None  # real and computed tokens of the timed steps, once the last has run

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        from llmft.report import TrainingTokenCounter

        self.tokens = TrainingTokenCounter(model, processing_class.pad_token_id)  # the run report's own count

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == self.warmup:
            _synchronize()
            self.start = time.perf_counter()
            self.tokens.take(args.device)  # the warm-up steps' tokens are not timed

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.first_step_end is None:
            _synchronize()
            self.first_step_end = time.perf_counter()
        if state.global_step == state.max_steps:  # the clock stops here, not after the callbacks' end of training
            self._stop(args, state)

    def _stop(self, args: TrainingArguments, state: TrainerState) -> None:
        _synchronize()
        self.seconds = time.perf_counter() - self.start
        self.steps = state.global_step - self.warmup
        self.end_counts = self.tokens.take(args.device)
        self.tokens.remove()

    @property
    def first_step_s(self) -> float | None:
        """Seconds from Trainer.train's call to the end of the first optimizer step, when the call was timed."""
        if self.train_called is None or self.first_step_end is None:
            return None
        return self.first_step_end - self.train_called

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.end_counts is None:  # stopped before --max_steps (a SIGTERM): timed until here
            self._stop(args, state)
        counts = self.end_counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.real_tokens, self.computed_tokens = counts.tolist()[:2]


class Profile(TrainerCallback):
    """torch.profiler over the last `steps` warm-up steps (so the timed steps stay unprofiled); prints the operators
    that took the most GPU time and the share of the wall time the GPU spent in kernels (the rest is launch and host
    overhead: the GPU waits)."""

    def __init__(self, warmup: int, steps: int) -> None:
        if steps >= warmup:
            raise SystemExit(f"--profile {steps}: profile fewer steps than --warmup {warmup} (the first compiles)")
        self.warmup, self.steps, self.profiler = warmup - steps, steps, None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == self.warmup and self.profiler is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            _synchronize()
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.profiler is not None and state.global_step == self.warmup + self.steps:
            _synchronize()
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(events.table(sort_by=sort, row_limit=15), flush=True)
            if torch.cuda.is_available():
                busy = sum(e.self_device_time_total for e in events) / 1e6
                print(
                    f"PROFILE {self.steps} steps, {wall:.2f} s wall, GPU kernels {busy:.2f} s ({busy / wall:.0%} busy)",
                    flush=True,
                )
            self.profiler = None


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_parameters(config: PretrainedConfig) -> int:
    """Parameters that multiply each token: every projection of every layer, and the output head."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * config.intermediate_size
    return layers * per_layer + config.vocab_size * hidden


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def run_report_columns(output_dir: str | Path, meter: Meter | None = None) -> dict:
    """The run report's (training_report.json in output_dir, llmft/report.py) time to the first optimizer step and
    its tokens/s, whole run and after the first step; the first step as `meter` timed it where there is no report
    (the plain recipe)."""
    from llmft.report import REPORT_JSON

    try:
        run = json.loads((Path(output_dir) / REPORT_JSON).read_text())
    except (OSError, ValueError):
        run = {}
    first = run.get("first_step_s", meter.first_step_s if meter is not None else None)
    whole, after = run.get("tokens_per_second"), run.get("tokens_per_second_after_first_step")
    return {
        "first_step_s": round(first, 2) if first is not None else None,
        "run_tokens_per_s": round(whole) if whole is not None else None,
        "run_tokens_per_s_after_first_step": round(after) if after is not None else None,
    }


def report(
    meter: Meter,
    trainer: Trainer,
    arm: str,
    label: str,
    adapters: bool,
    cold: bool = False,
    forwards_without_gradient: int = 0,
) -> dict:
    """One arm's row. `forwards_without_gradient`: forward passes per counted token that the count leaves out (a
    preference arm's reference and KL forwards, `no_grad_forwards`), 2N model FLOPs each."""
    world = trainer.args.world_size
    tokens_per_s = meter.real_tokens / meter.seconds
    model_config = trainer.accelerator.unwrap_model(trainer.model).config
    flops_per_token = ((4 if adapters else 6) + 2 * forwards_without_gradient) * matmul_parameters(model_config)
    peak = peak_flops()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "arm": arm,
        "label": label,
        "gpus": world,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tokens_per_s_per_gpu": round(tokens_per_s / world),
        "step_s": round(meter.seconds / meter.steps, 3),
        "tokens_per_step": round(meter.real_tokens / meter.steps),
        "padding_share": round(1 - meter.real_tokens / meter.computed_tokens, 4),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        "mfu": round(flops_per_token * tokens_per_s / world / peak, 4) if peak else None,
        "steps": meter.steps,
        "last_loss": losses[-1] if losses else None,
        **memory_columns(getattr(trainer, "memory_estimate", None)),
        "cold_cache": cold,
        **run_report_columns(trainer.args.output_dir, meter),
    }


def memory_columns(estimate: MemoryEstimate | None, peak_bytes: int | None = None) -> dict:
    """The preflight's estimate of peak allocated memory (llmft/preflight.py; None for the plain recipe, which does not
    run it) next to the measured peak allocated, and the estimate's error relative to the measurement, in %."""
    if peak_bytes is None and torch.cuda.is_available():
        peak_bytes = torch.cuda.max_memory_allocated()
    est = estimate.allocated / 2**30 if estimate is not None else None
    peak = peak_bytes / 2**30 if peak_bytes is not None else None
    error = 100 * (est - peak) / peak if est is not None and peak else None
    return {
        "est_gib": round(est, 2) if est is not None else None,
        "peak_gib": round(peak, 2) if peak else None,
        "est_error_pct": round(error, 1) if error is not None else None,
    }


def emit(result: dict, results: Path | None) -> None:
    print("BENCH " + json.dumps(result), flush=True)
    if results:
        with open(results, "a") as f:
            f.write(json.dumps(result) + "\n")


def flag_value(flags: list[str], name: str, default: str | None = None) -> str | None:
    """The last value given to --name in finetune.py flags."""
    value = default
    for i, token in enumerate(flags):
        if token == f"--{name}" and i + 1 < len(flags):
            value = flags[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


# --- the arms ------------------------------------------------------------------------------------------------------


def run_llmft(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    warmup: int,
    flags: list[str],
    profile: int = 0,
    max_length: int = 2048,
) -> tuple[Meter, LlmftTrainer | None]:
    from llmft.train import main as train

    meter = Meter(warmup)
    callbacks = [meter] + ([Profile(warmup, profile)] if profile else [])
    base = [
        "--model_name_or_path",
        model,
        "--data_path",
        data,
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "True",
        "--max_steps",
        steps,
        "--save_strategy",
        "no",
        "--logging_steps",
        "5",
        "--report_to",
        "none",
        "--model_max_length",
        max_length,
        "--dataloader_num_workers",
        "2",
        "--preflight",
        "False",
    ]  # measured even where the estimate says it will not fit: that is what is measured
    trainer = train([str(f) for f in [*base, *flags]], callbacks=callbacks)
    return meter, trainer


def run_plain(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    warmup: int,
    flags: list[str],
    batch_size: int,
    profile: int = 0,
    max_length: int = 2048,
) -> tuple[Meter, Trainer]:
    """The plain Hugging Face recipe on the same samples (see the module docstring)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from llmft.args import DataArguments, ModelArguments
    from llmft.data.dataset import build_datasets
    from llmft.data.render import IGNORE_INDEX
    from llmft.model import load_training_tokenizer

    args = TrainingArguments(**plain_training_settings(out, steps, batch_size, flags))
    data_args = DataArguments(str(data), model_max_length=max_length)
    tokenizer, _ = load_training_tokenizer(ModelArguments(str(model)), data_args)
    train_set, _ = build_datasets(data_args, tokenizer, args)
    net = plain_model(model, flags)
    meter = Meter(warmup)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[meter] + ([Profile(warmup, profile)] if profile else []),
    )
    meter.train_called = time.perf_counter()
    trainer.train()
    return meter, trainer


def plain_training_settings(out: Path, steps: int, batch_size: int, flags: list[str]) -> dict:
    """TrainingArguments of the plain recipes (transformers' Trainer, TRL's DPOTrainer) for finetune.py `flags`."""
    lora, qlora = parse_bool(flag_value(flags, "use_lora", "False")), parse_bool(flag_value(flags, "q_lora", "False"))
    return dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=parse_bool(flag_value(flags, "gradient_checkpointing", "True")),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_8bit" if qlora else "adamw_torch",
        learning_rate=2e-4 if lora else 1e-5,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=2,
    )


def plain_model(model: Path, flags: list[str]) -> torch.nn.Module:
    """The model as the plain recipe loads it for finetune.py `flags` (see the module docstring): bf16, SDPA;
    Q-LoRA through bitsandbytes and prepare_model_for_kbit_training; LoRA through PEFT on all linear layers."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lora, qlora = parse_bool(flag_value(flags, "use_lora", "False")), parse_bool(flag_value(flags, "q_lora", "False"))
    checkpointing = parse_bool(flag_value(flags, "gradient_checkpointing", "True"))
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if qlora
        else None
    )
    net = AutoModelForCausalLM.from_pretrained(
        model,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        quantization_config=quantization,
        device_map={"": 0} if qlora else None,
    )
    net.config.use_cache = False
    if qlora:
        from peft import prepare_model_for_kbit_training

        net = prepare_model_for_kbit_training(
            net, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(
            net,
            LoraConfig(
                r=int(flag_value(flags, "lora_r", "64")),
                lora_alpha=int(flag_value(flags, "lora_alpha", "16")),
                lora_dropout=0.05,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    return net


def run_trl(
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    warmup: int,
    flags: list[str],
    batch_size: int,
    profile: int = 0,
    max_length: int = 2048,
) -> tuple[Meter, Trainer]:
    """TRL's DPOTrainer on the same pairs (see the module docstring), with the DPO settings among `flags`."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from llmft.args import PreferenceArguments

    defaults = PreferenceArguments()
    config = DPOConfig(
        **plain_training_settings(out, steps, batch_size, flags),
        max_length=max_length,
        beta=float(flag_value(flags, "beta", str(defaults.beta))),
        loss_type=[flag_value(flags, "loss_type", defaults.loss_type)],
        label_smoothing=float(flag_value(flags, "label_smoothing", str(defaults.label_smoothing))),
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    meter = Meter(warmup)
    trainer = DPOTrainer(
        model=plain_model(model, flags),
        args=config,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer,
        callbacks=[meter] + ([Profile(warmup, profile)] if profile else []),
    )
    meter.train_called = time.perf_counter()
    trainer.train()
    return meter, trainer


def run_as_entry() -> None:
    """This file as a launcher's entry point: finetune.py with the launcher's flags, measured."""
    from llmft.train import main as train

    settings = json.loads(os.environ[BENCH_ENV])
    meter = Meter(settings["warmup"])
    trainer = train(sys.argv[1:], callbacks=[meter])
    if trainer.is_world_process_zero():
        adapters = parse_bool(flag_value(sys.argv[1:], "use_lora", "False"))
        row = report(meter, trainer, "launcher", settings["label"], adapters, settings.get("cold", False))
        emit(row, Path(settings["results"]))


def prepare_args(args: argparse.Namespace) -> tuple[Path, Path]:
    pairs = args.objective != "sft"
    return prepare(
        args.workdir, args.shape, args.samples, args.median, args.sigma, args.max_length, args.lengths, pairs=pairs
    )


def run_worker(args: argparse.Namespace, flags: list[str]) -> None:
    model, data = prepare_args(args)
    out = args.workdir / f"out-{args.worker}-{args.label or 'run'}"
    adapters = parse_bool(flag_value(flags, "use_lora", "False"))
    forwards = 0
    if args.worker == "plain":
        meter, trainer = run_plain(
            model, data, out, args.steps, args.warmup, flags, args.plain_batch_size, args.profile, args.max_length
        )
    elif args.worker == "trl":
        meter, trainer = run_trl(
            model, data, out, args.steps, args.warmup, flags, args.plain_batch_size, args.profile, args.max_length
        )
        forwards = 1  # its reference: the adapters switched off, or its copy of the model
    elif args.worker == "sft":
        sft_flags = without_preference_flags(flags)
        meter, trainer = run_llmft(
            model, sides_path(data), out, args.steps, args.warmup, sft_flags, args.profile, args.max_length
        )
    else:
        if args.objective != "sft":
            flags = ["--objective", args.objective, *flags]
            forwards = no_grad_forwards(args.objective, adapters)
        meter, trainer = run_llmft(model, data, out, args.steps, args.warmup, flags, args.profile, args.max_length)
    if trainer.is_world_process_zero():
        row = report(meter, trainer, args.worker, args.label, adapters, args.cold, forwards)
        emit(row | {"objective": args.objective if args.worker in ("llmft", "trl") else "sft"}, args.results)


def no_grad_forwards(objective: str, adapters: bool) -> int:
    """Forward passes without gradients that llmft runs per trained token of `objective`: the reference (with
    adapters; a full fine-tune's is computed before training) and, for kto, its KL row under the policy and, with
    adapters, the reference."""
    from llmft.objectives.preference import REFERENCE_OBJECTIVES

    forwards = int(objective in REFERENCE_OBJECTIVES and adapters)
    if objective == "kto":
        forwards += 1 + int(adapters)
    return forwards


def without_preference_flags(flags: list[str]) -> list[str]:
    """finetune.py `flags` without the preference settings (`--beta 0.1`, `--loss_type=ipo` ...): the sft arm's."""
    from llmft.args import PreferenceArguments

    names = {f"--{f.name}" for f in dataclasses.fields(PreferenceArguments)}
    kept, i = [], 0
    while i < len(flags):
        name, joined, _ = flags[i].partition("=")
        if name in names:
            i += 1 if joined else 2
            continue
        kept.append(flags[i])
        i += 1
    return kept


def launcher_command(
    args: argparse.Namespace,
    flags: list[str],
    model: Path,
    data: Path,
    results: Path,
    dry_run: bool = False,
    environ: dict | None = None,
) -> tuple[list[str], dict[str, str]]:
    """finetune/LAUNCHER (--launcher) with this file as its entry point, measured as the other arms are."""
    out = args.workdir / f"out-launcher-{args.label or 'run'}"
    settings = {"warmup": args.warmup, "label": args.label, "results": str(results), "cold": args.cold}
    env = {
        **(os.environ if environ is None else environ),
        "LLMFT_ENTRY": str(ENTRY),
        "PYTHON": sys.executable,
        BENCH_ENV: json.dumps(settings),
    }
    extra = ["--logging_steps", "5", "--preflight", "False", *flags]
    command = _launcher_argv(args.launcher, model, data, out, args, extra, dry_run=dry_run)
    return command, env


def _launcher_argv(
    launcher: str,
    model: Path,
    data: Path,
    out: Path,
    args: argparse.Namespace,
    flags: list[str],
    dry_run: bool = False,
) -> list[str]:
    """finetune/LAUNCHER on the benchmark's model and data into `out`: --steps optimizer steps, no checkpoints, the
    output folder replaced, the benchmark's --max_length; `flags` last (they override)."""
    trainer_flags = ["--max_steps", str(args.steps), "--save_strategy", "no", "--overwrite_output_dir", "True"]
    trainer_flags += ["--model_max_length", str(args.max_length), *flags]
    script = str(REPO / "finetune" / launcher)
    paths = ["-m", str(model), "-d", str(data), "-o", str(out)]
    return ["bash", script, *paths, *(["--dry-run"] if dry_run else []), "--", *trainer_flags]


def run_end_to_end(args: argparse.Namespace, flags: list[str], model: Path, data: Path, environ: dict) -> dict:
    """finetune/LAUNCHER (--end_to_end) as a user runs it, finetune.py its entry point: --steps optimizer steps
    (`-- --max_steps -1 --num_train_epochs 1` runs an epoch instead), no checkpoints, the final save included. The
    row gives the whole command's wall time (start-up, loading, training and saving) and, from the run report the
    run wrote, its time to the first optimizer step, tokens/s over the whole run and after the first step, and
    peak memory."""
    from llmft.report import REPORT_JSON

    out = args.workdir / f"out-end-to-end-{args.label or 'run'}"
    (out / REPORT_JSON).unlink(missing_ok=True)  # the row must come from this run's report
    command = _launcher_argv(args.end_to_end, model, data, out, args, flags)
    started = time.perf_counter()
    run_arm(command, {**environ, "PYTHON": sys.executable})
    seconds = time.perf_counter() - started
    run = json.loads((out / REPORT_JSON).read_text())
    peak = run.get("peak_memory_bytes")
    return {
        "arm": "end-to-end",
        "label": args.label,
        "launcher": args.end_to_end,
        "gpus": run.get("world_size"),
        "command_s": round(seconds, 1),
        "steps": run.get("global_step"),
        "tokens_seen": run.get("tokens_seen"),
        "peak_gib": round(peak / 2**30, 2) if peak and torch.cuda.is_available() else None,
        "cold_cache": args.cold,
        **run_report_columns(out),
    }


def fresh_compile_cache(workdir: Path, name: str) -> dict[str, str]:
    """The environment of an arm that starts with empty compile caches (--cold): inductor's and Triton's pointed at
    a new, empty folder in workdir (what a machine that never compiled these kernels has)."""
    import shutil

    folder = workdir / f"cold-compile-cache-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
    }


def launcher_recipe(args: argparse.Namespace, flags: list[str], model: Path, data: Path, results: Path) -> list[str]:
    """The finetune.py flags the launcher passes (from its --dry-run), without the paths and without DeepSpeed,
    which finetune.py in one process runs without: the launcher's recipe, for the finetune.py arm to run too."""
    import shlex

    command, env = launcher_command(args, flags, model, data, results, dry_run=True)
    printed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True).stderr
    line = next(line for line in printed.splitlines() if line.startswith("+ "))
    tokens = shlex.split(line[2:])
    tokens = tokens[tokens.index(env["LLMFT_ENTRY"]) + 1 :]
    recipe, skip = [], {"--model_name_or_path", "--data_path", "--output_dir", "--deepspeed"}
    i = 0
    while i < len(tokens):
        if tokens[i] in skip:
            i += 2
            continue
        recipe.append(tokens[i])
        i += 1
    return recipe


def run_arm(command: list[str], env: dict | None = None) -> None:
    """Run one arm in a process group of its own, and take the whole group down with this process: a benchmark
    stopped by SIGTERM (a scheduler, `timeout`) or Ctrl-C must not leave its arm training on the GPU, holding the
    output pipe open and the memory the next arm would measure."""
    arm = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)
    try:
        if arm.wait() != 0:
            raise subprocess.CalledProcessError(arm.returncode, command)
    except BaseException:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(arm.pid, sig)
                arm.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    if os.environ.get(BENCH_ENV):
        return run_as_entry()
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1.5b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmft-bench"))
    parser.add_argument("--label", default="", help="name of this measurement in the results")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps in all, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=None,
        metavar="lognormal|fixed:N",
        help="conversation lengths: log-normal (--median, --sigma; the default), or every one about N tokens",
    )
    parser.add_argument("--samples", type=int, default=None, help="conversations (default 6000; 64 with fixed:N)")
    parser.add_argument("--median", type=int, default=400, help="median conversation length in tokens")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the lengths")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="longest conversation in tokens, and the arms' --model_max_length (default 2048; N with fixed:N)",
    )
    parser.add_argument(
        "--objective",
        choices=("sft", "dpo", "simpo", "orpo", "kto"),
        default="sft",
        help="what the llmft arm trains: sft on conversations, or a preference objective on pairs of answers (then an "
        "sft arm trains on the same sequences, the baseline)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the plain recipe (sft) or TRL's DPOTrainer (--objective dpo) and print the ratio",
    )
    parser.add_argument(
        "--plain_batch_size", type=int, default=2, help="samples (TRL: pairs) per micro-batch of the plain recipe"
    )
    parser.add_argument("--launcher", default=None, help="also run finetune/LAUNCHER with these flags")
    parser.add_argument(
        "--end_to_end",
        default=None,
        metavar="LAUNCHER",
        help="also run finetune/LAUNCHER as a user runs it, timing the whole command and, from its run report, "
        "its first optimizer step",
    )
    parser.add_argument("--no_llmft", action="store_true", help="skip the finetune.py arm")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start each arm with empty compile caches (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at a new folder "
        "in --workdir), as on a machine that never compiled these kernels; first_step_s is then the cold start",
    )
    parser.add_argument("--results", type=Path, default=None, help="JSONL file the results are appended to")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="profile the last STEPS warm-up steps of each arm and print the top GPU operators",
    )
    parser.add_argument("--worker", choices=("llmft", "plain", "sft", "trl"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(ours)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}: only the steps after warm-up are timed")
    if args.max_length is None:
        args.max_length = args.lengths or 2048
    if args.lengths is not None and args.lengths > args.max_length:
        parser.error(f"--lengths fixed:{args.lengths} is longer than --max_length {args.max_length}")
    if args.samples is None:
        args.samples = 6000 if args.lengths is None else 64
    preference = args.objective != "sft"
    if flag_value(flags, "objective") is not None:
        parser.error("give --objective before --: the benchmark builds pair data for it and passes it on")
    if preference and args.compare and args.objective != "dpo":
        parser.error(f"--compare with --objective {args.objective}: the TRL arm runs DPOTrainer, for dpo")
    if preference and (args.launcher or args.end_to_end):
        parser.error("--launcher and --end_to_end measure SFT recipes; leave them out with --objective")
    for option, name in (("--launcher", args.launcher), ("--end_to_end", args.end_to_end)):
        if name is not None and not (REPO / "finetune" / name).is_file():
            launchers = " ".join(sorted(p.name for p in (REPO / "finetune").glob("finetune_*.sh")))
            parser.error(
                f"{option} {name}: no such launcher in {REPO / 'finetune'} (one of: {launchers or 'none'}; the "
                "launchers come with a checkout of llmft, not with an installed wheel)"
            )
    if args.worker:
        return run_worker(args, flags)

    signal.signal(signal.SIGTERM, _exit_on_signal)  # run_arm then stops the arm running
    model, data = prepare_args(args)
    results = args.results or args.workdir / f"results-{os.getpid()}.jsonl"
    arms = [] if args.no_llmft else ["llmft"]
    if preference:
        arms += ["sft"] + (["trl"] if args.compare else [])
    elif args.compare:
        arms.append("plain")

    def environ(arm: str) -> dict:
        return fresh_compile_cache(args.workdir, f"{arm}-{args.label or 'run'}") if args.cold else dict(os.environ)

    llmft_flags = launcher_recipe(args, flags, model, data, results) if args.launcher else flags
    for arm in arms:
        command = [
            sys.executable,
            *ARM,
            *ours,
            "--worker",
            arm,
            "--results",
            str(results),
            "--",
            *(llmft_flags if arm == "llmft" else flags),
        ]
        run_arm(command, environ(arm))
    if args.launcher:
        command, env = launcher_command(args, flags, model, data, results, environ=environ("launcher"))
        run_arm(command, env)
    if args.end_to_end:
        emit(run_end_to_end(args, flags, model, data, environ("end-to-end")), results)
    measured = len(arms) + bool(args.launcher) + bool(args.end_to_end)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    rows = [r for r in rows if r["label"] == args.label][-measured:] if measured else []
    print_table(args, llmft_flags, rows)


def print_table(args: argparse.Namespace, flags: list[str], rows: list[dict]) -> None:
    """The measured arms' table, each against the plain recipe (with a preference objective: against llmft's SFT on
    the same sequences, and a line for TRL's DPOTrainer); then each end-to-end run in a line of its own."""

    def seconds(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    def speed(arm: str) -> float | None:
        return next((r["tokens_per_s_per_gpu"] for r in rows if r["arm"] == arm), None)

    baseline = "plain" if args.objective == "sft" else "sft"
    base = speed(baseline)
    cold = " (empty compile caches)" if args.cold else ""
    objective = "" if args.objective == "sft" else f" --objective {args.objective}"
    print(f"\n{args.shape} {args.label}{cold}:{objective} {' '.join(flags)}")
    print(
        f"{'arm':9} {'tok/s/GPU':>10} {'step s':>7} {'tok/step':>9} {'padding':>8} {'peak GiB':>9} {'est GiB':>8} "
        f"{'est err':>8} {'MFU':>6} {'vs ' + baseline:>8} {'first s':>8}"
    )
    for r in rows:
        if r["arm"] == "end-to-end":
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / base:.2f}x" if base else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        est = f"{r['est_gib']:.2f}" if r.get("est_gib") is not None else "-"
        error = f"{r['est_error_pct']:+.1f}%" if r.get("est_error_pct") is not None else "-"
        print(
            f"{r['arm']:9} {r['tokens_per_s_per_gpu']:>10,} {r['step_s']:>7.3f} {r['tokens_per_step']:>9,} "
            f"{r['padding_share']:>8.1%} {str(r['peak_alloc_gib']):>9} {est:>8} {error:>8} {mfu:>6} {ratio:>8} "
            f"{seconds(r.get('first_step_s')):>8}"
        )
    if speed("llmft") and speed("trl"):
        print(f"llmft {args.objective} vs TRL's DPOTrainer: {speed('llmft') / speed('trl'):.2f}x tokens/s")
    for r in rows:
        if r["arm"] == "end-to-end":
            print(
                f"end-to-end {r['launcher']}: {r['command_s']:.1f} s the whole command, first optimizer step "
                f"{seconds(r['first_step_s'])} s after Trainer.train's call, {r['steps']} steps; tokens/s "
                f"{r['run_tokens_per_s']} over the run, {r['run_tokens_per_s_after_first_step']} after the first step"
            )


if __name__ == "__main__":
    main()
