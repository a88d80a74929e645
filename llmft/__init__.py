# Every entry point imports this package before transformers, bitsandbytes or torchao: the one place that is always
# early enough to keep their known start-up noise out of the terminal (llmft/quiet.py says which, and why).
from llmft.quiet import quiet_known_noise

quiet_known_noise()
