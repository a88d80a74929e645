"""Reading a training run's settings: flags and an optional YAML/JSON config file, then the plan, then every check
in one list.

`parse_run(argv)` reads `finetune.py [CONFIG.yaml|CONFIG.json] [--flag value ...]` into the dataclasses of
llmft/args.py: the config file's keys are the flag names, flags given on the command line override it. It resolves
the run's plan (llmft/plan.py) from them; unknown flags or keys, values out of range, settings that contradict each
other or that the plan cannot serve (llmft/checks.py) and an output folder that cannot take the run
(llmft/run_folder.py) are all reported together in one `ConfigError` before anything heavy is loaded.
`parse_args(argv)` is the same without the plan.

`parse_bool` is how every llmft command reads a boolean flag's value (`fsdp_flag_as_switch` included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from argparse import ArgumentTypeError
from typing import NoReturn

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from llmft.args import (
    ARGUMENT_CLASSES,
    DataArguments,
    LoraArguments,
    ModelArguments,
    PreferenceArguments,
    QuantizationArguments,
    TrainingArguments,
)
from llmft.checks import training_number_problems, validate
from llmft.errors import ConfigError
from llmft.plan import RunPlan, resolve_plan
from llmft.run_folder import output_dir_problems


def parse_bool(value: str | bool) -> bool:
    """A boolean flag's value, for every llmft command and tool: the words finetune.py's flags take (HfArgumentParser
    reads its boolean fields with transformers' `string_to_bool`): true/false, yes/no, t/f, y/n, 1/0, in any case.
    argparse.ArgumentTypeError for anything else, so that it serves as an argparse `type`."""
    return string_to_bool(value)


def fsdp_flag_as_switch(argv: list[str]) -> list[str]:
    """`--fsdp True` / `--fsdp False` (any `parse_bool` word, and a config file's `fsdp: true`) as transformers 5
    reads them: the bare switch `--fsdp`, or nothing. transformers 5.23's `TrainingArguments.fsdp` takes any word
    after --fsdp for a legacy sharding option and rejects `True` ("Unknown `fsdp` option: True"); every other boolean
    flag of finetune.py is written `--flag True`."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--fsdp" and i + 1 < len(argv) and _bool_word(argv[i + 1]) is not None:
            value, i = _bool_word(argv[i + 1]), i + 2
        elif token.startswith("--fsdp=") and _bool_word(token.split("=", 1)[1]) is not None:
            value, i = _bool_word(token.split("=", 1)[1]), i + 1
        else:
            out.append(token)
            i += 1
            continue
        if value:
            out.append("--fsdp")
    return out


def _bool_word(token: str) -> bool | None:
    """`parse_bool(token)`, or None when the token is not a boolean word (a legacy --fsdp option, say)."""
    try:
        return parse_bool(token)
    except ArgumentTypeError:
        return None


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, QuantizationArguments, TrainingArguments]:
    """(model, data, lora, quant, training) arguments from a config file and flags, checked (`parse_run`)."""
    return parse_run(argv)[:5]


def parse_run(
    argv: list[str] | None = None,
) -> tuple[
    ModelArguments, DataArguments, LoraArguments, QuantizationArguments, TrainingArguments, PreferenceArguments, RunPlan
]:
    """(model, data, lora, quant, training, preference arguments, plan) from a config file and flags: the arguments
    parsed, the run's plan resolved from them (llmft/plan.py), then every check of both (llmft/checks.py) and of the
    output folder (llmft/run_folder.py) collected into one ConfigError. A local --model_name_or_path is made absolute
    (it is recorded in adapter_config.json, and must resolve from anywhere)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = None
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config_file = argv[0]
        argv = config_file_flags(argv[0]) + argv[1:]
    argv = fsdp_flag_as_switch(argv)
    # allow_abbrev=False: a misspelt `--learning_rat` must be reported, not taken for --learning_rate
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    parser.error = _raise_config_error  # one clear line, not argparse's usage text of several hundred flags
    namespace, unknown = parser.parse_known_args(argv)
    problems = _unknown_argument_problems(unknown)
    number_problems = training_number_problems(vars(namespace))
    parsed = []
    for cls in ARGUMENT_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            parsed.append(cls(**{k: v for k, v in vars(namespace).items() if k in names}))
        except (ValueError, OverflowError) as e:  # TrainingArguments.__post_init__ rejects some values itself
            if not (cls is TrainingArguments and number_problems):  # those say which flag, its own may not
                problems.append(str(e))
            parsed.append(None)
    problems += number_problems
    model_args, data_args, lora_args, quant_args, training_args, preference_args = parsed
    model_path = model_args.model_name_or_path
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)
    plan = None
    if training_args is not None:
        planned = dataclasses.replace(model_args, model_name_or_path=model_path)
        plan = resolve_plan(planned, data_args, lora_args, quant_args, training_args, preference_args)
    # the messages name the model as it was given
    problems += validate(model_args, data_args, lora_args, quant_args, training_args, plan, preference_args)
    if training_args is not None:
        problems += output_dir_problems(model_args, data_args, training_args, config_file)
    if problems:
        raise ConfigError(problems)
    model_args.model_name_or_path = model_path
    return model_args, data_args, lora_args, quant_args, training_args, preference_args, plan


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _unknown_argument_problems(unknown: list[str]) -> list[str]:
    problems, after_flag = [], False
    for token in unknown:
        if token.startswith("-") and not _is_number(token):
            problems.append(f"unknown flag or key: {token.split('=', 1)[0]}")
            after_flag = "=" not in token
        elif not after_flag:
            problems.append(f"unexpected argument: {token}")
    return problems


def _raise_config_error(message: str) -> NoReturn:
    raise ConfigError([message])


def config_file_flags(path: str) -> list[str]:
    """A YAML/JSON config as the flags it stands for; lists become repeated values, booleans True/False."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file {path}: no such file"])
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f) or {}
        except Exception as e:  # yaml and json errors both say where in the file
            raise ConfigError([f"config file {path}: cannot parse: {e}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"config file {path}: expected a mapping of flag names to values"])
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, list):
            flags.extend(str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags
