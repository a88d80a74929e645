"""Rendering a Conversation to token ids and labels: the data contract of training.

`render_conversation(conversation, tokenizer)` returns `input_ids` and `labels` of equal length. The text is exactly
what `tokenizer.apply_chat_template` produces, so training and inference (`tools/chat.py`) see the same tokens.

Masking strategy, "assistant turns": labels are IGNORE_INDEX (-100) everywhere except the content of every assistant
turn and the special token that closes it (`<|im_end|>` for ChatML); whatever the template puts after that token
(ChatML's newline) is not trained, and nothing of system or user turns is. Plain-text samples train every token.

How the spans are found: for each assistant turn i the template renders the conversation up to turn i with the
generation prompt (the prompt the model sees at inference) and up to and including turn i; the difference is the
answer. Each prompt and answer segment is tokenized on its own, which is also how inference tokenizes: the prompt is
encoded, the answer is generated token by token after it. A template that rewrites earlier turns (Qwen3 drops past
reasoning, for example) fails that check and is reported, rather than silently trained on text it never produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmft.data.formats import ASSISTANT, Conversation
from llmft.errors import DataError

IGNORE_INDEX = -100
OverlongPolicy = Literal["truncate", "drop"]


@dataclass
class RenderedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def render_conversation(
    conversation: Conversation,
    tokenizer,
    *,
    default_system: str | None = None,
    max_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
) -> RenderedSample | None:
    """Token ids and labels of one sample (see the module docstring), or None when it is dropped as over-long.

    Over `max_length` tokens: "drop" drops it; "truncate" keeps the leading whole turns that fit, cutting after an
    assistant turn's end-of-turn token, and cuts inside the first answer only when not even that fits. A sample whose
    prompt alone is too long has nothing left to train on and is dropped in both cases.
    """
    if conversation.is_plain_text:
        ids = tokenizer(conversation.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        segments = [(ids, True)]
    else:
        texts = assistant_segments(conversation.as_dicts(default_system), tokenizer, conversation.id)
        token_lists = tokenizer([text for text, _ in texts], add_special_tokens=False)["input_ids"]
        segments = [(ids, trained) for ids, (_, trained) in zip(token_lists, texts)]

    input_ids, labels, ends = [], [], []
    for ids, trained in segments:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        if trained:
            ends.append(len(input_ids))
    if max_length is None or len(input_ids) <= max_length:
        return RenderedSample(input_ids, labels)
    if overlong == "drop":
        return None
    fitting = [end for end in ends if end <= max_length]
    cut = fitting[-1] if fitting and not conversation.is_plain_text else max_length
    if all(label == IGNORE_INDEX for label in labels[:cut]):
        return None
    return RenderedSample(input_ids[:cut], labels[:cut], truncated=True)


def assistant_segments(messages: list[dict], tokenizer, sample_id: str = "?") -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, trained) pieces; joined, they are the full template output."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    segments, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= done):
            raise DataError(
                f"sample {sample_id}: the chat template does not render turn {i} as a prefix of the whole "
                "conversation (it rewrites earlier turns), so trained tokens could not match inference; "
                "use --chat_template chatml or a template without that behaviour"
            )
        answer = through[len(prompt):].rstrip()  # what follows the end-of-turn token is the next turn's business
        if not answer:
            continue
        segments.append((full[done: len(prompt)], False))
        segments.append((answer, True))
        done = len(prompt) + len(answer)
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a conversation followed by the generation prompt: what a model answers at inference."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
