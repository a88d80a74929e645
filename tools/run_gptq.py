"""GPTQ-quantize a model on its fine-tuning conversations (`llmft quantize`); the code is llmft/tools/quantize.py."""

from llmft.tools.quantize import GptqSettings, QuantizationReport, main, run_gptq

__all__ = ["GptqSettings", "QuantizationReport", "main", "run_gptq"]  # the names this module had before the code moved

if __name__ == "__main__":
    main()
