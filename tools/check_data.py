"""Check a training file before training (`llmft check`); the code is llmft/tools/check.py."""

import sys

from llmft.tools.check import main

if __name__ == "__main__":
    sys.exit(main())
