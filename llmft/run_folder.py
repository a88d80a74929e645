"""The output folder of a run or a tool: who holds it, what llmft wrote there, what an overwrite may remove, which
checkpoints in it are complete, where a run starts (`--resume_from_checkpoint`, read once by `resume_choice`), and
which run's settings it holds (RUN_SETTINGS_FILE). Nothing outside the folder is ever touched.

Rules every entry (finetune.py, merge, quantize) follows, and the functions that keep them:
- An output folder never is, contains or lies inside one of the command's inputs (model, adapter, its base, data
  files, config files), symlinks resolved: `inputs_overlap_problems`, checked with the other settings before anything
  loads. Writing a result there, let alone replacing what was there, would destroy what the command reads.
- One process at a time writes into an output folder: `locked_output_dir` takes an exclusive lock (flock, released
  by the kernel when the process ends, however it ends) and a second run or tool on the same folder stops at once
  with a message naming the process that holds it.
- Every top-level name llmft creates in an output folder (checkpoint-N, the final save's files, the run's records,
  TensorBoard's runs/) is recorded in WRITTEN_FILE before it is created (`record_written`). `--overwrite_output_dir`
  removes those names and nothing else (`replace_previous_run`): never a match on file names, so a data file called
  model_train.json or a folder called runs/ that a run did not write stays where it is.
- Nothing llmft does to files here follows a symbolic link: removal unlinks a link itself, `follow_umask` changes the
  modes of the regular files and folders it reaches without going through one.

A run's checkpoints are complete when `checkpoint_problem` finds nothing missing or cut short; a resume takes the
newest complete one (`resume_checkpoint`). The settings that define a run (`run_settings`) are recorded in
RUN_SETTINGS_FILE once training is about to start (`record_run_settings`), so that `--resume_from_checkpoint auto`
continues only the same run, and True or a path only a run whose checkpoints hold tensors of the same shapes
(`check_run_settings`).

Results are staged, and moved into place whole by `place_staged` with SIGTERM held off (llmft.preemption): a run's
final save is written into RUN_STAGING inside the folder and its files then join the checkpoints; a tool writes its
result through `staged_output_dir`, into a hidden sibling folder that becomes the output only once complete. So an
interrupted save, merge or quantization (Ctrl-C, or a SIGTERM from a scheduler) never leaves a folder that looks
finished, nor a partial one behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal, NoReturn

from llmft.checkpoint_pickles import check_checkpoint_pickles
from llmft.compile_cache import DEFAULT_FOLDER as COMPILE_CACHE_FOLDER
from llmft.errors import ConfigError, LlmftError
from llmft.model_folder import model_folder, safetensors_header_problem
from llmft.preemption import signals_deferred, signals_handled

if TYPE_CHECKING:
    from llmft.args import (
        DataArguments,
        LoraArguments,
        ModelArguments,
        PreferenceArguments,
        QuantizationArguments,
        TrainingArguments,
    )

logger = logging.getLogger(__name__)

LOCK_FILE = ".llmft.lock"
WRITTEN_FILE = "llmft_written.json"
# llmft's own bookkeeping in an output folder: never counted as a result, never listed as written
BOOKKEEPING = frozenset({LOCK_FILE, WRITTEN_FILE, WRITTEN_FILE + ".tmp"})

# What a run may write at the top of its output folder (the final save, the Trainer's summaries, PEFT's model card,
# the run's records). Used only to refuse an overwrite: a folder holding one of these that no llmft run recorded
# writing (an earlier version's run, or a file of the user's) is neither cleared by name, since the name alone cannot
# say whose it is, nor trained over, since the final save would replace it or the result would mix with it.
RESULT_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "README.md",
        "llmft_run.json",
        "llmft_run_settings.json",
        "training_args.bin",
        "trainer_state.json",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "training_report.json",
        "training_report.png",
    }
)
RESULT_PREFIXES = ("checkpoint-", "model-0", "pytorch_model-0", ".llmft-saving")  # the last: RUN_STAGING


# ---------------------------------------------------------------- inputs and outputs apart


def inputs_overlap_problems(
    output_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], flag: str = "--output_dir"
) -> list[str]:
    """Why `output_dir` may not take this command's results: for each input (`{flag or description: path}`, None
    skipped) that the output folder is, contains, or lies inside, one message naming both. Paths are compared with
    symlinks resolved, a Hub id as its snapshot in the local cache, and a folder input also as the targets of the
    links in it (a Hub snapshot's files are links into the cache's blobs)."""
    output = os.path.realpath(output_dir)
    problems = []
    for what, path in inputs.items():
        if path is None or str(path) == "":
            continue
        for resolved, itself in _resolved_input(str(path)):
            relation = _relation(output, resolved)
            if relation is not None and (itself or relation != "lies inside"):
                problems.append(
                    f"{flag} {output_dir} {relation} {what} {path}: a command's output folder must be apart from "
                    "its inputs (writing or overwriting there would destroy them); choose another folder"
                )
                break
    return problems


def _resolved_input(path: str) -> list[tuple[str, bool]]:
    """The real paths an input stands for (see `inputs_overlap_problems`), each with whether it is the input itself
    (True) or the target of a link in it (False: an output inside such a target, which could be any folder, is
    allowed)."""
    if not os.path.exists(path):
        folder = model_folder(path).folder  # a Hub id in the local cache; None for anything else
        if folder is None:
            return []
        path = str(folder)
    resolved = [(os.path.realpath(path), True)]
    if os.path.isdir(path):
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            resolved += [(os.path.realpath(e.path), False) for e in entries if e.is_symlink()]
    return resolved


def _relation(output: str, source: str) -> str | None:
    if output == source:
        return "is"
    if _is_inside(source, output):
        return "contains"
    if _is_inside(output, source):
        return "lies inside"
    return None


def _is_inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def training_inputs(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, config_file: str | None
) -> dict[str, str | None]:
    """finetune.py's inputs by flag, for `inputs_overlap_problems`: the model, the data, and every settings file."""
    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--data_path": data_args.data_path,
        "--eval_data_path": data_args.eval_data_path,
        "the config file": config_file,
    }
    for flag, value in (
        ("--chat_template", model_args.chat_template),
        ("--deepspeed", training_args.deepspeed),
        ("--fsdp_config", training_args.fsdp_config),
    ):
        if isinstance(value, str) and os.path.isfile(value):
            inputs[flag] = value
    return inputs


