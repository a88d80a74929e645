"""Chat templates: which one a run uses, which token ends an assistant turn, and the tokens generation stops at.

Training renders conversations with the tokenizer's own chat template, so the text a model is trained on is the
text `apply_chat_template` gives it at inference. A tokenizer without a template (a base model) gets ChatML, the
format of Qwen's chat models, and the ChatML special tokens are added to it (see `llmft.model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# ChatML as Qwen2.5-Instruct writes it, without a default system prompt: a system turn appears only when the
# conversation has one, or when tools are given (they are listed in it). Written here from Qwen2.5's format, and
# tested against Qwen2.5's own template (tests/test_tools_data.py), which renders the same messages alike:
# - tools: after the system prompt (and a blank line), a "# Tools" section listing each function schema as JSON
#   inside <tools></tools> and saying how to call them;
# - an assistant's tool calls: each a <tool_call> block holding {"name": ..., "arguments": ...} as JSON, after its
#   content if it has any; arguments given as a string are taken to be JSON already;
# - tool results: consecutive ones in one user turn, each inside <tool_response></tool_response>.
# Beyond Qwen2.5 (which has no reasoning): an assistant's reasoning_content opens its turn as a <think> block, as
# Qwen3 writes it, and is kept in every turn, so earlier turns are never rewritten.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if message['reasoning_content'] is string %}"
    "{%- set content = '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' + content %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['tool_calls'] %}"
    "{%- if content %}{{- '\\n' + content }}{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call['function'] is defined %}{%- set tool_call = tool_call['function'] %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{%- if tool_call['arguments'] is string %}{{- tool_call['arguments'] }}"
    "{%- else %}{{- tool_call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- else %}{{- '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Tokens that end a plain-text document in the vocabularies of common model families (Qwen, GPT-2 and Phi; Llama 3;
# Gemma; Llama 2 and Mistral), in that order of preference.
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>")


def document_end_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The token a plain-text (pre-training style) sample ends with: the first of DOCUMENT_END_TOKENS the tokenizer
    has, else its EOS. Looked up by name rather than read from `eos_token`, because a chat tokenizer's EOS is the
    end-of-turn token (Qwen2.5-Instruct ships `<|im_end|>`, and `llmft.model.load_training_tokenizer` sets it so)."""
    for token in DOCUMENT_END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token
    return tokenizer.eos_token


TEMPLATE_CHOICES = ("auto", "chatml", "tokenizer")


def choose_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str = "auto") -> str:
    """The Jinja template a run renders with.

    auto: the tokenizer's own template when it has one, ChatML otherwise; chatml: always ChatML;
    tokenizer: the tokenizer's own, and an error when it has none. Any other value is a path to a .jinja file.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what apply_chat_template uses
        own = own.get("default")
    if choice == "auto":
        return own or CHATML_TEMPLATE
    if choice == "chatml":
        return CHATML_TEMPLATE
    if choice == "tokenizer":
        if not own:
            raise ConfigError(["--chat_template tokenizer: the tokenizer has no chat template"])
        return own
    try:
        with open(choice, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            [f"--chat_template {choice!r}: not one of {TEMPLATE_CHOICES} and not a readable file ({e.strerror})"]
        ) from None


def uses_chatml(template: str) -> bool:
    return IM_START in template and IM_END in template


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that closes an assistant turn: the one generation must stop at.

    Found by rendering a one-turn conversation with a sentinel answer and reading the first special token after it,
    so it holds for ChatML (`<|im_end|>`), Llama 3 (`<|eot_id|>`) and others alike; falls back to the EOS token.
    """
    from jinja2 import TemplateError

    sentinel = "LLMFT_SENTINEL_ANSWER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except (TemplateError, TypeError) as e:  # a syntax error, Jinja's sandbox refusing an attribute, raise_exception()
        raise ConfigError(
            [
                f"the chat template cannot render a one-turn conversation ({type(e).__name__}: {e}): fix the "
                "template, or choose another with --chat_template (chatml, or the path of a .jinja file)"
            ]
        ) from None
    after = text[text.find(sentinel) + len(sentinel) :]
    for token in sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True):
        if token and after.lstrip(" ").startswith(token):
            return token
    if tokenizer.eos_token is None:
        raise ConfigError(
            ["the chat template closes assistant turns with no special token and the tokenizer has no EOS token"]
        )
    return tokenizer.eos_token


@dataclass(frozen=True)
class GenerationStops:
    eos_token_ids: list[int]  # generation ends at any of these; the first is the end-of-turn token of a chat model
    pad_token_id: int


def generation_stops(tokenizer: PreTrainedTokenizerBase, *configured_eos: int | list[int] | None) -> GenerationStops:
    """The one stop-token policy, read by training's saved generation config (llmft.model), the tools' generation
    (llmft.inference) and tools/make_tiny_model.py alike.

    Stops, in this order and without repeats: the end-of-turn token (`end_of_turn_token`, when the tokenizer has a
    chat template), the tokenizer's EOS, the document-end token plain-text samples are trained to end with
    (`document_end_token`), then `configured_eos` (the model's own generation_config / config eos_token_id, each an
    id, a list of ids or None) where they are ids of this tokenizer's vocabulary: a base model's config can name an
    id its tokenizer lacks. Padding uses the pad token, else the first stop."""
    tokens = [end_of_turn_token(tokenizer)] if getattr(tokenizer, "chat_template", None) else []
    tokens += [tokenizer.eos_token, document_end_token(tokenizer)]
    candidates = [tokenizer.convert_tokens_to_ids(token) for token in tokens if token is not None]
    for value in configured_eos:
        candidates += list(value) if isinstance(value, (list, tuple)) else [value]
    stops = []
    for token_id in candidates:
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer) and token_id not in stops:
            stops.append(token_id)
    if not stops:
        raise ConfigError(["the tokenizer has no end-of-turn, EOS or end-of-document token to stop generation at"])
    pad = tokenizer.pad_token_id
    return GenerationStops(stops, stops[0] if pad is None else pad)
