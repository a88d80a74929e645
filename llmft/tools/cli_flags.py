"""The flags the tools share, worded and parsed as finetune.py's are: `--flag True|False` booleans,
`--overwrite_output_dir` and `--trust_remote_code`."""

from __future__ import annotations

import argparse

from llmft.config import parse_bool


def add_overwrite_output_dir_flag(parser: argparse.ArgumentParser, done: str) -> None:
    """The tools' `--overwrite_output_dir [True|False]` (old name `--force`, kept), finetune.py's name; the help says
    when the replacing happens: once `done` (the staged output takes the folder's place only then)."""
    parser.add_argument(
        "--overwrite_output_dir",
        "--force",
        dest="overwrite_output_dir",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="True|False",
        help=f"replace a non-empty --output_dir once {done}",
    )


def add_trust_remote_code_flag(parser: argparse.ArgumentParser) -> None:
    """The tools' `--trust_remote_code [True|False]`, off unless given, worded like finetune.py's."""
    parser.add_argument(
        "--trust_remote_code",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="True|False",
        help="run Python code shipped with the model (auto_map in its config); off unless you trust it",
    )
