"""Merge a LoRA or Q-LoRA adapter into its base model (`llmft merge`); the code is llmft/tools/merge.py."""

from llmft.tools.merge import MergeResult, main, merge_lora

__all__ = ["MergeResult", "main", "merge_lora"]  # the names this module had before the code moved

if __name__ == "__main__":
    main()
