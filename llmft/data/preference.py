"""Preference data: pairs of answers to one prompt (DPO, SimPO, ORPO) and single answers labelled desirable or not
(KTO), read from files, rendered as SFT renders conversations, and packed into token-budget micro-batches.

Pair records (one pair a record; a file may mix the forms, JSON list or JSONL as for SFT data):
- TRL, explicit prompt: `{"prompt", "chosen", "rejected"}`, each a string or a list of messages (a string prompt is
  the user's turn, a string answer the assistant's).
- TRL, implicit prompt: `{"chosen", "rejected"}`, each a whole conversation (a list of messages): the prompt is each
  side's conversation through its last user turn, and must be the same on both sides.
- LLaMA-Factory ShareGPT ranking: `{"conversations": [...], "chosen": {"from": "gpt", ...}, "rejected": {...}}` (the
  answers a message or a list of them; `messages` with role/content as well).
- LLaMA-Factory's `{"chosen_messages", "rejected_messages"}`: whole conversations as in the implicit form, or the
  answers alone next to a `prompt` / `conversations` / `messages`.
- Alpaca ranking: `{"instruction", "input"?, "chosen", "rejected", "system"?}`, answers as strings.
Every form may carry `id`, `system` and `tools` as SFT records do; messages are read by `llmft.data.records`, so
tool calls, tool results, reasoning and multi-turn prompts mean what they mean in SFT data.

KTO records: TRL's `{"prompt", "completion", "label"}` (`label` true for a desirable answer, false otherwise; the
prompt may be left out when the completion is a whole conversation), and LLaMA-Factory's `kto_tag` on an SFT record
(ShareGPT, OpenAI or Alpaca: the answer is what follows the last user turn). A pair record in KTO data gives two
examples, its chosen answer desirable and its rejected one not, as TRL unpairs them.

Errors name the record (file, position and line, `id`): a missing side, an empty answer, chosen equal to rejected,
prompts that differ between the two sides, an answer that holds a user turn, a label that is not a boolean, and every
error the SFT reader finds in the messages themselves.

Rendering: each side is the prompt followed by its answer, rendered by `llmft.data.render` with SFT's template and
masks: labels -100 everywhere except the answer's assistant turns and their end-of-turn tokens (the prompt's own
assistant turns are never scored, whatever they say about `train`). A pair with a side over `max_length` tokens is
dropped whole: a cut answer would compare a fragment with an answer.

Packing: `PairPackedCollator` lays the micro-batch's pairs out in one row, each pair's chosen sequence then its
rejected one, positions restarting at 0 per sequence and no padding, as SFT's `PackedCollator` does (it does the
laying out), with `chosen_index` / `rejected_index` saying which sequence is which. SFT's `TokenBudgetBatchSampler`
over `pair_lengths` makes the micro-batches: its unit is the pair, so a pair is never split between micro-batches.
`KtoPackedCollator` packs KTO examples the same way, plus a second row of KL sequences (`kl_*`): each prompt with
another example's answer (`kl_partners`), which KTO's reference point is estimated from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmft.data.conversation import ASSISTANT, TOOL, USER, Conversation, Message
from llmft.data.reading import iter_records
from llmft.data.records import ROLE_ALIASES, is_blank, parse_record
from llmft.data.packing import PackedCollator
from llmft.data.render import IGNORE_INDEX, RenderedSample, render_samples
from llmft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHOSEN, REJECTED = "chosen", "rejected"
PAIR_KEYS = ((CHOSEN, REJECTED), ("chosen_messages", "rejected_messages"))
PROMPT_KEYS = ("prompt", "conversations", "messages")  # where an explicit prompt may be
KL_BLOCK = 8  # examples per block in which KTO's KL sequences pair prompts with other answers (`kl_partners`)


class IdenticalAnswers(DataError):
    """A pair whose chosen answer is its rejected one: nothing to prefer."""


@dataclass(frozen=True)
class PreferencePair:
    """One prompt and two answers to it. `prompt`: an optional system message, then turns ending with the user's (or
    with tool results the answer goes on from); `chosen`, `rejected`: the answers' turns, assistant messages and the
    tool results between them; `tools`: the function schemas the model is shown."""

    id: str
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    tools: tuple[dict, ...] = ()

    def conversation(self, side: str) -> Conversation:
        """The prompt followed by one side's answer, only the answer's assistant turns trained."""
        return answer_conversation(self.id, self.prompt, self.chosen if side == CHOSEN else self.rejected, self.tools)


@dataclass(frozen=True)
class KtoExample:
    """One prompt and one answer, desirable or not."""

    id: str
    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    desirable: bool
    tools: tuple[dict, ...] = ()

    def conversation(self) -> Conversation:
        return answer_conversation(self.id, self.prompt, self.completion, self.tools)


def answer_conversation(
    id: str, prompt: tuple[Message, ...], answer: tuple[Message, ...], tools: tuple[dict, ...] = ()
) -> Conversation:
    """The conversation of a prompt and an answer in which exactly the answer's assistant turns are trained."""
    messages = tuple(dataclasses.replace(m, train=False) if m.role == ASSISTANT else m for m in prompt)
    messages += tuple(dataclasses.replace(m, train=True) if m.role == ASSISTANT else m for m in answer)
    return Conversation(id=id, messages=messages, tools=tools)


