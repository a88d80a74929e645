"""The tools after training (merge, quantize, chat), the data check, the benchmark and the tiny-model builder: each a
module with a `main(argv)` that `llmft SUB` and the thin scripts in tools/ call; `cli_flags` holds the flags they
share."""
