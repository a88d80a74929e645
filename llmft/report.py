"""The run report: `training_report.json` and `training_report.png` in output_dir, written at every checkpoint (a copy
of the JSON goes into the checkpoint, so a resumed run continues the counts) and when training ends.

The JSON holds (all counts over every rank, for the whole run, resumed parts included):
- `tokens_seen`: input tokens of the training micro-batches, padding left out; `tokens_processed`: with padding;
  `trained_tokens`: the tokens that carry loss (labels other than -100). Counted from each micro-batch the model is
  given while training, so a run of whole epochs sees each sample's tokens once an epoch.
- `tokens_per_second`: tokens_seen over the wall time of training (evaluations and checkpoints included), both of
  this process's session (a resumed run counts from where it resumed); `wall_time_s`: training time of all sessions.
  A session's time runs from the call of Trainer.train (the model loaded; its DeepSpeed or FSDP set-up, the
  optimizer's creation and a resumed checkpoint's loading come after) to the report.
- `first_step_s`: the session's time to the end of its first optimizer step (compiling kernels, the first batches'
  loading and the first step itself: what a user waits before training runs at speed), the GPU's work finished;
  `first_step_tokens_seen`: that step's tokens_seen; `tokens_per_second_after_first_step`: the session's tokens_seen
  less the first step's, over its time less first_step_s (None until a second step ends): the speed once running.
  `peak_memory_bytes`: the largest of the ranks' peaks (CUDA memory allocated on GPUs, the process's peak resident
  memory on CPU).
- `final` and `best` train and eval losses (from the Trainer's log; `loss.mean`, the Trainer's mean train loss over
  the run, once training has ended), the run's settings (llmft_run_settings.json)
  and the versions of the libraries that trained it.
- `data`: for the train and eval files, the records in the file and the samples, tokens and trained tokens training
  had from them (tokens None for --lazy_preprocess, whose samples are tokenized only as they are used).
- `preference` (preference objectives only): the last logged value of each of the objective's metrics
  (PREFERENCE_METRICS: rewards chosen / rejected, margins, accuracy, log-probabilities ...), train and eval.
The PNG plots train and eval loss, learning rate and gradient norm against tokens seen, and for a preference objective
the reward margins and accuracies.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from llmft.data.render import IGNORE_INDEX
from llmft.distributed import runs_on_several_ranks
from llmft.run_folder import read_run_settings, record_written

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

REPORT_JSON = "training_report.json"
REPORT_PNG = "training_report.png"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "llmft")
COUNTS = ("tokens_seen", "tokens_processed", "trained_tokens")
# what a preference objective logs beside its loss (llmft.objectives.preference names them), in a fixed order
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "kl",
)
PENDING_CHUNK = 256  # steps' counts kept as separate tensors before they are stacked into one


def batch_token_counts(inputs: dict, pad_token_id: int | None) -> torch.Tensor | None:
    """[tokens seen, tokens processed, trained tokens] of one training micro-batch, a tensor on the batch's device,
    computed without a host synchronisation (counting never stalls the GPU's queue). Padded batches say which tokens
    are real in their attention mask; a packed row (position_ids, no mask) ends in one padding segment of pad tokens
    that carry no loss (llmft.data.packing.PackedCollator)."""
    ids, labels = inputs.get("input_ids"), inputs.get("labels")
    if ids is None:
        return None
    # a fill, not torch.tensor(n, device=...): copying a host value onto the GPU waits for its queue to empty
    processed = torch.full((), ids.numel(), dtype=torch.long, device=ids.device)
    trained = (labels != IGNORE_INDEX).sum() if labels is not None else torch.zeros((), device=ids.device)
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    if mask is not None:
        seen = mask.sum()
    elif positions is not None and pad_token_id is not None:
        positions = positions.expand_as(ids)
        index = torch.arange(ids.shape[-1], device=ids.device)
        last = torch.where(positions == 0, index, 0).amax(dim=-1, keepdim=True)  # each row's last segment starts here
        tail = index >= last
        padding_tail = ((ids == pad_token_id) | ~tail).all(dim=-1) & (last.squeeze(-1) > 0)
        if labels is not None:
            padding_tail &= ((labels == IGNORE_INDEX) | ~tail).all(dim=-1)
        seen = processed - (tail.sum(dim=-1) * padding_tail).sum()
    else:
        seen = processed
    return torch.stack([seen, processed, trained]).long()


class TrainingTokenCounter:
    """Sums `batch_token_counts` over a model's training forward passes, through a forward pre-hook on the model;
    passes without gradients (evaluation's) are left out. The sum stays on the batches' device, so counting adds no
    synchronisation; `take` hands it over and starts again. The run report and the benchmark count with it."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id
        self._counts: torch.Tensor | None = None  # since the last `take`
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            counts = batch_token_counts(kwargs, self.pad_token_id)
            if counts is not None:
                self._counts = counts if self._counts is None else self._counts + counts

    def add_trained(self, labels: torch.Tensor) -> None:
        """Count the trained tokens of `labels` for a forward pass made without them (a preference loss scores the
        logits itself, so the model never sees its labels)."""
        trained = (labels != IGNORE_INDEX).sum()
        counts = torch.stack([torch.zeros_like(trained), torch.zeros_like(trained), trained]).long()
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def take(self, device: torch.device) -> torch.Tensor:
        """[tokens seen, tokens processed, trained tokens] since the last take, on `device` (zeros when no training
        micro-batch went through), and the count starts again from zero."""
        counts, self._counts = self._counts, None
        if counts is None:
            return torch.zeros(len(COUNTS), dtype=torch.long, device=device)
        return counts.to(device)

    def remove(self) -> None:
        self._hook.remove()


class TrainingReportCallback(TrainerCallback):
    """Counts tokens from the training micro-batches (`TrainingTokenCounter`) and writes the report.
    `datasets` ({"train": dataset, "eval": dataset or None}) are summarised in the report's `data`."""

    def __init__(self, datasets: dict | None = None) -> None:
        self.datasets = datasets or {}
        self._data_summary: dict | None = None  # computed at the first report: the datasets do not change
        self.counts = dict.fromkeys(COUNTS, 0)  # the run's, over all ranks, up to the last report written
        # (global steps, this rank's counts of each: a [steps, COUNTS] tensor on the batches' device), not yet summed
        self._pending: list[tuple[list[int], torch.Tensor]] = []
        self.tokens_at_step: dict[int, int] = {}  # global step -> tokens seen by its end: the plot's x axis
        self._tokens: TrainingTokenCounter | None = None  # this rank's, since the last finished step
        self._started = None
        self._train_called = None  # set by `start_clock` when Trainer.train is called
        self._session_tokens = 0
        self._earlier_wall_time = 0.0
        self._first_step = None  # the global step that ended first in this session, and when (monotonic seconds)
        self._first_step_end = None
        self._first_step_tokens = None

    def start_clock(self) -> None:
        """The session's time counts from now (Trainer.train's call: LlmftTrainer.train) rather than from
        on_train_begin, which comes after the model's wrapping, the optimizer and a resumed checkpoint's loading."""
        self._train_called = time.monotonic()

    # --- counting ---

    def count_trained(self, labels: torch.Tensor) -> None:
        """The trained tokens of a training micro-batch whose forward pass ran without its labels (a preference
        loss gathers the answers' log-probabilities itself)."""
        if self._tokens is not None:
            self._tokens.add_trained(labels)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        pad_token_id = getattr(processing_class, "pad_token_id", None)
        if model is not None and self._tokens is None:
            self._tokens = TrainingTokenCounter(model, pad_token_id)
        self.counts, self.tokens_at_step = dict.fromkeys(COUNTS, 0), {}
        self._earlier_wall_time = 0.0
        if state.global_step > 0:  # resumed: the counts so far are in the checkpoint's copy of the report
            earlier = _read_json(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", REPORT_JSON))
            if earlier:
                self.counts.update({k: earlier.get(k, 0) for k in COUNTS})
                self.tokens_at_step = {int(k): v for k, v in earlier.get("tokens_at_step", {}).items()}
                self._earlier_wall_time = earlier.get("wall_time_s", 0.0)
        if self._tokens is not None:
            self._tokens.pad_token_id = pad_token_id
            self._tokens.take(args.device)  # this session counts from zero
        self._pending = []
        self._session_tokens = 0
        self._first_step = self._first_step_end = self._first_step_tokens = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._started = self._train_called if self._train_called is not None else time.monotonic()
        self._train_called = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._tokens is not None:
            counts = self._tokens.take(args.device)
        else:
            counts = torch.zeros(len(COUNTS), dtype=torch.long, device=args.device)
        self._pending.append(([state.global_step], counts.reshape(1, len(COUNTS))))
        if self._first_step is None:
            # the session's one wait for the GPU: the first step ends when its work has run, not when it is queued
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
            self._first_step, self._first_step_end = state.global_step, time.monotonic()
        elif len(self._pending) >= PENDING_CHUNK:
            self._fold_pending()

    def _fold_pending(self) -> None:
        """Stack the pending steps' counts into one tensor on their device (no synchronisation), so a run that
        writes its report seldom keeps a few tensors, not one per step."""
        steps = [step for chunk, _ in self._pending for step in chunk]
        self._pending = [(steps, torch.cat([counts for _, counts in self._pending]))]

    def _sum_pending(self, args: TrainingArguments) -> None:
        """Fold the steps counted since the last report into the run's counts: one collective and one copy to the
        host per report, not per step. Every rank calls it."""
        if not self._pending:
            return
        self._fold_pending()
        (steps, counts), self._pending = self._pending[0], []
        if runs_on_several_ranks(args):
            torch.distributed.all_reduce(counts)
        for step, row in zip(steps, counts.tolist()):
            for name, n in zip(COUNTS, row):
                self.counts[name] += int(n)
            self._session_tokens += int(row[0])
            self.tokens_at_step[step] = self.counts["tokens_seen"]
            if step == self._first_step:
                self._first_step_tokens = int(row[0])

    # --- writing ---

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self._write(args, state, also_into=checkpoint if os.path.isdir(checkpoint) else None)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)
        if self._tokens is not None:
            self._tokens.remove()
            self._tokens = None

    def _write(self, args: TrainingArguments, state: TrainerState, also_into: str | None = None) -> None:
        self._sum_pending(args)  # collectives: every rank takes part
        peak = _peak_memory(args)
        if not state.is_world_process_zero:
            return
        report = self.report(args, state, peak)
        record_written(args.output_dir, REPORT_JSON, REPORT_PNG)
        for folder in (args.output_dir, also_into):
            if folder is not None:
                _write_json(os.path.join(folder, REPORT_JSON), report)
        try:
            plot_report(report, state.log_history, os.path.join(args.output_dir, REPORT_PNG))
        except Exception as e:  # a report must never stop a run
            logger.warning("training report: no plot (%s)", e)

    def report(self, args: TrainingArguments, state: TrainerState, peak_memory: int | None) -> dict:
        session = time.monotonic() - self._started if self._started is not None else 0.0
        first_step = self._first_step_end - self._started if self._first_step_end is not None else None
        after_first = None
        if first_step is not None and self._first_step_tokens is not None and self._session_tokens > 0:
            later_tokens, later_time = self._session_tokens - self._first_step_tokens, session - first_step
            after_first = later_tokens / later_time if later_tokens > 0 and later_time > 0 else None
        history = state.log_history
        train = [e["loss"] for e in history if "loss" in e]
        # the Trainer's mean over the whole run, logged once training ends (before on_train_end)
        run_mean = next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None)
        evals = [e["eval_loss"] for e in history if "eval_loss" in e]
        record = read_run_settings(args.output_dir) or {}
        preference = {}
        for name in (*PREFERENCE_METRICS, *(f"eval_{name}" for name in PREFERENCE_METRICS)):
            value = next((e[name] for e in reversed(history) if name in e), None)
            if value is not None:
                preference[name] = value
        if self._data_summary is None:
            self._data_summary = data_summary(self.datasets, record.get("settings") or {})
        return {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": state.epoch,
            **self.counts,
            "tokens_per_second": self._session_tokens / session if session > 0 else None,
            "wall_time_s": self._earlier_wall_time + session,
            "first_step_s": first_step,
            "first_step_tokens_seen": self._first_step_tokens,
            "tokens_per_second_after_first_step": after_first,
            "peak_memory_bytes": peak_memory,
            "world_size": args.world_size,
            "loss": {"final": train[-1] if train else None, "best": min(train) if train else None, "mean": run_mean},
            "eval_loss": {"final": evals[-1] if evals else None, "best": min(evals) if evals else None},
            **({"preference": preference} if preference else {}),
            "settings": record.get("settings"),
            "settings_fingerprint": record.get("fingerprint"),
            "versions": library_versions(),
            "data": self._data_summary,
            "tokens_at_step": {str(k): v for k, v in sorted(self.tokens_at_step.items())},
        }


def data_summary(datasets: dict, settings: dict) -> dict:
    """{"train": {...}, "eval": {...}} for the datasets given: the data file, the records it holds, and the samples,
    tokens and trained tokens training had from it (samples differ from records where a conversation became
    several samples or an over-long one was dropped)."""
    from llmft.data.reading import iter_raw_records

    summary = {}
    for name, setting in (("train", "data_path"), ("eval", "eval_data_path")):
        dataset = datasets.get(name)
        path = (settings.get(setting) or {}).get("path")
        if dataset is None or path is None:
            continue
        entry = {"path": path, "records": None, "samples": len(dataset), "tokens": None, "trained_tokens": None}
        try:
            entry["records"] = sum(1 for _ in iter_raw_records(path))
        except Exception as e:  # a report must never stop a run (the file may have moved since training read it)
            logger.warning("training report: cannot count the records of %s (%s)", path, e)
        if "labels" in (getattr(dataset, "column_names", None) or ()):  # a datasets.Dataset; lazy ones have none
            import pyarrow.compute as pc

            # the column as Arrow (dropped samples' rows left out), counted without making Python lists
            labels = pc.list_flatten(dataset.with_format("arrow")["labels"])
            entry["tokens"] = len(labels)
            entry["trained_tokens"] = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
        summary[name] = entry
    return summary


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def plot_report(report: dict, log_history: list[dict], path: str) -> None:
    """Train and eval loss, learning rate and gradient norm against tokens seen, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = {int(k): v for k, v in report["tokens_at_step"].items()}
    panels = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",))
    if any("rewards/margins" in e for e in log_history):
        panels += (("rewards/margins", "eval_rewards/margins"), ("rewards/accuracies", "eval_rewards/accuracies"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for ax, keys in zip(axes, panels):
        for key in keys:
            points = [(tokens[e["step"]], e[key]) for e in log_history if key in e and e.get("step") in tokens]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key.replace("_", " "))
        ax.set_xlabel("tokens seen")
        ax.set_title(" / ".join(k.replace("_", " ") for k in keys))
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"step {report['global_step']} of {report['max_steps']}, {report['trained_tokens']:,} trained tokens")
    partial = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    os.replace(partial, path)


def _peak_memory(args: TrainingArguments) -> int:
    if torch.cuda.is_available() and args.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(args.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    if runs_on_several_ranks(args):
        value = torch.tensor([peak], dtype=torch.long, device=args.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        peak = int(value.item())
    return int(peak)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict) -> None:
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(partial, path)
