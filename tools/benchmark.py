"""Training throughput and memory on a GPU (`llmft bench`); the code is llmft/tools/bench.py.

This file is also the entry point the benchmark's launcher arm and each measured arm's process run.
"""

from llmft.tools.bench import main

if __name__ == "__main__":
    main()
