"""torchrun for llmft's launchers: `python -m llmft.launch.torchrun [torchrun options] finetune.py [arguments]`.

It is torchrun (same options, same elastic agent), with two differences:
- When the ranks stop on a user error (a bad flag, a broken record: finetune.py has printed the message and exited
  with EXIT_USER_ERROR), it exits with that status after one line, instead of torchrun's traceback and failure
  report, which would bury the message. Any other failure (a crash, a killed rank) is reported by torchrun as usual.
- SIGTERM and SIGUSR1 (a scheduler's warning before it kills the job) are passed on to the ranks, which stop after
  their next optimizer step with a checkpoint and exit with EXIT_PREEMPTED (llmft/preemption.py); it then exits with
  that status too, after one line. torchrun itself would answer SIGTERM by terminating the ranks (SIGKILL 30 s
  later) and a traceback, and SIGUSR1 would kill it outright, leaving the ranks behind. When the signal comes before
  the ranks train (they are loading the model) they end at once, killed by it (llmft/preemption.py), and it exits
  with 128 + the signal's number after one line, as a shell reports a process that signal killed.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from llmft.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, PREEMPTION_SIGNALS

# What torchrun's agent handles itself (its default list less the preemption signals, which are ours).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


FORWARDED: list[int] = []  # the signals passed on to the ranks, in order


def forward_to_ranks(signum: int, frame: FrameType | None) -> None:
    """Pass a preemption signal on to this process's children: the ranks torchrun started (each in its own session,
    so that they are out of reach of a signal sent to the launcher's process group)."""
    import psutil

    FORWARDED.append(signum)
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    print(
        f"llmft: {signal.Signals(signum).name}: asked the ranks to stop after their next optimizer step, with a "
        "checkpoint",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    config = parse_args(argv)
    # newer torchrun takes the list as --signals_to_handle and writes it to the variable its agent reads (over ours);
    # older ones read only the variable
    config.signals_to_handle = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = AGENT_SIGNALS
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, forward_to_ranks)
    try:
        run(config)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        codes = [failure.exitcode for failure in e.failures.values()]
        # Once the ranks have written the checkpoint, one that exits first may have the others torn down by signal
        # (a negative exit code); any other status is a failure of its own.
        if EXIT_PREEMPTED in codes and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
            print(
                f"llmft: preempted: the ranks wrote a checkpoint and stopped (exit status {EXIT_PREEMPTED}); "
                "resume with --resume_from_checkpoint True or auto",
                file=sys.stderr,
            )
            sys.exit(EXIT_PREEMPTED)
        if FORWARDED and all(-code in FORWARDED for code in codes):
            name = signal.Signals(-first.exitcode).name
            print(
                f"llmft: {name} came before the ranks were training: they stopped without a checkpoint (exit "
                f"status {128 - first.exitcode})",
                file=sys.stderr,
            )
            sys.exit(128 - first.exitcode)
        if first.exitcode != EXIT_USER_ERROR:
            raise
        print(f"llmft: stopped, rank {rank} reported the error above (exit status {EXIT_USER_ERROR})", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
