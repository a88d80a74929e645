"""Rendering a Conversation to token ids and labels: the data contract of training.

`render_samples(conversation, tokenizer)` returns the conversation's training samples, each with `input_ids` and
`labels` of equal length. The text is exactly what `tokenizer.apply_chat_template(messages, tools=...)` produces, so
training and inference (`tools/chat.py`, a serving stack parsing tool calls) see the same tokens.

Masking strategy, "trained assistant turns": labels are IGNORE_INDEX (-100) everywhere except what the model
generates in a trained assistant turn (its reasoning where the template keeps it, its content, its tool calls) and
the special token that closes it (`<|im_end|>` for ChatML); whatever the template puts after that token (ChatML's
newline) is not trained, and nothing of system, user or tool-result turns ever is. Which assistant turns are
trained: a message's own `train` / `loss_weight` when it has one, else `train_turns` ("all": every assistant turn;
"last": only the conversation's last). Plain-text samples train every token and end with the tokenizer's
end-of-document token (`<|endoftext|>` for Qwen), not the chat end-of-turn token (`document_end_token`).

How the spans are found: for each trained turn i the template renders the conversation up to turn i with the
generation prompt (the prompt the model sees at inference) and up to and including turn i; the difference is the
answer. Each prompt and answer segment is tokenized on its own, which is also how inference tokenizes: the prompt is
encoded, the answer is generated token by token after it.

Templates that rewrite earlier turns (Qwen3 drops the reasoning of turns before the last user message): when the
whole conversation's rendering does not contain every trained turn exactly as it was rendered at that turn, the
conversation becomes several samples. Each holds the conversation up to one trained turn (the latest not yet
covered) as the template renders it then, and trains every turn that rendering shows exactly as inference did;
so the tokens trained are always the tokens inference would have seen and produced, and Qwen3 conversations become
one sample per user message. The dataset's log says how many samples the conversations became.

Text that spells a special token (a literal `<|im_end|>` or `<|im_start|>` inside a message, or in a plain-text
sample) is encoded as the text it is, never as the control token: otherwise a record could forge turns, and the model
would learn to emit control tokens wherever such strings appear. Meta's Llama 3 and Mistral's reference encoders and
nanochat do the same; `render_prompt` encodes chat's prompt the same way, so training and inference agree. How: such
strings are swapped for private-use stand-ins before the template renders, and each rendered segment is cut at the
special tokens the template wrote, its pieces encoded with the stand-ins back as plain text (`encode_rendered`).

A template that drops what the data holds is an error, not a silent loss: tool calls or tool results missing from
the rendering (a template without tool support), tools given that the prompt does not show. Reasoning a template
does not render (Qwen2.5's) is not trained; that is logged once, and `tools/check_data.py` counts such turns.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from llmft.chat_template import document_end_token
from llmft.data.conversation import ASSISTANT, TOOL, Conversation, tool_names
from llmft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
OverlongPolicy = Literal["truncate", "drop"]
TrainTurns = Literal["all", "last"]
TRAIN_TURNS = ("all", "last")


@dataclass
class RenderedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    trained_turns: int = 0  # assistant turns whose tokens carry loss in this sample (before truncation)
    reasoning_not_rendered: int = 0  # of those, turns whose reasoning_content the template left out
    cut_at_limit: bool = False  # encoded only to `render_samples`' encode_limit tokens: longer than that


@dataclass
class SampleText:
    """One sample as text: consecutive (text, trained) segments whose concatenation is a template rendering."""

    segments: list[tuple[str, bool]]
    trained_turns: int = 0
    reasoning_not_rendered: int = 0


def trained_turn_indices(conversation: Conversation, train_turns: TrainTurns = "all") -> list[int]:
    """Positions in `conversation.messages` of the assistant turns that carry loss (see the module docstring)."""
    if train_turns not in TRAIN_TURNS:
        raise ValueError(f"train_turns {train_turns!r}: choose one of {TRAIN_TURNS}")
    assistant = [i for i, m in enumerate(conversation.messages) if m.role == ASSISTANT]
    default = set(assistant) if train_turns == "all" else set(assistant[-1:])
    return [
        i
        for i in assistant
        if conversation.messages[i].train or (conversation.messages[i].train is None and i in default)
    ]


def render_samples(
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    *,
    default_system: str | None = None,
    train_turns: TrainTurns = "all",
    max_length: int | None = None,
    overlong: OverlongPolicy = "truncate",
    encode_limit: int | None = None,
) -> list[RenderedSample | None]:
    """The samples of one conversation (see the module docstring), in turn order; one that is dropped as over-long
    is None in its place.

    `encode_limit`: encode at most about that many tokens of each sample, so that time and memory stay bounded by it
    whatever the text's length (a 50 MB string is not tokenized whole); a longer sample keeps its first
    `encode_limit` tokens, as the whole text would have them, and is marked `cut_at_limit`.

    Over `max_length` tokens: "drop" drops it; "truncate" keeps the leading whole turns that fit, cutting after an
    assistant turn's end-of-turn token, and cuts inside the first answer only when not even that fits. A sample whose
    prompt alone is too long has nothing left to train on and is dropped in both cases.
    """
    if conversation.is_plain_text:
        encode = partial(tokenizer, add_special_tokens=False, split_special_tokens=True)
        ids, cut = _encode_within(lambda text: encode(text)["input_ids"], conversation.text, encode_limit)
        end = document_end_token(tokenizer)
        if end is not None and not cut:
            ids = ids + [tokenizer.convert_tokens_to_ids(end)]
        sample = RenderedSample(ids, list(ids), cut_at_limit=cut)
        return [fit_to_length(sample, max_length, overlong, plain_text=True)]
    texts = sample_texts(conversation, tokenizer, default_system=default_system, train_turns=train_turns)
    samples = []
    for text in texts:
        pieces = [piece for piece, _ in text.segments]
        if encode_limit is None or sum(map(len, pieces)) <= encode_limit:  # short: cheap to encode whole
            token_lists, cut = encode_rendered(tokenizer, pieces), False
        else:
            token_lists, cut = _encode_pieces_within(tokenizer, pieces, encode_limit)
        input_ids, labels = [], []
        for ids, (_, trained) in zip(token_lists, text.segments):
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        sample = RenderedSample(
            input_ids,
            labels,
            trained_turns=text.trained_turns,
            reasoning_not_rendered=text.reasoning_not_rendered,
            cut_at_limit=cut,
        )
        samples.append(fit_to_length(sample, max_length, overlong))
    return samples


# Tokens encoded past the limit before the encoding of a cut text is trusted: BPE merges reach only a few tokens back
# from where a text is cut, so the tokens this far before the cut are those of the whole text.
CUT_MARGIN = 64


def _encode_within(encode: Callable[[str], list[int]], text: str, limit: int | None) -> tuple[list[int], bool]:
    """(ids, cut): all of `text`'s ids, or, when it has more than `limit`, its first `limit` ones and True. A text of
    at most `limit` characters is encoded whole; a longer one by growing prefixes until one has enough tokens (a
    token may cover many characters, so how long a prefix must be is not known in advance), which keeps the work
    within a few times what its first `limit` tokens take."""
    if limit is None or len(text) <= limit:
        return encode(text), False
    size = 2 * (limit + CUT_MARGIN)
    while True:
        if size >= len(text):
            ids = encode(text)
            return (ids, False) if len(ids) <= limit else (ids[:limit], True)
        ids = encode(text[:size])
        if len(ids) >= limit + CUT_MARGIN:
            return ids[:limit], True
        size *= 4


def _encode_pieces_within(
    tokenizer: PreTrainedTokenizerBase, pieces: list[str], limit: int
) -> tuple[list[list[int]], bool]:
    """`encode_rendered` of each piece in turn until `limit` tokens are reached (`_encode_within`); the pieces after
    that get no tokens."""
    lists, total = [], 0
    for piece in pieces:
        if total >= limit:
            return lists + [[] for _ in range(len(pieces) - len(lists))], True
        ids, cut = _encode_within(lambda text: encode_rendered(tokenizer, [text])[0], piece, limit - total)
        lists.append(ids)
        total += len(ids)
        if cut:
            return lists + [[] for _ in range(len(pieces) - len(lists))], True
    return lists, False


def render_conversation(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase, **options: Any
) -> RenderedSample | None:
    """One sample of a conversation: its only one, or, when the template makes it several, the last, which holds the
    whole conversation as inference renders it at its last trained turn (for calibration and parity checks; training
    uses `render_samples`). Takes `render_samples`' options."""
    return render_samples(conversation, tokenizer, **options)[-1]


