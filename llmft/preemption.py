"""Preemption: stop on SIGTERM or SIGUSR1 at the next optimizer step with one checkpoint, then exit EXIT_PREEMPTED;
and the record of a run's settings, by which `--resume_from_checkpoint auto` knows an output folder holds this run.

Schedulers ask a job to stop with a signal some time before they kill it: Slurm sends SIGTERM at a time limit or a
preemption (and any signal `--signal` names ahead of it), Kubernetes and most cloud spot instances SIGTERM. A rank
that gets one only sets a flag (`PreemptionCallback`): stopping in the middle of a step would leave the optimizer
half-stepped, and stopping alone would leave the other ranks waiting in their next collective. At the end of every
optimizer step the ranks take the MAX of their flags (one all-reduce of one element), so they all see a request that
reached any of them, and all stop after that same step: the Trainer writes its checkpoint (weights, optimizer,
scheduler, RNG states and the data position), the ranks wait until every rank's part is on disk, and each process
exits with EXIT_PREEMPTED (75) instead of going on to the final save. `--resume_from_checkpoint True` (or `auto`)
then continues from that checkpoint as if the run had never stopped.

The handlers are installed while training runs (between on_train_begin and on_train_end). Outside it:
- before training (loading the data and the model, which can take minutes), and in what little follows it, there is
  no step to finish: the process logs one line and ends at once as the signal's default would (status 128 + N), with
  nothing of the run half-written: --output_dir is touched only right before training (`exit_on_signal`, around
  finetune.py's main);
- during the final save, which is the run's result, the signal waits: the staged save (llmft/saving.py) finishes and
  moves into place whole, the log says so, and the run ends with status 0 (`signals_deferred`). A scheduler's grace
  time before its kill is meant for such a save; a kill -9 during it leaves the staging folder or, while the files
  move into place (the weights last), a result without its weights: never one that loads half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from llmft.errors import EXIT_PREEMPTED, PREEMPTION_SIGNALS, ConfigError
from llmft.run_folder import BOOKKEEPING, record_written, release_held_locks

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llmft.args import DataArguments, LoraArguments, ModelArguments, QuantizationArguments

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank once a preemption checkpoint is on disk: the process exits with EXIT_PREEMPTED, without a
    traceback, and skips what would follow training (the final save of a run that has not finished)."""

    def __init__(self, step: int) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class PreemptionCallback(TrainerCallback):
    """Turn SIGTERM/SIGUSR1 into a checkpoint at the next optimizer-step boundary and an exit with EXIT_PREEMPTED,
    on all ranks together (see the module's docstring)."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None  # set by the signal handler, on this rank only
        self.stopped_at: int | None = None  # the step after which all ranks agreed to stop
        self._previous_handlers: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            logger.warning("%s: stopping after this optimizer step, with a checkpoint", self.requested.name)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.requested, self.stopped_at = None, None
        self._previous_handlers = _install_handler(self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._agreed(args):
            return
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # the grace time before the kill goes to the checkpoint

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stopped_at is not None:  # the checkpoint of this step is written already; leave the epoch as it is
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stopped_at is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's part of the checkpoint (ZeRO's optimizer shards) is on disk
        _restore_handlers(self._previous_handlers)
        self._previous_handlers = {}
        if self.stopped_at is None:
            return
        if state.is_world_process_zero:
            logger.warning(
                "preempted: stopped after step %d with %s; exiting with status %d (resume with "
                "--resume_from_checkpoint True or auto)",
                state.global_step,
                os.path.join(args.output_dir, f"checkpoint-{self.stopped_at}"),
                EXIT_PREEMPTED,
            )
        raise Preempted(self.stopped_at)

    def _agreed(self, args: TrainingArguments) -> bool:
        """Whether any rank has been asked to stop; the same answer on every rank."""
        requested = self.requested is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # on the process group's device: a CUDA tensor for NCCL, a CPU one for gloo
            flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested


def _install_handler(handler: Callable[[int, FrameType | None], None]) -> dict[signal.Signals, Any]:
    """`handler` for every PREEMPTION_SIGNALS; the handlers it replaced, for `_restore_handlers`. Outside the main
    thread (a notebook's worker thread) Python refuses handlers: the signals keep their usual effect, and {}."""
    try:
        return {sig: signal.signal(sig, handler) for sig in PREEMPTION_SIGNALS}
    except ValueError:
        return {}


def _restore_handlers(previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def exit_on_signal() -> Iterator[None]:
    """While the run is not training (PreemptionCallback takes the signals over while it is): SIGTERM / SIGUSR1 end
    the process at once, as their default action would, after one log line saying that no checkpoint was written.
    Also a decorator; the previous handlers come back after."""

    def stop(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        logger.warning(
            "%s outside training (no step to finish): exiting now with status %d, without a checkpoint "
            "of this step; start the run again, or resume it from its newest checkpoint, if it has one",
            sig.name,
            128 + sig.value,
        )
        release_held_locks()  # the process ends without unwinding: leave --output_dir without a lock file
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    previous = _install_handler(stop)
    try:
        yield
    finally:
        _restore_handlers(previous)


@contextmanager
def signals_deferred(what: str) -> Iterator[None]:
    """Hold SIGTERM / SIGUSR1 off while `what` runs (the final save: stopping halfway would lose the trained result,
    which a checkpoint may not hold); the log says when one came, and the previous handlers come back after."""
    received: list[signal.Signals] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        logger.warning("%s during %s: finishing it first", received[-1].name, what)

    previous = _install_handler(defer)
    try:
        yield
    finally:
        _restore_handlers(previous)
    if received:
        logger.warning("%s is complete; stopping as %s asked", what, received[0].name)


# --- which run an output folder holds ---------------------------------------------------------------------------

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
) -> dict:
    """The settings that define a run: model, data (each file's absolute path and size), LoRA, quantization, seed,
    batch and schedule. Two runs with the same settings train the same weights in the same order."""
    settings = {}
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
) -> dict:
    """At the start of a run, before anything loads: this run's settings record; with `--resume_from_checkpoint
    auto`, a ConfigError naming the settings that differ when the output folder holds another run; with True or a
    checkpoint's path, one naming those of SHAPE_SETTINGS that differ from the run that wrote the checkpoints."""
    settings = run_settings(model_args, data_args, lora_args, quant_args, training_args)
    record = {"fingerprint": settings_fingerprint(settings), "settings": settings}
    resume = str(training_args.resume_from_checkpoint)
    if resume.lower() == "auto":
        _check_same_run(training_args.output_dir, settings, record["fingerprint"])
    elif training_args.resume_from_checkpoint is not None and resume.lower() != "false":
        folder = training_args.output_dir if resume.lower() == "true" else os.path.dirname(os.path.abspath(resume))
        _check_same_shapes(f"--resume_from_checkpoint {resume}", folder, settings)
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
