"""Export a model to GGUF for llama.cpp and Ollama, with a parity report (`llmft export`); the code is
llmft/tools/export.py."""

from llmft.tools.export import ExportResult, export_gguf, main

__all__ = ["ExportResult", "export_gguf", "main"]

if __name__ == "__main__":
    main()