# --- reading -------------------------------------------------------------------------------------------------------


def iter_preference_pairs(path: str) -> Iterator[PreferencePair]:
    """The pairs of a file, one a record, validated; a DataError names the first bad record."""
    for index, where, record in iter_records(path):
        yield parse_preference_record(record, where, default_id=str(index))


def load_preference_pairs(path: str) -> list[PreferencePair]:
    return list(iter_preference_pairs(path))


def iter_kto_examples(path: str) -> Iterator[KtoExample]:
    """The KTO examples of a file: one a KTO record, two a pair record."""
    for index, where, record in iter_records(path):
        yield from parse_kto_record(record, where, default_id=str(index))


def load_kto_examples(path: str) -> list[KtoExample]:
    return list(iter_kto_examples(path))


def parse_preference_record(record: object, where: str = "record", default_id: str = "0") -> PreferencePair:
    """One raw pair record, in any accepted form (see the module docstring), as a validated PreferencePair."""
    record_id, where = _identify(record, where, default_id)
    keys = _pair_keys(record, where)
    if keys is None:
        kind = "a KTO record" if "kto_tag" in record or "label" in record else f"keys {sorted(record, key=str)}"
        raise DataError(
            f"{where}: not a preference pair ({kind}); a pair needs 'chosen' and 'rejected' (or 'chosen_messages' "
            "and 'rejected_messages')"
        )
    prompt = _raw_prompt(record, where)
    sides = {}
    for side, key in zip((CHOSEN, REJECTED), keys):
        sides[side] = _parse_answer(
            record, prompt, record[key], f"{where}: {key}", record_id, what=f"the {side} answer"
        )
    (prompt_c, chosen, tools), (prompt_r, rejected, _) = sides[CHOSEN], sides[REJECTED]
    if prompt_c != prompt_r:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r))
        )
        raise DataError(
            f"{where}: the prompt differs between chosen and rejected (from turn {turn} on): a pair holds two "
            "answers to one prompt"
        )
    if _without_train(chosen) == _without_train(rejected):
        raise IdenticalAnswers(f"{where}: chosen and rejected are the same answer, so there is no preference to learn")
    return PreferencePair(record_id, prompt_c, chosen, rejected, tools)


def parse_kto_record(record: object, where: str = "record", default_id: str = "0") -> list[KtoExample]:
    """One raw KTO record as a validated KtoExample, or a pair record as two (chosen desirable, rejected not)."""
    record_id, named = _identify(record, where, default_id)
    if _pair_keys(record, named) is not None:
        pair = parse_preference_record(record, where, default_id=default_id)
        return [
            KtoExample(f"{pair.id}/{CHOSEN}", pair.prompt, pair.chosen, True, pair.tools),
            KtoExample(f"{pair.id}/{REJECTED}", pair.prompt, pair.rejected, False, pair.tools),
        ]
    where = named
    if "kto_tag" in record:
        label = _label(record, "kto_tag", where)
        if "instruction" in record:
            prompt = _raw_prompt(record, where)
            answer = record.get("output")
            if not isinstance(answer, str):
                raise DataError(f"{where}: 'output' must be a string")
        else:
            key = next((k for k in ("conversations", "messages") if k in record), None)
            if key is None:
                raise DataError(f"{where}: a kto_tag record needs 'conversations', 'messages' or 'instruction'")
            prompt, answer = None, record[key]
        answer_where = f"{where}: {'output' if 'instruction' in record else key}"
    elif "completion" in record or "label" in record:
        if "completion" not in record or record["completion"] is None:
            raise DataError(f"{where}: has 'label' but no 'completion'")
        if "label" not in record:
            raise DataError(f"{where}: has 'completion' but no 'label' (true: desirable, false: undesirable)")
        label = _label(record, "label", where)
        prompt, answer, answer_where = _raw_prompt(record, where), record["completion"], f"{where}: completion"
    else:
        raise DataError(
            f"{where}: not a KTO record (keys {sorted(record, key=str)}); expected 'prompt', 'completion' and "
            "'label', an SFT record with a 'kto_tag', or a preference pair"
        )
    prompt_messages, completion, tools = _parse_answer(
        record, prompt, answer, answer_where, record_id, what="the completion"
    )
    return [KtoExample(record_id, prompt_messages, completion, label, tools)]


