"""GPTQ-quantize a model on its fine-tuning conversations (`llmft quantize`); the code is llmft/tools/quantize.py."""

from llmft.tools.quantize import GptqSettings, QuantizationReport, main, run_gptq

__all__ = ["GptqSettings", "QuantizationReport", "main", "run_gptq"]  # what callers import from this script

if __name__ == "__main__":
    main()