def output_dir_problems(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, config_file: str | None
) -> list[str]:
    """What keeps a training run from writing into --output_dir, for the settings checks: a folder that cannot take
    the run as --resume_from_checkpoint asks (`_resume_problems`), an input there (`inputs_overlap_problems`), or,
    with --overwrite_output_dir, a previous result it may not remove (`overwrite_problems`)."""
    out = training_args.output_dir
    problems = inputs_overlap_problems(out, training_inputs(model_args, data_args, training_args, config_file))
    if not problems and training_args.overwrite_output_dir:
        problems += overwrite_problems(out)
    return _resume_problems(training_args) + problems


# ---------------------------------------------------------------- checkpoints and their completeness

PREFIX_CHECKPOINT = "checkpoint-"


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, or None when it is complete. The Trainer writes
    trainer_state.json last, after the weights, optimizer, scheduler and RNG states, so a checkpoint is complete once
    that file parses and the weights it holds are whole (a kill -9 mid-save leaves neither)."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (its save was interrupted)"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is cut short (its save was interrupted)"
    names = os.listdir(path)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights and not any(n.endswith(".bin") or n.startswith("global_step") for n in names):
        return "no weights"
    for name in weights:
        if (problem := safetensors_header_problem(os.path.join(path, name))) is not None:
            return problem
    return _rank_files_problem(path, names)


