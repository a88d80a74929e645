"""Check a training file before training: every problem in it, and what the loss will cover.

    python tools/check_data.py data.jsonl --model_name_or_path /models/Qwen2.5-7B-Instruct
    python tools/check_data.py data.json --model_name_or_path M --model_max_length 4096 --show 3
    python tools/check_data.py data.json --model_name_or_path M --per_device_train_batch_size 4 \
        --gradient_accumulation_steps 8 --world_size 8 --output_dir checks/

Every record is parsed, rendered and masked by the code finetune.py uses, with the same data flags
(`--chat_template`, `--model_max_length`, `--overlong_samples`, `--system_prompt`, `--train_turns`, ...: any flag of
finetune.py's data and model settings); unlike training, it goes on past a bad record and lists them all, each with
its record index, line and id. It prints counts (records, samples, turns, tool calls, tokens, trained tokens, samples
with no trained token, truncated and dropped samples, duplicates), sample-length percentiles and the steps one epoch
takes at the batch flags given; writes the same as JSON, NAME.check.json (NAME: the data file's name), and a
histogram of sample lengths, NAME.check.png, into `--output_dir` (default: the current directory), or to the file
`--report` names with the histogram beside it, and says where. Data often sits in read-only or shared folders, so
nothing is written beside it unless asked; a report path that is an input (the data, the evaluation data, the chat
template file) or lies inside one (the model folder) is refused before anything is read. `--show N` prints the first
N samples as training renders them, trained tokens in bold green on a terminal and between [[ ]] otherwise. Exit
status: 0 when the file has no problem, 1 when it has some, 2 for a bad flag.

With `--objective dpo|simpo|orpo|kto` (finetune.py's flag) the file is read as that objective's preference data
instead (`check_preference_data`): pairs or KTO examples, token lengths of prompts and answers, pairs dropped as
over-long, chosen answers equal to rejected ones, and every bad record; an SFT check names the records that are
preference data, and the flag that checks them.
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

from llmft.args import DataArguments, ModelArguments, PreferenceArguments
from llmft.model_folder import model_folder
from llmft.data.reading import data_file_problem
from llmft.errors import ConfigError, exit_on_user_error
from llmft.objectives.preference import preference_problems

EXIT_PROBLEMS = 1


def _training_default(name: str) -> Any:
    """A transformers.TrainingArguments default, read from it rather than copied here."""
    return next(f.default for f in dataclasses.fields(transformers.TrainingArguments) if f.name == name)


@dataclass
class CheckArguments:
    show: int = field(default=0, metadata={"help": "Print this many samples as rendered, trained tokens highlighted."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for the JSON report and the length histogram, NAME.check.json and NAME.check.png for "
            "data file NAME (default: the current directory)."
        },
    )
    report: str | None = field(
        default=None,
        metadata={
            "help": "The JSON report's file, instead of --output_dir; the length histogram goes beside it, .png."
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


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, PreferenceArguments, CheckArguments]:
    """(model, data, preference, check) arguments; DATA may come first, for --data_path. Of the preference settings
    only --objective matters here (which data the file must hold); the others are accepted, and checked, so that a
    training command's flags can be given as they are."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--data_path", argv[0]] + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, PreferenceArguments, CheckArguments), allow_abbrev=False)
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError([message]))
    model_args, data_args, preference_args, check_args, unknown = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    problems = [f"unknown flag or argument: {token}" for token in unknown]
    problems += preference_problems(preference_args)
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
    if check_args.report is not None and check_args.output_dir is not None:
        problems.append("--report and --output_dir both name where the report goes: give one")
    else:
        problems += output_path_problems(report_paths(data_args.data_path, check_args), model_args, data_args)
    if problems:
        raise ConfigError(problems)
    return model_args, data_args, preference_args, check_args


def report_paths(data_path: str, check_args: CheckArguments) -> tuple[str, str]:
    """(JSON report, length histogram) that `check` writes: --report and a .png beside it, else NAME.check.json and
    NAME.check.png in --output_dir or the current directory."""
    if check_args.report is not None:
        return check_args.report, os.path.splitext(check_args.report)[0] + ".png"
    stem = os.path.join(check_args.output_dir or os.curdir, os.path.basename(data_path) + ".check")
    return stem + ".json", stem + ".png"


def output_path_problems(outputs: tuple[str, ...], model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    """Each output file that would replace an input file or be written inside an input folder (symlinks and
    relative paths resolved), named with the input's flag."""
    inputs = [
        ("--data_path", data_args.data_path),
        ("--eval_data_path", data_args.eval_data_path),
        ("--chat_template", model_args.chat_template),
        ("--model_name_or_path", model_args.model_name_or_path),
    ]
    inputs = [(flag, os.path.realpath(path)) for flag, path in inputs if path and os.path.exists(path)]
    problems = []
    for output in outputs:
        real = os.path.realpath(output)
        for flag, path in inputs:
            if real == path or real.startswith(path.rstrip(os.sep) + os.sep):
                where = "is" if real == path else "lies inside"
                problems.append(f"the report file {output} {where} {flag} {path}: it would overwrite an input")
                break
    return problems


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    model_args, data_args, preference_args, check_args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from llmft.data.survey import BatchSettings, check_data, check_preference_data, show_samples, write_histogram
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
    settings = RenderSettings.from_args(data_args)
    if preference_args.objective == "sft":
        report = check_data(data_args.data_path, tokenizer, settings, batch, show=check_args.show)
    else:
        report = check_preference_data(
            data_args.data_path, tokenizer, settings, preference_args.objective, batch, show=check_args.show
        )
    report_path, histogram_path = report_paths(data_args.data_path, check_args)
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    partial = f"{report_path}.{os.getpid()}.tmp"  # a report is whole or absent, never cut short
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=1, ensure_ascii=False)
    os.replace(partial, report_path)
    write_histogram(report, histogram_path)
    if check_args.show:
        show_samples(report, tokenizer)
        print()
    print(report.summary())
    print(
        f"report: {os.path.abspath(report_path)}; length histogram: {os.path.abspath(histogram_path)}; "
        f"checked in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_PROBLEMS if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