def fit_to_length(
    sample: RenderedSample, max_length: int | None, overlong: OverlongPolicy = "truncate", plain_text: bool = False
) -> RenderedSample | None:
    """The sample within `max_length` tokens per the overlong policy (see `render_samples`): itself when it fits, a
    truncated copy, or None when dropped. A plain-text sample is cut at `max_length` exactly."""
    if max_length is None or len(sample.input_ids) <= max_length:
        return sample
    if overlong == "drop":
        return None
    labels = sample.labels
    ends = [
        i + 1
        for i in range(len(labels))
        if labels[i] != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)
    ]  # where each trained span ends
    fitting = [end for end in ends if end <= max_length]
    cut = fitting[-1] if fitting and not plain_text else max_length
    if all(label == IGNORE_INDEX for label in labels[:cut]):
        return None
    return dataclasses.replace(sample, input_ids=sample.input_ids[:cut], labels=labels[:cut], truncated=True)


def sample_texts(
    conversation: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    *,
    default_system: str | None = None,
    train_turns: TrainTurns = "all",
) -> list[SampleText]:
    """The conversation's samples as text segments, before tokenization (see the module docstring)."""
    conversation = _with_literal_specials(conversation, special_tokens(tokenizer))
    messages = conversation.as_dicts(default_system)
    shift = len(messages) - len(conversation.messages)  # a default system message inserted in front
    tools = [dict(tool) for tool in conversation.tools] or None

    def render(upto: int, generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (TemplateError, TypeError) as e:  # raise_exception() in the template, or e.g. None + a string
            raise DataError(
                f"sample {conversation.id}: the chat template cannot render this conversation ({type(e).__name__}: {e})"
            ) from None

    answers = {}  # turn -> (inference prompt, answer)
    for turn in trained_turn_indices(conversation, train_turns):
        i = turn + shift
        prompt, through = render(i, generation_prompt=True), render(i + 1)
        if not through.startswith(prompt):
            raise DataError(
                f"sample {conversation.id}: the chat template does not render turn {turn} after the "
                "generation prompt it gives at that point, so no trained tokens could match inference; "
                "use --chat_template chatml or a template without that behaviour"
            )
        answer = through[len(prompt) :].rstrip()  # what follows the end-of-turn token is the next turn's business
        if answer:
            _check_rendered(conversation, turn, prompt, answer)
            answers[i] = (prompt, answer)
    if not answers:
        raise DataError(f"sample {conversation.id}: the chat template renders nothing for its trained turns")
    _check_tools_shown(conversation, answers)

    pending = sorted(answers)
    full = render(len(messages))
    covered = _exact_turns(full, pending, answers)
    if covered == pending:
        groups = [(full, covered)]
    else:  # the template rewrites earlier turns: one rendering per latest uncovered trained turn
        groups = []
        while pending:
            last = pending[-1]
            full = render(last + 1)
            covered = _exact_turns(full, pending, answers)
            if last not in covered:
                covered = [last]
            groups.append((full, covered))
            pending = [i for i in pending if i not in covered]
        groups.reverse()

    texts = []
    for full, turns in groups:
        segments, done, dropped_reasoning = [], 0, 0
        for i in turns:
            prompt, answer = answers[i]
            segments.append((full[done : len(prompt)], False))
            segments.append((answer, True))
            done = len(prompt) + len(answer)
            reasoning = messages[i].get("reasoning_content")
            if reasoning and reasoning.strip() not in answer:
                dropped_reasoning += 1
        segments.append((full[done:], False))
        texts.append(SampleText([(t, trained) for t, trained in segments if t], len(turns), dropped_reasoning))
    if any(t.reasoning_not_rendered for t in texts):
        _warn_once(
            "reasoning",
            "the chat template does not render reasoning_content (Qwen2.5's, for one, does "
            "not), so reasoning in the data is not trained; tools/check_data.py counts the turns",
        )
    return texts


def _exact_turns(full: str, turns: list[int], answers: dict) -> list[int]:
    """The turns (in order, not overlapping) whose inference prompt and answer `full` begins with exactly."""
    exact, done = [], 0
    for i in turns:
        prompt, answer = answers[i]
        if len(prompt) >= done and full.startswith(prompt + answer):
            exact.append(i)
            done = len(prompt) + len(answer)
    return exact


def _check_rendered(conversation: Conversation, turn: int, prompt: str, answer: str) -> None:
    """Refuse a rendering that lost the turn's tool calls or the tool results it answers."""
    message = conversation.messages[turn]
    missing = [call.name for call in message.tool_calls if call.name not in answer]
    if missing:
        raise DataError(
            f"sample {conversation.id}: the chat template does not render turn {turn}'s tool call "
            f"{', '.join(map(repr, missing))}: it has no tool-call support, and the calls would be "
            "silently left out; use a template that renders tool_calls (--chat_template chatml renders "
            "Qwen2.5's <tool_call> format)"
        )
    for j in range(turn):
        result = conversation.messages[j]
        if result.role == TOOL and result.content.strip() and result.content not in prompt:
            raise DataError(
                f"sample {conversation.id}: the chat template does not render the tool result of turn "
                f"{j}: it has no tool support; use a template that renders tool messages "
                "(--chat_template chatml renders Qwen2.5's <tool_response> format)"
            )


def _check_tools_shown(conversation: Conversation, answers: dict) -> None:
    if not conversation.tools:
        return
    prompt = answers[min(answers)][0]
    hidden = [name for name in tool_names(conversation.tools) if name not in prompt]
    if hidden:
        raise DataError(
            f"sample {conversation.id}: the chat template does not show the record's tools "
            f"({', '.join(map(repr, hidden))}) in the prompt: it ignores tools=; use a template that "
            "renders them (--chat_template chatml renders Qwen2.5's <tools> format)"
        )


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def render_prompt(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> list[int]:
    """Token ids of a conversation followed by the generation prompt: what a model answers at inference. Text in
    the messages that spells a special token is encoded as text, as in training (see the module docstring)."""
    specials = special_tokens(tokenizer)
    messages = [
        {k: _hide_specials(v, specials) if k in LITERAL_FIELDS and isinstance(v, str) else v for k, v in m.items()}
        for m in messages
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    return encode_rendered(tokenizer, [text])[0]


# --- text that spells a special token (see the module docstring) ------------------------------------------------

STAND_IN_OPEN, STAND_IN_CLOSE = "\ue000", "\ue001"  # private-use characters around a special token's index
STAND_IN = re.compile(f"{STAND_IN_OPEN}(\\d+){STAND_IN_CLOSE}")
LITERAL_FIELDS = ("content", "reasoning_content")  # the message fields whose text comes from the data


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens, longest first (so that one containing another is matched whole)."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found |= set(tokenizer.all_special_tokens)
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def _hide_specials(text: str, specials: list[str]) -> str:
    for k, token in enumerate(specials):
        if token in text:
            text = text.replace(token, f"{STAND_IN_OPEN}{k}{STAND_IN_CLOSE}")
    return text


def _with_literal_specials(conversation: Conversation, specials: list[str]) -> Conversation:
    """The conversation with every special-token string in its texts swapped for a stand-in."""
    if not any(token in m.content or token in (m.reasoning or "") for m in conversation.messages for token in specials):
        return conversation
    messages = tuple(
        dataclasses.replace(
            m,
            content=_hide_specials(m.content, specials),
            reasoning=None if m.reasoning is None else _hide_specials(m.reasoning, specials),
        )
        for m in conversation.messages
    )
    return dataclasses.replace(conversation, messages=messages)


def encode_rendered(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each rendered text: the special tokens the template wrote as themselves, the stand-ins of
    `_hide_specials` as the plain text they stand for. Cutting at special tokens and encoding the pieces between
    them is what the tokenizer itself does with added tokens, so texts without stand-ins encode as they always did."""
    if not any(STAND_IN_OPEN in text for text in texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    specials = special_tokens(tokenizer)
    at_special = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    encoded = []
    for text in texts:
        ids = []
        for i, piece in enumerate(at_special.split(text)):
            if i % 2:
                ids.append(tokenizer.convert_tokens_to_ids(piece))
            elif piece:
                piece = STAND_IN.sub(lambda m: specials[int(m.group(1))], piece)
                ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        encoded.append(ids)
    return encoded
