"""Write a tiny random-weight Qwen2 model and its tokenizer (`llmft make-tiny-model`); the code is
llmft/tools/tiny_model.py."""

from llmft.tools.tiny_model import CORPUS, main, make_tiny_model, make_tokenizer

build_tokenizer = make_tokenizer  # the name it had here before llmft.model's tokenizer loader claimed the same one
__all__ = ["CORPUS", "build_tokenizer", "main", "make_tiny_model", "make_tokenizer"]  # the names this module had

if __name__ == "__main__":
    main()
