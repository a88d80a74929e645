"""Check a training file before training: every problem in it, and what the loss will cover.

    python tools/check_data.py data.jsonl --model_name_or_path /models/Qwen2.5-7B-Instruct
    python tools/check_data.py data.json --model_name_or_path M --model_max_length 4096 --show 3
    python tools/check_data.py data.json --model_name_or_path M --per_device_train_batch_size 4 \
        --gradient_accumulation_steps 8 --world_size 8 --report out/data-check.json

Every record is parsed, rendered and masked by the code finetune.py uses, with the same data flags
(`--chat_template`, `--model_max_length`, `--overlong_samples`, `--system_prompt`, `--train_turns`, ...: any flag of
finetune.py's data and model settings); unlike training, it goes on past a bad record and lists them all, each with
its record index, line and id. It prints counts (records, samples, turns, tool calls, tokens, trained tokens, samples
with no trained token, truncated and dropped samples, duplicates), sample-length percentiles and the steps one epoch
takes at the batch flags given; writes the same as JSON to `--report` (default: DATA.check.json) and a histogram of
sample lengths beside it (.png). `--show N` prints the first N samples as training renders them, trained tokens in
bold green on a terminal and between [[ ]] otherwise. Exit status: 0 when the file has no problem, 1 when it has
some, 2 for a bad flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any


import transformers
from transformers import HfArgumentParser

from llmft.args import DataArguments, ModelArguments
from llmft.checkpoint import model_folder
from llmft.data.formats import data_file_problem
from llmft.errors import ConfigError, exit_on_user_error

EXIT_PROBLEMS = 1


def _training_default(name: str) -> Any:
    """A transformers.TrainingArguments default, read from it rather than copied here."""
    return next(f.default for f in dataclasses.fields(transformers.TrainingArguments) if f.name == name)


@dataclass
class CheckArguments:
    show: int = field(default=0, metadata={"help": "Print this many samples as rendered, trained tokens highlighted."})
    report: str | None = field(
        default=None,
        metadata={
            "help": "Where to write the JSON report (default: DATA.check.json); the length "
            "histogram goes beside it, as .png."
        },
    )
    per_device_train_batch_size: int = field(
        default=_training_default("per_device_train_batch_size"),
        metadata={"help": "Samples per micro-batch and GPU, as in training (unused with --max_tokens_per_batch)."},
    )
    gradient_accumulation_steps: int = field(
        default=_training_default("gradient_accumulation_steps"),
        metadata={"help": "Micro-batches per optimizer step, as in training."},
    )
    world_size: int = field(default=1, metadata={"help": "Training processes (GPUs in all nodes)."})
    seed: int = field(
        default=_training_default("seed"),
        metadata={"help": "Training's seed: the shuffle --max_tokens_per_batch packs."},
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CheckArguments]:
    """(model, data, check) arguments; DATA may come first, for --data_path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--data_path", argv[0]] + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, CheckArguments), allow_abbrev=False)
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError([message]))
    model_args, data_args, check_args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    problems = [f"unknown flag or argument: {token}" for token in unknown]
    problems += model_folder(model_args.model_name_or_path).problems(
        "--model_name_or_path", trust_remote_code=model_args.trust_remote_code
    )
    if (problem := data_file_problem(data_args.data_path)) is not None:
        problems.append(f"--data_path {data_args.data_path}: {problem}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size"):
        if getattr(check_args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if check_args.show < 0:
        problems.append("--show must be 0 or more")
    if problems:
        raise ConfigError(problems)
    return model_args, data_args, check_args


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    model_args, data_args, check_args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from llmft.data.check import BatchSettings, check_data, show_samples, write_histogram
    from llmft.data.dataset import RenderSettings
    from llmft.model import load_training_tokenizer

    started = time.perf_counter()
    tokenizer, _ = load_training_tokenizer(model_args, data_args)
    batch = BatchSettings(
        check_args.per_device_train_batch_size,
        check_args.gradient_accumulation_steps,
        check_args.world_size,
        data_args.max_tokens_per_batch or None,
        data_args.packing_window,
        check_args.seed,
    )
    report = check_data(
        data_args.data_path, tokenizer, RenderSettings.from_args(data_args), batch, show=check_args.show
    )
    report_path = check_args.report or f"{data_args.data_path}.check.json"
    histogram_path = os.path.splitext(report_path)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=1, ensure_ascii=False)
    write_histogram(report, histogram_path)
    if check_args.show:
        show_samples(report, tokenizer)
        print()
    print(report.summary())
    print(
        f"report: {report_path}; length histogram: {histogram_path}; checked in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_PROBLEMS if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
