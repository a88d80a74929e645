"""Fine-tune a chat LLM on conversations: full, LoRA or Q-LoRA; `llmft train` is the same command.

The code, its run commands and its exit statuses are in llmft/train.py; `python finetune.py --help` lists the flags.
"""

from llmft.train import main

if __name__ == "__main__":
    main()
