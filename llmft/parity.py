"""Does the exported model answer as the trained one? One report for every export (GGUF, GPTQ, merged).

The trained model runs in transformers; the exported one runs in the engine that will serve it (`ServingEngine`:
llama.cpp for a GGUF file, transformers for a GPTQ or merged folder). On held-out conversations the report gives:

- log-probability drift: |log p_exported - log p_trained| of each answer token (the tokens training put loss on),
  both models reading the same ids (llmft's rendering), as a mean over all answer tokens and a maximum;
- greedy agreement: both models continue the same prompt greedily for `greedy_tokens` tokens; the share of
  conversations whose continuations are identical, and the mean length of the common prefix over the reference's;
- prompt match: the engine renders and tokenizes the conversation's prompt itself, each way it can (llama.cpp: its
  built-in template code, which recognises the embedded template's family, and the embedded Jinja template itself
  as llama-cpp-python's chat handler renders it; both tokenized by llama.cpp), and the ids are compared token for
  token with llmft's rendering; conversations with tools or reasoning, which llama.cpp's built-in templates do not
  render, are left out of this comparison;
- stops: the end-of-turn token of the chat template (`<|im_end|>` for ChatML) must be one the engine ends generation
  at, and the engine's EOS must be that token, so that a server run with no extra flags ends each answer there; the
  report also records whether each greedy continuation ended at a stop token in both engines.

`ParityReport.problems` names what is broken (a prompt that tokenizes differently, an end-of-turn token the engine
does not stop at, drift over a threshold); the tools print the table, write `parity_report.json` beside the export
and fail when there are problems.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from llmft.chat_template import end_of_turn_token
from llmft.data.render import IGNORE_INDEX, render_conversation, render_prompt
from llmft.errors import LlmftError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmft.data.conversation import Conversation

REPORT_FILE = "parity_report.json"
GREEDY_TOKENS = 32  # continuation length compared greedily
MAX_TOKENS = 512  # conversations are cut to this many tokens (whole turns kept where they fit)


class ServingEngine(Protocol):
    """What the report asks of an engine. Ids are the engine's vocabulary, which must be the trained tokenizer's."""

    name: str

    def prompt_ids(self, messages: list[dict]) -> dict[str, list[int]]:
        """The engine's own renderings and tokenizations of `messages` followed by the generation prompt, by the
        name of each way it renders (an empty list: it cannot render them)."""

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        """float64 array of len(ids) - 1: entry t is log p(ids[t + 1] | ids[: t + 1])."""

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt`, ending with the stop token when the engine stopped at one."""

    def stop_ids(self) -> set[int]:
        """Token ids at which the engine ends generation by itself."""

    def eos_id(self) -> int | None:
        """The engine's end-of-sequence token (what a server without extra flags stops at)."""


class TransformersEngine:
    """A model in transformers, generating with llmft's stop-token policy (`llmft.inference`)."""

    name = "transformers"

    def __init__(self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase) -> None:
        from llmft.inference import model_generation_stops

        self.model = model
        self.tokenizer = tokenizer
        self.stops = model_generation_stops(tokenizer, model)

    def prompt_ids(self, messages: list[dict]) -> dict[str, list[int]]:
        return {"chat template": render_prompt(messages, self.tokenizer)}

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, :-1]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            return logprobs.gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].cpu().numpy()

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        import torch

        input_ids = torch.tensor([prompt], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stops.eos_token_ids,
                pad_token_id=self.stops.pad_token_id,
            )
        return output[0, len(prompt) :].tolist()

    def stop_ids(self) -> set[int]:
        return set(self.stops.eos_token_ids)

    def eos_id(self) -> int | None:
        return self.stops.eos_token_ids[0]


@dataclass
class ConversationParity:
    id: str
    answer_tokens: int  # tokens compared for log-probability drift
    mean_logprob_diff: float
    max_logprob_diff: float
    prompt_tokens: int  # llmft's rendering of the prompt
    prompt_match: bool | None  # every rendering of the engine gives llmft's ids; None: not compared (tools, reasoning)
    prompt_mismatches: dict[str, int]  # rendering -> index of its first token that differs from llmft's
    greedy_reference: list[int]
    greedy_exported: list[int]
    reference_stopped: bool  # the reference's continuation ended at one of its stop tokens
    exported_stopped: bool  # the exported model's continuation ended at one of the engine's stop tokens

    @property
    def greedy_same(self) -> bool:
        return self.greedy_reference == self.greedy_exported

    @property
    def greedy_common_prefix(self) -> int:
        n = 0
        for a, b in zip(self.greedy_reference, self.greedy_exported):
            if a != b:
                break
            n += 1
        return n