def _rank_files_problem(path: str, names: list[str]) -> str | None:
    """What a kill -9 of a run of several ranks can leave behind trainer_state.json: rank 0 writes that file once its
    own part is saved, without waiting for the other ranks' rng_state_N.pth (DeepSpeed's barrier comes before them).
    So each rank's file must be there (rng_state_0..N-1, N the number of ZeRO optimizer shards under DeepSpeed) and
    every torch.save file whole (a zip whose directory, written last, reads); a DeepSpeed checkpoint's `latest`
    must name its global_step folder, which holds the model states."""
    rng = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"rng_state_(\d+)\.pth", n)))
    if rng != list(range(len(rng))):
        missing = sorted(set(range(max(rng) + 1)) - set(rng))
        return f"rng_state_{missing[0]}.pth is missing (a rank's save was interrupted)"
    tags = [n for n in names if n.startswith("global_step") and os.path.isdir(os.path.join(path, n))]
    if tags:
        try:
            with open(os.path.join(path, "latest"), encoding="utf-8") as f:
                tag = f.read().strip()
        except OSError:
            return f"DeepSpeed's latest file is missing (beside {', '.join(sorted(tags))})"
        if tag not in tags:
            return f"DeepSpeed's latest names {tag!r}, which is not there"
        shards = os.listdir(os.path.join(path, tag))
        if not any(n.endswith("model_states.pt") for n in shards):
            return f"{tag} holds no model states"
        optim = sorted(
            int(m.group(1))
            for n in shards
            if (m := re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", n))
        )
        if rng and optim == list(range(len(optim))) and len(rng) < len(optim):
            return f"rng_state_{len(rng)}.pth is missing (a rank's save was interrupted)"
        if optim != list(range(len(optim))) or (rng and len(rng) != len(optim)):
            return (
                f"{tag} holds the optimizer shards of ranks {optim or 'none'}, beside the RNG states of "
                f"{len(rng)} ranks (a rank's save was interrupted)"
            )
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith((".pt", ".pth", ".bin")):  # torch.save's zip files (FSDP's model and optimizer: .bin)
                file = os.path.join(root, name)
                try:
                    with zipfile.ZipFile(file):
                        pass
                except (OSError, zipfile.BadZipFile):
                    return f"{os.path.relpath(file, path)} is cut short (its save was interrupted)"
    return None


def checkpoints(output_dir: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(complete checkpoint folders, oldest first; [(incomplete folder, why)]) in output_dir."""
    if not os.path.isdir(output_dir):
        return [], []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(PREFIX_CHECKPOINT) :]
        if name.startswith(PREFIX_CHECKPOINT) and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(step), os.path.join(output_dir, name)))
    complete, incomplete = [], []
    for _, path in sorted(found):
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            incomplete.append((path, problem))
    return complete, incomplete


# ---------------------------------------------------------------- where a run starts: --resume_from_checkpoint


@dataclass(frozen=True)
class Resume:
    """--resume_from_checkpoint, read once (`resume_choice`) for the settings checks, the settings record and the
    resume itself:
    - `fresh` (unset or False): start from step 0, in an empty --output_dir (or one --overwrite_output_dir clears);
    - `newest` (True): the newest complete checkpoint of --output_dir, which must hold one;
    - `auto`: the same when --output_dir holds a complete checkpoint, which must then be of this same run (its
      settings record, RUN_SETTINGS_FILE, says so), a fresh start when it holds none;
    - `path`: the checkpoint folder given."""

    kind: Literal["fresh", "newest", "auto", "path"]
    given: str | None = None  # the flag's value as written, for messages; for `path`, the folder

    @property
    def flag(self) -> str:
        return f"--resume_from_checkpoint {self.given}"


def resume_choice(value: str | None) -> Resume:
    """What `--resume_from_checkpoint value` asks for (see `Resume`); True, False and auto in any case."""
    word = None if value is None else str(value).lower()
    if word is None or word == "false":
        return Resume("fresh", value)
    if word == "true":
        return Resume("newest", value)
    if word == "auto":
        return Resume("auto", value)
    return Resume("path", value)


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` takes: the checkpoint folder to resume from, or None (see
    `Resume`). Incomplete checkpoints (a save cut short by kill -9) are skipped, and the log says which and why;
    `check_run_settings` has checked before that `auto`'s are of this same run. A checkpoint whose pickles could run
    code is refused (LlmftError) unless --trust_checkpoint_pickles True (llmft/checkpoint_pickles.py)."""
    resume = resume_choice(training_args.resume_from_checkpoint)
    if resume.kind == "fresh":
        return None
    if resume.kind == "path":
        check_checkpoint_pickles(resume.given, trust=training_args.trust_checkpoint_pickles)
        return resume.given
    complete, incomplete = checkpoints(training_args.output_dir)
    for path, why in incomplete:
        logger.warning("not resuming from %s: %s", path, why)
    if not complete:  # only with auto: `output_dir_problems` refuses True without a complete checkpoint
        logger.warning(
            "--resume_from_checkpoint auto: no complete checkpoint in %s, starting from step 0",
            training_args.output_dir,
        )
        return None
    check_checkpoint_pickles(complete[-1], trust=training_args.trust_checkpoint_pickles)
    logger.warning("resuming from %s", complete[-1])
    return complete[-1]


def _resume_problems(training_args: TrainingArguments) -> list[str]:
    """Why --output_dir cannot take this run as --resume_from_checkpoint asks (see `Resume`): a file there, a folder
    that cannot be created or written, a resume with an overwrite, no complete checkpoint to resume from, or a fresh
    start over what a previous run left."""
    out, resume = training_args.output_dir, resume_choice(training_args.resume_from_checkpoint)
    if os.path.exists(out) and not os.path.isdir(out):
        return [f"--output_dir {out} is a file, not a directory"]
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest part of the path that exists is where it will be created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"--output_dir {out} cannot be created: {existing} is a file"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"--output_dir {out} cannot be written: no write permission on {existing}"]
    if resume.kind != "fresh" and training_args.overwrite_output_dir:
        return [
            "--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir replaces it: "
            "choose one"
        ]
    if resume.kind == "newest":
        complete, incomplete = checkpoints(out)
        if not complete:
            skipped = "".join(f"; {os.path.basename(p)} is incomplete: {why}" for p, why in incomplete)
            return [f"{resume.flag}: no complete checkpoint-* directory in --output_dir {out}{skipped}"]
    elif resume.kind == "path" and not os.path.isdir(resume.given):
        return [f"{resume.flag}: no such checkpoint directory"]
    elif resume.kind == "path":
        if (problem := checkpoint_problem(resume.given)) is not None:
            return [f"{resume.flag}: incomplete checkpoint: {problem}"]
    elif (
        resume.kind == "fresh"
        and os.path.isdir(out)
        and set(os.listdir(out)) - {RUN_SETTINGS_FILE, COMPILE_CACHE_FOLDER} - BOOKKEEPING  # a run cut short early
        and not training_args.overwrite_output_dir
    ):
        return [
            f"--output_dir {out} is not empty: pass --resume_from_checkpoint True to continue that run, "
            "--overwrite_output_dir True to train over it, or choose another directory"
        ]
    return []  # auto: checkpoints of this same run, or a fresh start; `check_run_settings` tells which


# ---------------------------------------------------------------- which run an output folder holds

RUN_SETTINGS_FILE = "llmft_run_settings.json"

# TrainingArguments that change what is trained or in what order. Left out: where outputs go, logging, saving,
# evaluation, speed-only switches (gradient checkpointing, dataloader workers) and the resume flags themselves.
TRAINING_SETTINGS = (
    "seed",
    "data_seed",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "optim_args",
    "bf16",
    "fp16",
    "deepspeed",
    "fsdp",
    "label_smoothing_factor",
    "neftune_noise_alpha",
    "group_by_length",
)
# Fields of llmft's own settings that do not change the run.
IGNORED_SETTINGS = ("trust_remote_code", "preprocessing_num_workers")


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    value = getattr(value, "value", value)  # transformers' string enums
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _data_file(path: str | None) -> dict | None:
    if path is None:
        return None
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path) if os.path.isfile(path) else None}