def _identify(record: object, where: str, default_id: str) -> tuple[str, str]:
    """(the record's id, `where` naming it) of a record that must be a JSON object."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get("id")
    if value is None:
        return default_id, where
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: 'id' must be a string or a number, got {type(value).__name__}")
    return str(value), f"{where} (id {str(value)!r})"


def _pair_keys(record: dict, where: str) -> tuple[str, str] | None:
    """The record's (chosen key, rejected key), None when it has neither; one side alone is an error."""
    for keys in PAIR_KEYS:
        present = [key for key in keys if record.get(key) is not None]
        if len(present) == 2:
            return keys
        if present:
            missing = next(key for key in keys if key not in present)
            state = "is null" if missing in record else "is missing"
            raise DataError(f"{where}: has '{present[0]}' but '{missing}' {state}: a preference pair needs both sides")
    return None


def _raw_prompt(record: dict, where: str) -> list | None:
    """The record's explicit prompt as raw turns, or None when the prompt is implicit (inside the answers)."""
    if "instruction" in record:
        parts = {key: record.get(key) for key in ("instruction", "input")}
        for key, value in parts.items():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string")
        text = "\n\n".join(part for part in parts.values() if part)
        if is_blank(text):
            raise DataError(f"{where}: the 'instruction' is empty")
        return [{"role": USER, "content": text}]
    key = next((k for k in PROMPT_KEYS if record.get(k) is not None), None)
    if key is None:
        return None
    return _turns(record[key], USER, f"{where}: '{key}'")


