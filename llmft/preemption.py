"""Preemption: stop on SIGTERM or SIGUSR1 at the next optimizer step with one checkpoint, then exit EXIT_PREEMPTED.

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

`signals_handled` and `signals_deferred` are the one way llmft changes what a signal does for the length of a block;
the tools use them too while their results move into place (llmft.run_folder.staged_output_dir).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from llmft.errors import EXIT_PREEMPTED, PREEMPTION_SIGNALS

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

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


SignalHandler = Callable[[int, FrameType | None], object]


def _install_handler(
    handler: SignalHandler, signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS
) -> dict[signal.Signals, Any]:
    """`handler` for each of `signals`; the handlers it replaced, for `_restore_handlers`. Outside the main thread (a
    notebook's worker thread) Python refuses handlers: the signals keep their usual effect, and {}."""
    try:
        return {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:
        return {}


def _restore_handlers(previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def signals_handled(handler: SignalHandler, signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS) -> Iterator[None]:
    """`handler(signum, frame)` for each of `signals` while the block runs (main thread only: elsewhere the block
    runs with the signals' usual effect), the previous handlers restored after."""
    previous = _install_handler(handler, signals)
    try:
        yield
    finally:
        _restore_handlers(previous)


@contextmanager
def exit_on_signal(before_exit: Callable[[], object] = lambda: None) -> Iterator[None]:
    """While the run is not training (PreemptionCallback takes the signals over while it is): SIGTERM / SIGUSR1 end
    the process at once, as their default action would, after one log line saying that no checkpoint was written
    and `before_exit()` (the process ends without unwinding: what must not be left behind, such as an output
    folder's lock file, goes there). Also a decorator; the previous handlers come back after."""

    def stop(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        logger.warning(
            "%s outside training (no step to finish): exiting now with status %d, without a checkpoint "
            "of this step; start the run again, or resume it from its newest checkpoint, if it has one",
            sig.name,
            128 + sig.value,
        )
        before_exit()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    with signals_handled(stop):
        yield


@contextmanager
def signals_deferred(
    what: str, signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS
) -> Iterator[list[signal.Signals]]:
    """Hold `signals` off while `what` runs (a run's final save, a tool's result taking its folder's place: stopping
    halfway would lose or half-write the result); yields the list of those that came, for the caller to act on once
    the block is done. The log says when one came, and the previous handlers come back after."""
    received: list[signal.Signals] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        logger.warning("%s during %s: finishing it first", received[-1].name, what)

    with signals_handled(defer, signals):
        yield received
    if received:
        logger.warning("%s is complete; stopping as %s asked", what, received[0].name)
