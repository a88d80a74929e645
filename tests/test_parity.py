"""llmft.parity on two transformers engines (the report as GPTQ and merged exports would use it): figures of a
model against itself and against a perturbed copy, and the problems it names."""

from __future__ import annotations

import copy

import pytest
import torch

from llmft.data.records import load_conversations
from llmft.inference import load_model, load_tokenizer
from llmft.parity import TransformersEngine, compare
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def trained(tiny_chat_model):
    return load_model(tiny_chat_model, dtype=torch.float32), load_tokenizer(tiny_chat_model)


def report_of(reference, exported, tokenizer, **options):
    conversations = load_conversations(str(EXAMPLES))[-4:]
    return compare(
        TransformersEngine(reference, tokenizer),
        TransformersEngine(exported, tokenizer),
        tokenizer,
        conversations,
        exported_name="exported",
        reference_name="trained",
        **options,
    )


def test_a_model_against_itself(trained):
    model, tokenizer = trained
    report = report_of(model, model, tokenizer)
    assert len(report.conversations) == 4 and report.answer_tokens > 20
    assert report.mean_logprob_diff == 0 and report.max_logprob_diff == 0
    assert report.greedy_same == 4 and report.greedy_agreement == 1.0
    assert report.prompts_matching == report.prompts_compared == 4
    assert report.engine_stops_at_end_of_turn and report.engine_eos_token == "<|im_end|>"
    assert report.problems() == []
    assert report.to_json()["problems"] == [] and "4/4 identical" in report.table()


def test_drift_of_perturbed_weights_and_its_threshold(trained):
    model, tokenizer = trained
    perturbed = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05 * parameter.abs().mean())
    report = report_of(model, perturbed, tokenizer, max_logprob_drift=1e-4)
    assert 0 < report.mean_logprob_diff <= report.max_logprob_diff
    assert report.prompts_matching == 4  # the same tokenizer: only the weights moved
    [problem] = report.problems()
    assert (
        problem.startswith(f"log-probability drift {report.max_logprob_diff:.4g}")
        and "--max_logprob_drift 0.0001" in problem
    )
    assert report_of(model, perturbed, tokenizer, max_logprob_drift=10.0).problems() == []


def test_nan_weights_are_a_problem(trained):
    model, tokenizer = trained
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    report = report_of(model, broken, tokenizer, max_logprob_drift=1.0)
    assert any("non-finite log-probabilities" in p for p in report.problems())


def test_a_long_conversation_is_compared_at_a_turn_that_fits(trained):
    """The greedy and prompt comparisons start before the last assistant turn whose prompt fits in max_tokens."""
    from llmft.data.records import parse_record
    from llmft.data.render import render_prompt
    from llmft.parity import longest_prompt

    model, tokenizer = trained
    turns = ["Tell me about the sea and the wind and the gulls that fly home. " * 3, "The waves rise. " * 4] * 3
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    conversation = parse_record({"messages": messages}, "test", "long")
    second = len(render_prompt(messages[:3], tokenizer))
    assert len(render_prompt(messages[:5], tokenizer)) > second + 20
    chosen, ids = longest_prompt(conversation, tokenizer, second + 10)
    assert chosen == messages[:3] and len(ids) == second
    report = compare(
        TransformersEngine(model, tokenizer),
        TransformersEngine(model, tokenizer),
        tokenizer,
        [conversation],
        exported_name="e",
        reference_name="t",
        max_tokens=second + 10,
    )
    [checked] = report.conversations
    assert checked.prompt_tokens == second and checked.prompt_match and checked.greedy_same