def _turns(value: object, role: str, where: str) -> list:
    """Raw turns of a field that holds a string (one turn of `role`), a message or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return list(value)
    raise DataError(f"{where} must be a string, a message or a list of messages, got {type(value).__name__}")


def _role(turn: object) -> str | None:
    role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
    return ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None


def _parse_answer(
    record: dict, prompt: list | None, answer: object, where: str, record_id: str, what: str
) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[dict, ...]]:
    """(prompt, answer, tools) of one side, read and checked as one SFT conversation. With an explicit `prompt` the
    side holds the answer alone; without, it is the whole conversation, split after its last user turn."""
    if isinstance(answer, str) and is_blank(answer) or isinstance(answer, list) and not answer:
        raise DataError(f"{where}: {what} is empty")
    turns = _turns(answer, ASSISTANT, where)
    if prompt is None and not isinstance(answer, list):
        raise DataError(
            f"{where}: without a 'prompt', {what} must be a whole conversation (a list of messages) whose turns "
            "up to the last user turn are the prompt"
        )
    if prompt is None and _role(turns[-1]) == USER:
        raise DataError(f"{where}: {what} is empty (the conversation ends with the user's turn)")
    raw = {"messages": (prompt or []) + turns}
    for key in ("system", "tools"):
        if key in record:
            raw[key] = record[key]
    conversation = parse_record(raw, where, default_id=record_id)
    messages = conversation.messages
    if prompt is not None:
        split = len(messages) - len(turns)
    else:
        users = [i for i, m in enumerate(messages) if m.role == USER]
        split = users[-1] + 1
    prompt_messages, answer_messages = messages[:split], messages[split:]
    if not any(m.role == USER for m in prompt_messages):
        raise DataError(f"{where}: the prompt has no user turn")
    if not answer_messages:
        raise DataError(f"{where}: {what} is empty (the conversation ends with the user's turn)")
    for i, message in enumerate(answer_messages):
        if message.role not in (ASSISTANT, TOOL) or i == 0 and message.role != ASSISTANT:
            raise DataError(
                f"{where}: {what} holds a {message.role} turn at its turn {i}: an answer is the assistant's turns "
                "(and the results of its tool calls); with a 'prompt', give only the answer"
            )
    if all(is_blank(m.content) and not m.tool_calls and is_blank(m.reasoning or "") for m in answer_messages):
        raise DataError(f"{where}: {what} is empty")
    return prompt_messages, answer_messages, conversation.tools


def _without_train(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    return tuple(dataclasses.replace(m, train=None) for m in messages)


def _label(record: dict, key: str, where: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise DataError(f"{where}: '{key}' must be true or false (is the answer desirable?), got {value!r}")
    return value


# --- rendering -----------------------------------------------------------------------------------------------------


@dataclass
class RenderedPair:
    chosen: RenderedSample
    rejected: RenderedSample

    def features(self) -> dict[str, list[int]]:
        """The pair as a dataset row, the shape `PairPackedCollator` takes."""
        return {
            "chosen_input_ids": self.chosen.input_ids,
            "chosen_labels": self.chosen.labels,
            "rejected_input_ids": self.rejected.input_ids,
            "rejected_labels": self.rejected.labels,
        }


def render_answer(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase, *, default_system: str | None = None
) -> RenderedSample:
    """One prompt-and-answer conversation (`answer_conversation`) as one sequence, masked as SFT masks it."""
    samples = render_samples(conversation, tokenizer, default_system=default_system, train_turns="all")
    if len(samples) != 1:
        raise DataError(
            f"sample {conversation.id}: the chat template renders the answer's earlier turns differently once later "
            "turns follow (as Qwen3's drops their reasoning), so the answer is not one sequence the model could "
            "have generated; give answers of one assistant turn, or use a template without that behaviour"
        )
    return samples[0]


def render_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    *,
    default_system: str | None = None,
    max_length: int | None = None,
) -> RenderedPair | None:
    """Both sides of a pair rendered; None when either is longer than `max_length` tokens (the pair is dropped)."""
    chosen, rejected = (
        render_answer(pair.conversation(side), tokenizer, default_system=default_system) for side in (CHOSEN, REJECTED)
    )
    if max_length is not None and max(len(chosen.input_ids), len(rejected.input_ids)) > max_length:
        return None
    return RenderedPair(chosen, rejected)


def render_kto_example(
    example: KtoExample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    default_system: str | None = None,
    max_length: int | None = None,
) -> dict | None:
    """A KTO example as a dataset row: `input_ids`, `labels`, `desirable` and `answer_start` (where the answer's
    tokens begin, for the KL sequences); None when it is longer than `max_length` tokens."""
    sample = render_answer(example.conversation(), tokenizer, default_system=default_system)
    if max_length is not None and len(sample.input_ids) > max_length:
        return None
    start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    return {
        "input_ids": sample.input_ids,
        "labels": sample.labels,
        "desirable": example.desirable,
        "answer_start": start,
    }


def kl_partners(prompts: Sequence[object], block: int) -> list[int]:
    """For each example in dataset order (`prompts`: one key per example, equal for examples of the same prompt), the
    example whose answer follows its prompt in its KL sequence: within its block of `block` consecutive examples, the
    nearest one before it (the block's first looking from the block's last) whose prompt differs. With distinct
    prompts that is TRL's KTOTrainer's rotation (its block is the per-device batch size); the skipping keeps a pair
    unpaired into two neighbouring examples from matching a prompt with its own other answer. An example whose block
    holds no other prompt is its own partner, so blocks should be at least 2."""
    partners = []
    for start in range(0, len(prompts), block):
        members = list(range(start, min(start + block, len(prompts))))
        for k, i in enumerate(members):
            earlier = [members[(k - step) % len(members)] for step in range(1, len(members))]
            partners.append(next((j for j in earlier if prompts[j] != prompts[i]), i))
    return partners


def with_kl_sequences(rows: Sequence[dict], block: int) -> list[dict]:
    """KTO rows with their KL sequence added (`kl_input_ids`, `kl_labels`): the row's prompt followed by its
    `kl_partners` answer, labelled as that answer was."""
    prompts = [tuple(row["input_ids"][: row["answer_start"]]) for row in rows]
    out = []
    for row, partner in zip(rows, kl_partners(prompts, block)):
        other = rows[partner]
        start, other_start = row["answer_start"], other["answer_start"]
        out.append(
            {
                **row,
                "kl_input_ids": list(row["input_ids"][:start]) + list(other["input_ids"][other_start:]),
                "kl_labels": [IGNORE_INDEX] * start + list(other["labels"][other_start:]),
            }
        )
    return out


@dataclass
class PreferenceRows:
    """A preference file rendered: dataset rows for the objective's collator, and how many records were dropped as
    longer than the length limit."""

    rows: list[dict]
    dropped: int = 0


def preference_rows(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    objective: str,
    *,
    default_system: str | None = None,
    max_length: int | None = None,
    kl_block: int = KL_BLOCK,
) -> PreferenceRows:
    """Every record of `path` rendered for `objective`: pair rows (`RenderedPair.features`) for dpo, simpo and orpo;
    for kto, example rows with their KL sequences (`with_kl_sequences` in blocks of `kl_block`, dataset order)."""
    rows, dropped = [], 0
    if objective == "kto":
        for example in iter_kto_examples(path):
            row = render_kto_example(example, tokenizer, default_system=default_system, max_length=max_length)
            dropped += row is None
            rows += [row] if row is not None else []
        return PreferenceRows(with_kl_sequences(rows, kl_block), dropped)
    for pair in iter_preference_pairs(path):
        rendered = render_pair(pair, tokenizer, default_system=default_system, max_length=max_length)
        dropped += rendered is None
        rows += [rendered.features()] if rendered is not None else []
    return PreferenceRows(rows, dropped)


# --- packing -------------------------------------------------------------------------------------------------------


def pair_lengths(rows: Sequence[dict]) -> list[int]:
    """Tokens each pair row takes in a packed row: what `TokenBudgetBatchSampler` bins."""
    return [len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) for row in rows]


def kto_lengths(rows: Sequence[dict]) -> list[int]:
    """Tokens of each KTO row: its sequence, and its KL sequence (run in a row of its own, without gradient)."""
    return [len(row["input_ids"]) + len(row.get("kl_input_ids", ())) for row in rows]


def _packed(samples: list[dict], sample_boundaries: bool) -> dict[str, torch.Tensor]:
    """SFT's packed row of `samples`, no padding."""
    if any(not sample["input_ids"] for sample in samples):
        raise ValueError("an empty sequence cannot be packed: its pair would lose track of its sides")
    return PackedCollator(pad_token_id=0, pad_to_multiple_of=1, sample_boundaries=sample_boundaries)(samples)