def run_settings(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments,
    preference_args: PreferenceArguments | None = None,
) -> dict:
    """The settings that define a run: model, data (each file's absolute path and size), LoRA, quantization, seed,
    batch and schedule, and a preference objective's settings (an SFT run's record leaves them out: they are all
    their defaults there). Two runs with the same settings train the same weights in the same order."""
    settings = {}
    if preference_args is not None and preference_args.objective != "sft":
        settings.update({f.name: _plain(getattr(preference_args, f.name)) for f in dataclasses.fields(preference_args)})
    for args in (model_args, data_args, lora_args, quant_args):
        for f in dataclasses.fields(args):
            if f.name not in IGNORED_SETTINGS:
                settings[f.name] = _plain(getattr(args, f.name))
    settings["data_path"] = _data_file(data_args.data_path)
    settings["eval_data_path"] = _data_file(data_args.eval_data_path)
    for name in TRAINING_SETTINGS:
        if hasattr(training_args, name):
            settings[name] = _plain(getattr(training_args, name))
    return settings


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_run_settings(output_dir: str) -> dict | None:
    """The settings recorded in output_dir ({"fingerprint", "settings"}), or None when it holds no readable record."""
    try:
        with open(os.path.join(output_dir, RUN_SETTINGS_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def check_run_settings(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments,
    preference_args: PreferenceArguments | None = None,
) -> dict:
    """At the start of a run, before anything loads: this run's settings record; with `--resume_from_checkpoint
    auto`, a ConfigError naming the settings that differ when the output folder holds another run; with True or a
    checkpoint's path, one naming those of SHAPE_SETTINGS that differ from the run that wrote the checkpoints."""
    settings = run_settings(model_args, data_args, lora_args, quant_args, training_args, preference_args)
    record = {"fingerprint": settings_fingerprint(settings), "settings": settings}
    resume = resume_choice(training_args.resume_from_checkpoint)
    if resume.kind == "auto":
        _check_same_run(training_args.output_dir, settings, record["fingerprint"])
    elif resume.kind == "newest":
        _check_same_shapes(resume.flag, training_args.output_dir, settings)
    elif resume.kind == "path":
        _check_same_shapes(resume.flag, os.path.dirname(os.path.abspath(resume.given)), settings)
    return record


# Settings that decide which tensors a checkpoint holds and their shapes: a run resumed with other values cannot load
# its checkpoint (PEFT and the Trainer fail with a size-mismatch traceback), whatever else may change on a resume.
SHAPE_SETTINGS = (
    "use_lora",
    "lora_r",
    "lora_target_modules",
    "lora_modules_to_save",
    "lora_bias",
    "use_dora",
    "lora_init",
)


def record_run_settings(record: dict, training_args: TrainingArguments) -> None:
    """Rank 0 writes `check_run_settings`' record into RUN_SETTINGS_FILE once training is about to start, so a run
    stopped earlier by a data or model error leaves the output folder as it was."""
    out = training_args.output_dir
    if training_args.process_index != 0:
        return
    fingerprint, settings = record["fingerprint"], record["settings"]
    os.makedirs(out, exist_ok=True)
    # what this run writes at the top of the folder besides checkpoints, reports and the final save (which record
    # themselves): these settings, and TensorBoard's runs/ unless something else made that folder
    tensorboard = "tensorboard" in (training_args.report_to or []) and not os.path.lexists(os.path.join(out, "runs"))
    record_written(out, RUN_SETTINGS_FILE, *(["runs"] if tensorboard else []))
    path = os.path.join(out, RUN_SETTINGS_FILE)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fingerprint, "settings": settings}, f, indent=2, sort_keys=True)
    os.replace(partial, path)  # whole or not at all: other ranks may be reading it


