"""Write a tiny random-weight Qwen2 model and its tokenizer (`llmft make-tiny-model`); the code is
llmft/tools/tiny_model.py."""

from llmft.tools.tiny_model import CORPUS, main, make_tiny_model, make_tokenizer

build_tokenizer = make_tokenizer  # kept for callers of this script; llmft.model has a build_tokenizer of its own
# what callers import from this script
__all__ = ["CORPUS", "build_tokenizer", "main", "make_tiny_model", "make_tokenizer"]

if __name__ == "__main__":
    main()
