"""Write a tiny random-weight Qwen2 model and its tokenizer (`llmft make-tiny-model`); the code is
llmft/tools/tiny_model.py."""

from llmft.tools.tiny_model import CORPUS, build_tokenizer, main, make_tiny_model

__all__ = ["CORPUS", "build_tokenizer", "main", "make_tiny_model"]  # the names this module had before the code moved

if __name__ == "__main__":
    main()
