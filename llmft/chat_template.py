"""Chat templates: which one a run uses, and which token ends an assistant turn.

Training renders conversations with the tokenizer's own chat template, so the text a model is trained on is the
text `apply_chat_template` gives it at inference. A tokenizer without a template (a base model) gets ChatML, the
format of Qwen's chat models, and the ChatML special tokens are added to it (see `llmft.model`).
"""

from __future__ import annotations

from llmft.errors import ConfigError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# ChatML as Qwen2.5-Instruct writes it, without tool calls and without a default system prompt: a system turn
# appears only when the conversation has one.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TEMPLATE_CHOICES = ("auto", "chatml", "tokenizer")


def choose_chat_template(tokenizer, choice: str = "auto") -> str:
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
        raise ConfigError([f"--chat_template {choice!r}: not one of {TEMPLATE_CHOICES} and not a readable file ({e.strerror})"]) from None


def uses_chatml(template: str) -> bool:
    return IM_START in template and IM_END in template


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn: the one generation must stop at.

    Found by rendering a one-turn conversation with a sentinel answer and reading the first special token after it,
    so it holds for ChatML (`<|im_end|>`), Llama 3 (`<|eot_id|>`) and others alike; falls back to the EOS token.
    """
    sentinel = "LLMFT_SENTINEL_ANSWER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    after = text[text.find(sentinel) + len(sentinel):]
    for token in sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True):
        if token and after.lstrip(" ").startswith(token):
            return token
    if tokenizer.eos_token is None:
        raise ConfigError(["the chat template closes assistant turns with no special token and the tokenizer has no EOS token"])
    return tokenizer.eos_token
