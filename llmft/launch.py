"""torchrun for llmft's launchers: `python -m llmft.launch [torchrun options] finetune.py [arguments]`.

It is torchrun (same options, same elastic agent), with one difference: when the ranks stop on a user error (a bad
flag, a broken record: finetune.py has printed the message and exited with EXIT_USER_ERROR), it exits with that
status after one line, instead of torchrun's traceback and failure report, which would bury the message. Any
other failure (a crash, a killed rank) is reported by torchrun as usual.
"""

from __future__ import annotations

import sys

from llmft.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode != EXIT_USER_ERROR:
            raise
        print(f"llmft: stopped, rank {rank} reported the error above (exit status {EXIT_USER_ERROR})",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
