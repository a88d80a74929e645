"""The `llmft` command: one entry point for training and every tool, `llmft SUBCOMMAND [FLAGS]`.

    llmft train examples/demo_lora.yaml --model_name_or_path M --output_dir out   # = python finetune.py ...
    llmft merge --adapter out --output_dir merged                                # = python tools/merge_lora.py ...
    llmft quantize --model_name_or_path merged --data_path data.json --output_dir merged-gptq
    llmft chat --model_name_or_path merged-gptq
    llmft export --model_name_or_path merged --output_dir merged-gguf --quantization q8_0
    llmft SUBCOMMAND --help                                                      # that subcommand's own flags

Each subcommand is the `main(argv)` of one module, given the rest of the command line; its exit status is the
command's. The one-line summaries below are the first lines of those modules' docstrings, read without importing
them, so `llmft --help` answers at once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

# subcommand -> module whose main(argv) runs it; the order `llmft --help` lists them in
SUBCOMMANDS = {
    "train": "llmft.train",
    "merge": "llmft.tools.merge",
    "quantize": "llmft.tools.quantize",
    "chat": "llmft.tools.chat",
    "check": "llmft.tools.check",
    "bench": "llmft.tools.bench",
    "export": "llmft.tools.export",
    "make-tiny-model": "llmft.tools.tiny_model",
}


def summary(module: str) -> str:
    """The first line of `module`'s docstring, read from its source."""
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read())) or ""
    return docstring.split("\n\n")[0].replace("\n", " ").strip()


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: llmft SUBCOMMAND [FLAGS]   (llmft SUBCOMMAND --help: its flags)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {summary(module)}" for name, module in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `llmft SUBCOMMAND ...`; returns the exit status (the subcommand's, 2 for an unknown one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"llmft: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run = importlib.import_module(SUBCOMMANDS[name]).main
    program = sys.argv[0]
    sys.argv[0] = f"llmft {name}"  # the prog name argparse shows in the subcommand's usage and errors
    try:
        status = run(rest)
    finally:
        sys.argv[0] = program
    return status if isinstance(status, int) else 0  # train returns its Trainer


if __name__ == "__main__":
    sys.exit(main())