def _check_same_run(out: str, settings: dict, fingerprint: str) -> None:
    flag = "--resume_from_checkpoint auto"
    if not os.path.isdir(out) or not set(os.listdir(out)) - BOOKKEEPING:
        return  # a fresh run (this run's lock is there already)
    record = read_run_settings(out)
    if record is None:
        raise ConfigError(
            [
                f"{flag}: --output_dir {out} holds files but no {RUN_SETTINGS_FILE}, so which run they "
                "belong to is unknown: pass --resume_from_checkpoint True to continue it anyway, "
                "--overwrite_output_dir True to replace it, or choose another directory"
            ]
        )
    if record["fingerprint"] == fingerprint:
        return
    recorded = record.get("settings") or {}
    shown = _differences(recorded, settings, set(recorded) | set(settings))
    raise ConfigError(
        [
            f"{flag}: --output_dir {out} holds a different run: {shown or 'its fingerprint differs'}; "
            "choose another directory, --overwrite_output_dir True to replace that run, or "
            "--resume_from_checkpoint True to continue it with these settings"
        ]
    )


def _differences(recorded: dict, settings: dict, keys: set[str]) -> str:
    """The settings among `keys` that differ, as "name (value there, value now)", the first six."""
    differ = sorted(k for k in keys if recorded.get(k) != settings.get(k))
    return ", ".join(
        f"{k} ({json.dumps(recorded.get(k))} there, {json.dumps(settings.get(k))} now)" for k in differ[:6]
    ) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")


def _check_same_shapes(flag: str, folder: str, settings: dict) -> None:
    """With a resume other than auto (which checks every setting), refuse settings whose checkpoint tensors differ
    from the ones the run recorded in `folder` (SHAPE_SETTINGS); nothing to check without a record."""
    record = read_run_settings(folder) if os.path.isdir(folder) else None
    if record is None:
        return
    recorded = record.get("settings") or {}
    shown = _differences(recorded, settings, {k for k in SHAPE_SETTINGS if k in recorded})
    if shown:
        raise ConfigError(
            [
                f"{flag}: the run in {folder} was trained with other adapter settings: {shown}; its checkpoints "
                "hold tensors of other shapes, which this run cannot load: resume with the settings it had, or "
                "start a new run (another --output_dir, or --overwrite_output_dir True)"
            ]
        )


# ---------------------------------------------------------------- one process at a time


class _FolderLock:
    """An exclusive flock on `path`, a file llmft creates for it; its text says who holds it (for the message the
    next process gets). The file is removed on release, and a lock won on a file that was removed meanwhile is
    taken again on the new one, so two processes can never both believe they hold it."""

    def __init__(self, path: str, describe: str) -> None:
        self.path, self.describe = path, describe
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:  # never through a link: the lock file is llmft's own, in the folder itself
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise LlmftError(f"{self.describe}: cannot create the lock file {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise LlmftError(f"{self.describe}: cannot lock {self.path}: {e.strerror}") from None
                raise LlmftError(
                    f"{self.describe} is in use by another llmft process ({holder}); wait until it ends, or "
                    "choose another folder"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released it and removed the file between our open and our lock
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
        }
        with contextlib.suppress(OSError):  # who holds it is for the message only; a full disk must not stop here
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # while still held: a waiting process then retries on a new file
        os.close(self.fd)
        self.fd = None
        _HELD.discard(self)


_HELD: set[_FolderLock] = set()


def release_held_locks() -> None:
    """Release every output folder lock this process holds, for a signal handler about to end the process without
    unwinding (a kill -9 leaves the lock file behind, unlocked: the next process takes it over)."""
    for lock in list(_HELD):
        lock.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "its lock file does not say which"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: " + str(
        holder.get("command", "?")
    )


