"""Merge a LoRA or Q-LoRA adapter into its base model (`llmft merge`); the code is llmft/tools/merge.py."""

from llmft.tools.merge import MergeResult, main, merge_lora

__all__ = ["MergeResult", "main", "merge_lora"]  # what callers import from this script

if __name__ == "__main__":
    main()