@dataclass
class ParityReport:
    exported: str  # what was exported (a file or folder)
    engine: str  # the engine the exported model ran in
    reference: str  # the trained model, in transformers
    end_of_turn_token: str
    end_of_turn_id: int
    engine_stops_at_end_of_turn: bool
    engine_eos_token: str | None
    greedy_tokens: int
    conversations: list[ConversationParity] = field(default_factory=list)
    max_logprob_drift: float | None = None  # the threshold checked, if any

    @property
    def answer_tokens(self) -> int:
        return sum(c.answer_tokens for c in self.conversations)

    @property
    def mean_logprob_diff(self) -> float:
        tokens = self.answer_tokens
        return sum(c.mean_logprob_diff * c.answer_tokens for c in self.conversations) / tokens if tokens else 0.0

    @property
    def max_logprob_diff(self) -> float:
        return max((c.max_logprob_diff for c in self.conversations), default=0.0)

    @property
    def greedy_same(self) -> int:
        return sum(c.greedy_same for c in self.conversations)

    @property
    def greedy_agreement(self) -> float:
        """Mean over conversations of the common prefix's share of the reference continuation."""
        shares = [c.greedy_common_prefix / max(len(c.greedy_reference), 1) for c in self.conversations]
        return sum(shares) / len(shares) if shares else 0.0

    @property
    def prompts_compared(self) -> int:
        return sum(c.prompt_match is not None for c in self.conversations)

    @property
    def prompts_matching(self) -> int:
        return sum(bool(c.prompt_match) for c in self.conversations)

    @property
    def eos_is_end_of_turn(self) -> bool:
        return self.engine_eos_token == self.end_of_turn_token

    def problems(self) -> list[str]:
        """What makes the export unfit to serve: each an error line naming the figure."""
        problems = []
        mismatched = [c for c in self.conversations if c.prompt_match is False]
        if mismatched:
            first = mismatched[0]
            where = ", ".join(f"{how} from token {index}" for how, index in first.prompt_mismatches.items())
            problems.append(
                f"{self.engine} renders and tokenizes the prompt differently from the trained model's chat template "
                f"in {len(mismatched)} of {self.prompts_compared} conversations (first: {first.id!r}, {where}): the "
                "embedded chat template or special tokens are wrong"
            )
        if not self.engine_stops_at_end_of_turn:
            problems.append(
                f"{self.engine} does not end generation at the end-of-turn token {self.end_of_turn_token!r}: "
                "answers would run on past the turn"
            )
        if not self.eos_is_end_of_turn:
            problems.append(
                f"the exported model's EOS token is {self.engine_eos_token!r}, not the end-of-turn token "
                f"{self.end_of_turn_token!r}: servers that stop at EOS would run on past the turn"
            )
        if not math.isfinite(self.max_logprob_diff):
            problems.append(f"{self.engine} gives non-finite log-probabilities: the exported weights are broken")
        elif self.max_logprob_drift is not None and self.max_logprob_diff > self.max_logprob_drift:
            problems.append(
                f"log-probability drift {self.max_logprob_diff:.4g} (max over {self.answer_tokens} answer tokens; "
                f"mean {self.mean_logprob_diff:.4g}) is over --max_logprob_drift {self.max_logprob_drift:g}"
            )
        return problems

    def to_json(self) -> dict:
        conversations = [
            {**asdict(c), "greedy_same": c.greedy_same, "greedy_common_prefix": c.greedy_common_prefix}
            for c in self.conversations
        ]
        summary = {
            "answer_tokens": self.answer_tokens,
            "mean_logprob_diff": self.mean_logprob_diff,
            "max_logprob_diff": self.max_logprob_diff,
            "greedy_same": self.greedy_same,
            "greedy_agreement": self.greedy_agreement,
            "prompts_compared": self.prompts_compared,
            "prompts_matching": self.prompts_matching,
            "eos_is_end_of_turn": self.eos_is_end_of_turn,
            "problems": self.problems(),
        }
        fields = {k: v for k, v in asdict(self).items() if k != "conversations"}
        return {**fields, **summary, "conversations": conversations}

    def table(self) -> str:
        n = len(self.conversations)
        stopped_ref = sum(c.reference_stopped for c in self.conversations)
        stopped_exp = sum(c.exported_stopped for c in self.conversations)
        rows = [
            ("log-prob diff, mean", f"{self.mean_logprob_diff:.3g} over {self.answer_tokens} answer tokens"),
            ("log-prob diff, max", f"{self.max_logprob_diff:.3g}"),
            (
                f"greedy, first {self.greedy_tokens}",
                f"{self.greedy_same}/{n} identical, {self.greedy_agreement:.1%} common prefix",
            ),
            ("prompt tokens", f"{self.prompts_matching}/{self.prompts_compared} identical"),
            (
                "stops at end of turn",
                f"{'yes' if self.engine_stops_at_end_of_turn else 'NO'} ({self.end_of_turn_token}); EOS "
                f"{self.engine_eos_token}",
            ),
            ("greedy ended at a stop", f"trained {stopped_ref}/{n}, exported {stopped_exp}/{n}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"parity: {self.exported} in {self.engine} vs {self.reference} in transformers, {n} conversations"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        lines += [f"  PROBLEM: {p}" for p in self.problems()]
        return "\n".join(lines)


def plain_chat(conversation: Conversation) -> bool:
    """Whether every message is plain system/user/assistant text, which llama.cpp's built-in templates render (no
    tools, tool calls or reasoning)."""
    messages = conversation.as_dicts()
    plain = all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant") for m in messages)
    return plain and not conversation.tools


def longest_prompt(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> tuple[list[dict], list[int]] | None:
    """(messages, llmft's ids) of the prompt before the conversation's last assistant turn whose prompt fits in
    `max_tokens`; None when none does."""
    messages = conversation.as_dicts()
    for turn in reversed([i for i, m in enumerate(messages) if m["role"] == "assistant"]):
        ids = render_prompt(messages[:turn], tokenizer)
        if len(ids) <= max_tokens:
            return messages[:turn], ids
    return None


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(
    reference: ServingEngine,
    exported: ServingEngine,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    *,
    exported_name: str,
    reference_name: str,
    greedy_tokens: int = GREEDY_TOKENS,
    max_tokens: int = MAX_TOKENS,
    max_logprob_drift: float | None = None,
) -> ParityReport:
    """The parity report of `exported` against `reference` on `conversations` (see the module docstring).
    `tokenizer` is the trained model's: it renders the conversations and names the end-of-turn token. Each
    conversation is cut to `max_tokens` (whole turns kept) for the log-probabilities, and its prompt for the greedy
    and prompt comparisons is the one before the last assistant turn that fits in `max_tokens`: an engine needs a
    context of `max_tokens + greedy_tokens`."""
    end = end_of_turn_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end)
    eos = exported.eos_id()
    report = ParityReport(
        exported=exported_name,
        engine=exported.name,
        reference=reference_name,
        end_of_turn_token=end,
        end_of_turn_id=end_id,
        engine_stops_at_end_of_turn=end_id in exported.stop_ids(),
        engine_eos_token=tokenizer.convert_ids_to_tokens(eos) if eos is not None else None,
        greedy_tokens=greedy_tokens,
        max_logprob_drift=max_logprob_drift,
    )
    for conversation in conversations:
        if conversation.is_plain_text:
            continue
        sample = render_conversation(conversation, tokenizer, max_length=max_tokens, overlong="truncate")
        if sample is None:
            continue
        scored = np.array([label != IGNORE_INDEX for label in sample.labels[1:]])
        expected = reference.next_token_logprobs(sample.input_ids)[scored]
        actual = exported.next_token_logprobs(sample.input_ids)[scored]
        diff = np.nan_to_num(np.abs(expected - actual), nan=np.inf)  # a NaN is the largest drift there is
        prompt = longest_prompt(conversation, tokenizer, max_tokens)
        if prompt is None:
            continue
        messages, ours = prompt
        theirs = exported.prompt_ids(messages) if plain_chat(conversation) else {}
        mismatches = {how: first_mismatch(ours, ids) for how, ids in theirs.items()}
        mismatches = {how: index for how, index in mismatches.items() if index is not None}
        greedy_reference = reference.greedy(ours, greedy_tokens)
        greedy_exported = exported.greedy(ours, greedy_tokens)
        report.conversations.append(
            ConversationParity(
                id=conversation.id,
                answer_tokens=int(diff.size),
                mean_logprob_diff=float(diff.mean()) if diff.size else 0.0,
                max_logprob_diff=float(diff.max()) if diff.size else 0.0,
                prompt_tokens=len(ours),
                prompt_match=not mismatches if plain_chat(conversation) else None,
                prompt_mismatches=mismatches,
                greedy_reference=greedy_reference,
                greedy_exported=greedy_exported,
                reference_stopped=bool(greedy_reference) and greedy_reference[-1] in reference.stop_ids(),
                exported_stopped=bool(greedy_exported) and greedy_exported[-1] in exported.stop_ids(),
            )
        )
    if not report.conversations:
        raise LlmftError(f"no conversation to check parity on leaves answer tokens within {max_tokens} tokens")
    return report