@contextlib.contextmanager
def locked_output_dir(
    output_dir: str | os.PathLike, *, flag: str = "--output_dir", staged: bool = False
) -> Iterator[None]:
    """Hold `output_dir` exclusively while the block runs (see the module docstring); a LlmftError naming the holder
    when another process has it. A run locks LOCK_FILE inside the folder (created for it, and removed again with the
    folder when the run leaves nothing else there). A tool (`staged`), whose result replaces the whole folder, locks
    a hidden sibling instead, and the folder's own LOCK_FILE too while the folder exists, so that no run is writing
    into what it replaces."""
    output = Path(output_dir)
    describe = f"{flag} {output}"
    locks = []
    created = False
    try:
        if staged:
            output.parent.mkdir(parents=True, exist_ok=True)
            locks.append(_FolderLock(str(output.parent / f".{output.name}{LOCK_FILE}"), describe))
            locks[-1].acquire()
            if output.is_dir() and not output.is_symlink():
                locks.append(_FolderLock(str(output / LOCK_FILE), describe))
                locks[-1].acquire()
        else:
            created = not output.exists()
            output.mkdir(parents=True, exist_ok=True)
            locks.append(_FolderLock(str(output / LOCK_FILE), describe))
            locks[-1].acquire()
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
        if created:
            _remove_if_unused(output)


def _remove_if_unused(folder: Path) -> None:
    """Remove `folder`, which a run created, when it holds only llmft's bookkeeping: a run stopped before it wrote
    anything leaves the file system as it found it."""
    with contextlib.suppress(OSError):
        if set(os.listdir(folder)) <= BOOKKEEPING:
            for name in BOOKKEEPING:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def lock_run_output_dir(training_args: TrainingArguments) -> contextlib.AbstractContextManager:
    """`locked_output_dir` for a training run, held by its first process only (the others write where it says)."""
    if training_args.process_index != 0:
        return contextlib.nullcontext()
    return locked_output_dir(training_args.output_dir)


# ---------------------------------------------------------------- what llmft wrote


def written_names(output_dir: str | os.PathLike) -> set[str]:
    """The top-level names WRITTEN_FILE records as written by llmft into `output_dir` (empty when there is none or it
    does not parse). Only single plain names are taken: a record naming `..` or a path cannot point elsewhere."""
    try:
        with open(os.path.join(output_dir, WRITTEN_FILE), encoding="utf-8") as f:
            names = json.load(f).get("written", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and _plain_name(n)}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def record_written(output_dir: str | os.PathLike, *names: str) -> None:
    """Add `names` (top-level entries of `output_dir`) to its record of what llmft wrote; call it before creating
    them, so that a process killed halfway leaves nothing of its own unrecorded. Written whole (a temporary file
    renamed over it)."""
    new = {n for n in names if _plain_name(n)} - BOOKKEEPING
    recorded = written_names(output_dir)
    if new <= recorded:
        return
    _write_record(output_dir, recorded | new)


def _write_record(output_dir: str | os.PathLike, names: Iterable[str]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, WRITTEN_FILE)
    partial = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # left by a process killed while writing it; a link there goes, not what it points to
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump({"written": sorted(names)}, f, indent=1)
    os.replace(partial, path)


