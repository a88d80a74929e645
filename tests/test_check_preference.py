"""`llmft check --objective dpo|kto` on preference files: pair and example counts and token lengths against ones
computed by hand, over-long pairs dropped whole, every bad record listed (identical answers among them), and records
of the other kind of data named with the flag that checks them."""

import json

import pytest

from transformers import AutoTokenizer

from tests.conftest import chat_record, write_records
from llmft.tools.check import main

STORY = " ".join(["The quick brown fox jumps over the lazy dog."] * 50)


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


PAIRS = [
    {"id": "a", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"id": "a-again", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},  # a duplicate of a
    {"id": "same", "prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"},
    {"id": "long", "prompt": "Tell me a story.", "chosen": "No.", "rejected": STORY},  # over 200 tokens: dropped
    {
        "id": "same-again",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}],
    },
    {"id": "one-sided", "prompt": "Hi", "chosen": "Hello!"},
    chat_record("Hi", "Hello!", id="sft"),
    {"id": "kto", "prompt": "Hi", "completion": "Hello!", "label": True},
]


def run_check(tmp_path, data, model, *flags):
    report = tmp_path / "report.json"
    status = main([str(data), "--model_name_or_path", str(model), *map(str, flags), "--report", str(report)])
    return status, json.loads(report.read_text())


def test_pair_counts_lengths_and_every_bad_record(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "pairs.jsonl", PAIRS, jsonl=True)
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    status, report = run_check(tmp_path, data, tiny_chat_model, "--objective", "dpo", "--model_max_length", 200)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert status == 1
    assert report["objective"] == "dpo" and "kto_examples" not in report
    assert report["records"] == 9
    assert (report["pairs"], report["kept"], report["dropped"]) == (3, 2, 1)
    assert report["identical_pairs"] == 2
    assert report["duplicate_records"] == 1 and report["duplicates"] == [[1, 0]]
    chosen = n(chatml("user", "Hi") + chatml("assistant", "Hello!"))
    rejected = n(chatml("user", "Hi") + chatml("assistant", "Go away."))
    assert report["tokens"] == 2 * (chosen + rejected)
    assert report["trained_tokens"] == 2 * (n("Hello!<|im_end|>") + n("Go away.<|im_end|>"))
    long_rejected = n(chatml("user", "Tell me a story.") + chatml("assistant", STORY))
    assert long_rejected > 200
    lengths = report["token_lengths"]
    assert set(lengths) == {"prompt", "chosen", "rejected", "sequence"}
    assert lengths["sequence"]["max"] == long_rejected  # over-long sequences are measured, as SFT's are
    prompt = n(chatml("user", "Hi") + "<|im_start|>assistant\n")
    assert lengths["prompt"]["p50"] == prompt
    assert lengths["chosen"]["p50"] == chosen - prompt  # the answer: from its first trained token to the end
    assert lengths["rejected"]["max"] == long_rejected - n(
        chatml("user", "Tell me a story.") + "<|im_start|>assistant\n"
    )

    problems = {p["index"]: p for p in report["problems"]}
    assert sorted(problems) == [2, 4, 5, 6, 7, 8]
    assert report["bad_records"] == 6
    assert "same answer" in problems[2]["message"] and problems[2]["id"] == "same"
    assert "same answer" in problems[4]["message"]
    assert "'rejected' is missing" in problems[5]["message"]
    assert "SFT conversation" in problems[6]["message"] and "without --objective" in problems[6]["message"]
    assert "KTO example" in problems[7]["message"] and "--objective kto" in problems[7]["message"]
    assert problems[8]["line"] == 9
    out = capsys.readouterr().out
    assert "pairs: 3; chosen the same as rejected: 2 records" in out
    assert "2 pairs kept, 1 dropped" in out
    assert (tmp_path / "report.png").stat().st_size > 0


def test_kto_examples_counted_desirable_and_undesirable(tiny_chat_model, tmp_path, capsys):
    records = [
        {"id": "t", "prompt": "Hi", "completion": "Hello!", "label": True},
        chat_record("Hi", "Go away.", id="tagged") | {"kto_tag": False},
        {"id": "pair", "prompt": "Why?", "chosen": "Because.", "rejected": "No."},  # two examples
        {"id": "bad-label", "prompt": "Hi", "completion": "Hello!", "label": "yes"},
    ]
    data = write_records(tmp_path / "kto.json", records)
    status, report = run_check(tmp_path, data, tiny_chat_model, "--objective", "kto", "--show", 1)
    assert status == 1
    assert "pairs" not in report and "identical_pairs" not in report
    assert (report["kto_examples"], report["desirable"], report["undesirable"]) == (4, 2, 2)
    assert (report["kept"], report["dropped"]) == (4, 0)
    assert set(report["token_lengths"]) == {"prompt", "completion", "sequence"}
    assert [p["index"] for p in report["problems"]] == [3]
    assert "'label' must be true or false" in report["problems"][0]["message"]
    assert report["micro_batches_per_epoch"] == 1  # four examples at the default per-device batch size
    out = capsys.readouterr().out
    assert "KTO examples: 4 (2 desirable, 2 undesirable)" in out
    assert "=== record #0 (id 't', desirable)" in out


def test_sft_check_names_preference_records_and_the_flag_for_them(tiny_chat_model, tmp_path):
    data = write_records(tmp_path / "mixed.jsonl", [PAIRS[0], chat_record("Hi", "Hello!"), PAIRS[-1]], jsonl=True)
    status, report = run_check(tmp_path, data, tiny_chat_model)
    assert status == 1
    messages = [p["message"] for p in report["problems"]]
    assert len(messages) == 2
    assert "a preference pair" in messages[0] and "--objective dpo, simpo, orpo or kto" in messages[0]
    assert "a KTO example" in messages[1] and "--objective kto" in messages[1]
    assert report["samples"] == 1


def test_a_clean_pair_file_passes_and_preference_flags_are_checked(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "clean.jsonl", PAIRS[:1], jsonl=True)
    status, report = run_check(tmp_path, data, tiny_chat_model, "--objective", "orpo", "--beta", 0.2)
    assert status == 0 and report["problems"] == [] and report["kept"] == 1
    with pytest.raises(SystemExit) as info:
        main([str(data), "--model_name_or_path", str(tiny_chat_model), "--objective", "sft", "--beta", "0.2"])
    assert info.value.code == 2
    assert "--beta" in capsys.readouterr().err