@dataclass
class PairPackedCollator:
    """Pair rows -> one packed row of 2 x pairs sequences (see the module docstring): `input_ids`, `labels`,
    `position_ids` (1, T); `chosen_index`, `rejected_index` (pairs,): the sequence numbers of each pair's sides (its
    chosen sequence is 2i, its rejected 2i + 1); `reference_logps` (2 x pairs,) when the rows carry
    `ref_chosen_logps` and `ref_rejected_logps` (reference log-probabilities computed before training). With
    `sample_boundaries`, the sequences' offsets for variable-length attention kernels, as `PackedCollator` gives."""

    sample_boundaries: bool = False

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        samples = []
        for row in features:
            for side in (CHOSEN, REJECTED):
                samples.append({"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]})
        batch = _packed(samples, self.sample_boundaries)
        pairs = len(features)
        batch["chosen_index"] = torch.arange(0, 2 * pairs, 2)
        batch["rejected_index"] = torch.arange(1, 2 * pairs, 2)
        if features and all("ref_chosen_logps" in row for row in features):
            batch["reference_logps"] = torch.tensor(
                [row[f"ref_{side}_logps"] for row in features for side in (CHOSEN, REJECTED)], dtype=torch.float32
            )
        return batch


@dataclass
class KtoPackedCollator:
    """KTO rows (with their KL sequences, `with_kl_sequences`) -> the packed row of their sequences (`input_ids`,
    `labels`, `position_ids`), the packed row of their KL sequences (the same keys prefixed `kl_`), `desirable`
    (examples,) and, when the rows carry them, `reference_logps` and `reference_kl_logps` (`ref_logps`,
    `ref_kl_logps`: the reference's log-probabilities computed before training)."""

    sample_boundaries: bool = False

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = _packed(
            [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in features], self.sample_boundaries
        )
        kl = _packed(
            [{"input_ids": row["kl_input_ids"], "labels": row["kl_labels"]} for row in features], self.sample_boundaries
        )
        batch.update({f"kl_{key}": value for key, value in kl.items()})
        batch["desirable"] = torch.tensor([bool(row["desirable"]) for row in features])
        for key, name in (("ref_logps", "reference_logps"), ("ref_kl_logps", "reference_kl_logps")):
            if features and all(key in row for row in features):
                batch[name] = torch.tensor([row[key] for row in features], dtype=torch.float32)
        return batch