def foreign_names(output_dir: str | os.PathLike) -> list[str]:
    """The entries of `output_dir` that llmft did not record writing, sorted ([] when it does not exist)."""
    try:
        present = set(os.listdir(output_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(present - BOOKKEEPING - written_names(output_dir))


def overwrite_problems(output_dir: str | os.PathLike, flag: str = "--output_dir", *, whole: bool = False) -> list[str]:
    """Why `--overwrite_output_dir` may not replace what `output_dir` holds: entries llmft did not record writing
    that look like a run's results (see RESULT_NAMES), or with `whole` (a tool's result replaces the whole folder)
    any entry llmft did not record writing. Other entries a run leaves where they are."""
    foreign = foreign_names(output_dir)
    if not whole:
        foreign = [n for n in foreign if n in RESULT_NAMES or n.startswith(RESULT_PREFIXES)]
    if not foreign:
        return []
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    why = (
        "a tool's result replaces the whole folder"
        if whole
        else "this run would replace them or mix its result with them, and their names cannot say they are a run's"
    )
    return [
        f"{flag} {output_dir} holds {shown}, which no llmft run or tool recorded writing there ({WRITTEN_FILE}); "
        f"--overwrite_output_dir removes only what llmft recorded, and {why}: move them away yourself, or choose "
        "another folder"
    ]


def remove_entry(folder: str | os.PathLike, name: str) -> None:
    """Remove `folder/name` without following a symbolic link: a link is unlinked, a folder removed with what is in
    it (shutil.rmtree never follows the links inside), anything else unlinked."""
    path = os.path.join(folder, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what llmft recorded writing in output_dir (checkpoints, weights, configs, logs) and reset the record;
    returns the names removed. Nothing else in the folder is touched."""
    removed = sorted(n for n in written_names(output_dir) if os.path.lexists(os.path.join(output_dir, n)))
    for name in removed:
        remove_entry(output_dir, name)
    if os.path.lexists(os.path.join(output_dir, WRITTEN_FILE)):
        _write_record(output_dir, [])
    return removed


def replace_previous_run(training_args: TrainingArguments) -> None:
    """--overwrite_output_dir: rank 0 removes what a previous run recorded writing in output_dir before this run
    writes there, so that neither resume nor a reload can mix the two runs; the log lists what went."""
    with training_args.main_process_first(local=False, desc="replacing the previous run"):
        if training_args.process_index == 0:
            removed = clear_previous_run(training_args.output_dir)
            if removed:
                logger.warning(
                    "--overwrite_output_dir: replacing the previous run in %s (removed %s)",
                    training_args.output_dir,
                    ", ".join(removed),
                )


# ---------------------------------------------------------------- a full disk

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save's C++ writer loses the errno and reports only where its stream stopped (`unexpected pos`, `file write
# failed`): taken as a full disk when the folder's file system has less than this left
NEARLY_FULL_BYTES = 64 * 1024 * 1024


RESUME_ADVICE = (
    "the save cut short is incomplete and is never resumed from, earlier checkpoints are whole: free some space and "
    "run again with --resume_from_checkpoint True"
)


@contextlib.contextmanager
def disk_full_is_user_error(
    output_dir: str | os.PathLike, flag: str = "--output_dir", advice: str = RESUME_ADVICE
) -> Iterator[None]:
    """Turn a write that failed because the disk (or the user's quota) is full into a LlmftError that says so and
    how to go on (`advice`; a run's: the save cut short is incomplete, resume skips it as
    `checkpoint_problem` says, and the earlier checkpoints are whole). Any other error passes through
    unchanged."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e, output_dir):
            raise
        where = next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None)
        raise LlmftError(
            f"the disk of {flag} {output_dir} is full (writing {where or 'a checkpoint or the result'}: {e}); {advice}"
        ) from None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_disk_full(error: BaseException, output_dir: str | os.PathLike) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(m in str(e).lower() for m in DISK_FULL_MESSAGES):
            return True
    if isinstance(error, RuntimeError) and any(m in str(error) for m in ("unexpected pos", "file write failed")):
        try:
            status = os.statvfs(output_dir)
        except OSError:
            return False
        return status.f_bavail * status.f_frsize < NEARLY_FULL_BYTES
    return False


# ---------------------------------------------------------------- file modes


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a folder, recursively, or a file) the modes a plain open() or mkdir() would: 0666 / 0777 less
    the umask. Used on what llmft itself just wrote: safetensors creates its files 0600 and tempfile.mkdtemp its
    folders 0700, which would keep a result from the rest of a team on shared storage. Symbolic links are neither
    changed nor followed (`path` itself included): each file or folder is opened without following a link and its
    mode set through that descriptor, so a link swapped in meanwhile changes nothing outside."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IFREG: 0o666 & ~umask, stat.S_IFDIR: 0o777 & ~umask}
    path = os.fspath(path)
    if not _set_mode(path, modes) or not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path):  # never descends through a link to a folder
        for name in dirs + files:
            _set_mode(os.path.join(root, name), modes)


def _set_mode(path: str, modes: dict[int, int]) -> bool:
    """Set a regular file's or folder's mode from `modes` (by file type); False for a link or anything else."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
        if kind not in modes:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = os.fstat(fd)
        kind = stat.S_IFMT(status.st_mode)
        if kind in modes and status.st_mode & 0o777 != modes[kind]:
            os.fchmod(fd, modes[kind])
        return kind in modes
    finally:
        os.close(fd)


# ---------------------------------------------------------------- staged results


def check_output_dir(
    output_dir: str | Path,
    *,
    force: bool,
    flag: str = "--output_dir",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> None:
    """Fail before any work when `output_dir` cannot take a tool's result: a file, a folder apart from none of the
    tool's inputs (`inputs_overlap_problems`), a non-empty folder without --overwrite_output_dir, or one holding
    entries no llmft command recorded writing (`overwrite_problems`: the result replaces the whole folder)."""
    output = Path(output_dir)
    if output.is_symlink():  # replacing it would replace the link, and the result would land beside its target
        raise LlmftError(f"{flag} {output} is a symbolic link: give the folder it points to, or a new folder")
    if output.exists() and not output.is_dir():
        raise LlmftError(f"{flag} {output} exists and is not a folder")
    problems = inputs_overlap_problems(output, inputs or {}, flag)
    if problems:
        raise LlmftError(problems[0])
    if output.is_dir() and set(os.listdir(output)) - BOOKKEEPING:
        if not force:
            raise LlmftError(
                f"{flag} {output} is not empty: choose a new folder, or pass --overwrite_output_dir True to replace it"
            )
        if problems := overwrite_problems(output, flag, whole=True):
            raise LlmftError(problems[0])


# what ends a tool cleanly while it writes its result (SIGUSR1 keeps its default: it is a training run's request)
TOOL_SIGNALS = (signal.SIGTERM,)


class Terminated(SystemExit):
    """Raised in the main thread when a SIGTERM arrives while a result is being written, so that the partial
    folder is removed on the way out; exits with the status a shell gives a process killed by SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


RUN_STAGING = ".llmft-saving"  # a run's final save is written here inside --output_dir, then `place_staged`


def place_staged(staging: str | os.PathLike, output_dir: str | os.PathLike, *, whole: bool) -> None:
    """Move a complete result from its staging folder into place, and remove the staging folder: the one way llmft
    puts a result where a reader finds it, so that an interrupted save never leaves a folder that looks finished.
    Callers hold SIGTERM off meanwhile (llmft.preemption.signals_deferred).
    - `whole` (a tool's result, staged in a sibling folder): the staging folder becomes `output_dir`, replacing what
      was there (`staged_output_dir` has checked that llmft wrote all of it);
    - otherwise (a run's final save, beside its checkpoints): each entry replaces the entry of that name in
      `output_dir`, recorded in WRITTEN_FILE first, the weights last and their index after them: a kill -9 between
      two renames leaves a result that does not load (no weights), never one that loads with some of them."""
    staging, output = Path(staging), Path(output_dir)
    if whole:
        if output.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
            os.replace(output, replaced / output.name)
            os.replace(staging, output)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, output)
        return
    names = sorted(
        os.listdir(staging),
        key=lambda n: (n.endswith((".safetensors", ".bin", ".index.json")), n.endswith(".index.json"), n),
    )
    record_written(output, *names)
    for name in names:
        source, target = staging / name, output / name
        if source.is_dir() or (target.is_dir() and not target.is_symlink()):
            remove_entry(output, name)  # rename cannot put a folder over an entry (a link: only the link goes)
        os.replace(source, target)
    os.rmdir(staging)


@contextlib.contextmanager
def staged_output_dir(
    output_dir: str | Path,
    *,
    force: bool,
    flag: str = "--output_dir",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty hidden sibling of `output_dir` to write a result into; when the block completes it becomes
    `output_dir` (with `force`, replacing what llmft wrote there only then), its files readable as the umask allows
    and recorded in WRITTEN_FILE. The output folder is locked throughout (`locked_output_dir`). On any error, an
    interrupt or a SIGTERM, the partial folder is removed and `output_dir` is left as it was; a SIGTERM during the
    final swap waits for the swap to finish."""
    output = Path(output_dir)
    check_output_dir(output, force=force, flag=flag, inputs=inputs)
    with locked_output_dir(output, flag=flag, staged=True):
        with signals_handled(_raise_terminated, TOOL_SIGNALS):
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
            try:
                follow_umask(staging)  # mkdtemp makes it private; the result should read like any new folder
                with disk_full_is_user_error(output, flag, f"nothing was written to {output}: free some space"):
                    yield staging
                follow_umask(staging)  # safetensors writes its files 0600
                _write_record(staging, os.listdir(staging))
                check_output_dir(output, force=force, flag=flag)  # nothing foreign arrived while it was written
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        with signals_deferred(f"moving the result into {flag} {output}", TOOL_SIGNALS) as deferred:
            place_staged(staging, output, whole=True)
    if deferred:
        raise Terminated()
