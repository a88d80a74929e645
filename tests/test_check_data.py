"""tools/check_data.py: its counts against ones computed by hand on a small file, the list of every problem in a file
of broken records (index, line, id), the JSON report and histogram it writes, and --show's highlighting."""

import json

import pytest
from transformers import AutoTokenizer

from tests.conftest import argv, chat_record, write_records
from llmft.tools.check import main

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
STORY = " ".join(["The quick brown fox jumps over the lazy dog."] * 50)


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


GOOD = [
    chat_record("Hi", "Hello!", id="a"),
    chat_record("Hi", "Hello!", id="a-again"),  # a duplicate: the same conversation under another id
    {
        "id": "b",
        "messages": [
            {"role": "user", "content": "one?"},
            {"role": "assistant", "content": "One.", "train": False},
            {"role": "user", "content": "two?"},
            {"role": "assistant", "content": "Two."},
        ],
    },
    {
        "id": "c",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    },
    {"id": "d", "text": "Water boils."},
    chat_record("Hi", "Hello!", "Tell me a story.", STORY, id="long"),  # truncated after its first answer at 400
    chat_record(STORY, "Yes.", id="prompt-too-long"),  # nothing to train within 400 tokens: dropped
]


def run_check(tmp_path, data, *flags):
    report = tmp_path / "report.json"
    status = main([str(data), *map(str, flags), "--report", str(report)])
    return status, json.loads(report.read_text())


def test_counts_match_hand_computed(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "good.jsonl", GOOD, jsonl=True)
    status, report = run_check(
        tmp_path,
        data,
        *argv(
            "--model_name_or_path {model} --model_max_length 400 --per_device_train_batch_size 2",
            "--gradient_accumulation_steps 2",
            model=tiny_chat_model,
        ),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    tools_system = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER], tokenize=False)
    tools_system = tools_system[: tools_system.index("<|im_start|>user")]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    kept = {  # (tokens, trained tokens) of each kept sample, from its text spelled out
        "a": (n(chatml("user", "Hi") + chatml("assistant", "Hello!")), n("Hello!<|im_end|>")),
        "b": (
            n(
                chatml("user", "one?")
                + chatml("assistant", "One.")
                + chatml("user", "two?")
                + chatml("assistant", "Two.")
            ),
            n("Two.<|im_end|>"),
        ),
        "c": (
            n(
                tools_system
                + chatml("user", "Weather?")
                + "<|im_start|>assistant\n"
                + call
                + "<|im_end|>\n"
                + "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                + chatml("assistant", "Sunny.")
            ),
            n(call + "<|im_end|>") + n("Sunny.<|im_end|>"),
        ),
        "d": (n("Water boils.") + 1, n("Water boils.") + 1),  # + <|endoftext|>
        "long": (n(chatml("user", "Hi") + "<|im_start|>assistant\nHello!<|im_end|>"), n("Hello!<|im_end|>")),
    }
    kept["a-again"] = kept["a"]
    full_long = n(
        chatml("user", "Hi")
        + chatml("assistant", "Hello!")
        + chatml("user", "Tell me a story.")
        + chatml("assistant", STORY)
    )
    full_dropped = n(chatml("user", STORY) + chatml("assistant", "Yes."))
    lengths = sorted([kept[k][0] for k in ("a", "a-again", "b", "c")] + [kept["d"][0], full_long, full_dropped])
    assert kept["c"][0] <= 400 < full_long and 400 < n(chatml("user", STORY))  # else the file tests nothing

    assert status == 0
    assert {
        k: report[k]
        for k in (
            "records",
            "chat_records",
            "text_records",
            "bad_records",
            "samples",
            "truncated",
            "dropped",
            "assistant_turns",
            "trained_turns",
            "tool_calls",
            "tool_results",
            "zero_trained_samples",
            "duplicate_records",
            "duplicates",
            "split_conversations",
            "problems",
        )
    } == {
        "records": 7,
        "chat_records": 6,
        "text_records": 1,
        "bad_records": 0,
        "samples": 6,
        "truncated": 1,
        "dropped": 1,
        "assistant_turns": 1 + 1 + 2 + 2 + 2 + 1,
        "trained_turns": 1 + 1 + 1 + 2 + 2 + 1,
        "tool_calls": 1,
        "tool_results": 1,
        "zero_trained_samples": 0,
        "duplicate_records": 1,
        "duplicates": [[1, 0]],
        "split_conversations": 0,
        "problems": [],
    }
    assert report["tokens"] == sum(tokens for tokens, _ in kept.values())
    assert report["trained_tokens"] == sum(trained for _, trained in kept.values())
    assert report["longest"] == lengths[-1] == full_long
    assert report["length_percentiles"]["p50"] == lengths[3]  # nearest rank: the 4th of 7
    assert report["length_percentiles"]["p90"] == lengths[6]
    # 6 samples in micro-batches of 2: 3 micro-batches; 2 per step: 2 steps (the last one partial)
    assert (report["micro_batches_per_epoch"], report["steps_per_epoch"]) == (3, 2)
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "samples: 6" in out and "1 truncated, 1 dropped" in out and "problems: none" in out


def test_steps_with_a_token_budget_and_several_ranks(tiny_chat_model, tmp_path):
    data = write_records(tmp_path / "many.json", [chat_record("Hi", "Hello!", id=str(i)) for i in range(40)])
    _, report = run_check(
        tmp_path, data, "--model_name_or_path", tiny_chat_model, "--per_device_train_batch_size", 4, "--world_size", 2
    )
    assert (report["micro_batches_per_epoch"], report["steps_per_epoch"]) == (10, 5)
    sample = report["tokens"] // 40
    _, report = run_check(
        tmp_path,
        data,
        *argv(
            "--model_name_or_path {model} --max_tokens_per_batch {tokens} --model_max_length {tokens}",
            "--world_size 2",
            model=tiny_chat_model,
            tokens=4 * sample,
        ),
    )
    # every sample has the same length: 4 fit a micro-batch, so 10 micro-batches over 2 ranks
    assert (report["micro_batches_per_epoch"], report["steps_per_epoch"]) == (10, 5)


BROKEN_LINES = [
    json.dumps(chat_record("Hi", "Hello!", id="fine")),
    '{"id": "cut", "messages": [',  # malformed JSON
    "",  # a blank line is no record
    json.dumps(
        {
            "id": "args",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}
                    ],
                },
            ],
        }
    ),
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "b"},
            ]
        }
    ),  # a result with no call, and no id
    json.dumps(
        {
            "id": "weight",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss_weight": 0.5}],
        }
    ),
    json.dumps(
        {
            "id": "unknown-tool",
            "tools": [WEATHER],
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]},
            ],
        }
    ),
    json.dumps({"id": 7, "conversations": [{"from": "narrator", "value": "x"}]}),
    json.dumps(chat_record("Bye", "Goodbye.", id="fine-too")),
]


def test_every_problem_is_listed_with_index_line_and_id(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(BROKEN_LINES) + "\n", encoding="utf-8")
    status, report = run_check(tmp_path, data, "--model_name_or_path", tiny_chat_model)
    assert status == 1
    problems = [(p["index"], p["line"], p["id"]) for p in report["problems"]]
    assert problems == [
        (1, 2, None),
        (2, 4, "args"),
        (3, 5, None),
        (4, 6, "weight"),
        (5, 7, "unknown-tool"),
        (6, 8, "7"),
    ]
    messages = [p["message"] for p in report["problems"]]
    assert messages[0] == f"{data}: line 2 (record #1): malformed JSON: Expecting value at column 28"
    assert messages[1].startswith(
        f"{data}: record #2 (line 4) (id 'args'): turn 1: tool call 0 ('get_weather'): arguments are not valid JSON"
    )
    assert messages[2] == (
        f"{data}: record #3 (line 5): turn 1: a tool result with no tool call before it (the "
        "tool results must follow the assistant turn that calls the tools)"
    )
    assert "loss_weight 0.5 is not supported" in messages[3]
    assert "turn 1 calls 'get_time', which the record's tools do not define" in messages[4]
    assert "turn 0: unknown role 'narrator'" in messages[5]
    assert (report["records"], report["bad_records"], report["samples"]) == (8, 6, 2)
    out = capsys.readouterr().out
    assert "problems (6):" in out and all(m in out for m in messages)


def test_show_marks_the_trained_tokens(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "show.json", GOOD[2:5])
    run_check(tmp_path, data, "--model_name_or_path", tiny_chat_model, "--show", 2)
    out = capsys.readouterr().out
    assert "--- 2 samples as training renders them (trained tokens between [[ and ]])" in out
    assert "=== record #0 (id 'b'): " in out and "=== record #1 (id 'c'): " in out and "record #2" not in out
    assert (
        "<|im_start|>user\none?<|im_end|>\n<|im_start|>assistant\nOne.<|im_end|>\n<|im_start|>user\ntwo?"
        "<|im_end|>\n<|im_start|>assistant\n[[Two.<|im_end|>]]\n"
    ) in out
    assert (
        '<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>]]'
        "\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    ) in out


def test_bad_flags_are_reported_together(tiny_chat_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(
            argv(
                "{missing} --model_name_or_path {model} --world_size 0 --bogus 1",
                missing=tmp_path / "missing.json",
                model=tiny_chat_model,
            )
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.json: no such file" in err and "--world_size must be at least 1" in err and "--bogus" in err


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_data_path_that_is_no_regular_file_is_named_for_what_it_is(tiny_chat_model, tmp_path, capsys, kind):
    import os

    path = tmp_path / "data.json"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    with pytest.raises(SystemExit) as info:
        main([str(path), "--model_name_or_path", str(tiny_chat_model)])
    assert info.value.code == 2
    what = "is a directory, not a data file" if kind == "directory" else "is a FIFO (named pipe), not a regular file"
    assert f"--data_path {path}: {what}" in capsys.readouterr().err


def test_a_chat_template_jinja_refuses_is_a_clear_error(tiny_chat_model, tmp_path, capsys):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}", encoding="utf-8")
    data = write_records(tmp_path / "data.json", GOOD)
    with pytest.raises(SystemExit) as info:
        main([str(data), "--model_name_or_path", str(tiny_chat_model), "--chat_template", str(template)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the chat template cannot render a one-turn conversation (SecurityError: access to attribute" in err


def test_a_huge_string_is_measured_only_to_a_multiple_of_the_limit(tiny_chat_model, tmp_path, capsys):
    data = write_records(
        tmp_path / "data.jsonl",
        [chat_record("word " * 400_000, "ok", id="huge"), chat_record("Hi", "Hello!", id="a")],
        jsonl=True,
    )
    main(
        argv(
            "{data} --model_name_or_path {model} --model_max_length 256 --output_dir {tmp_path}",
            data=data,
            model=tiny_chat_model,
            tmp_path=tmp_path,
        )
    )
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "data.jsonl.check.json").read_text())
    assert report["measured_to"] == 1024 and report["longer_than_measured"] == 1
    assert report["longest"] == 1024 and report["dropped"] == 1  # its prompt alone is over the limit
    assert "1 samples longer than 1024 tokens, 4 x --model_max_length, counted at 1024" in out


def test_report_goes_to_the_current_directory_by_default_and_says_where(tiny_chat_model, tmp_path, monkeypatch, capsys):
    """Data often sits in a read-only or shared folder: nothing is written beside it unless asked."""
    shared = tmp_path / "shared"
    shared.mkdir()
    data = write_records(shared / "train.json", [chat_record("Hi", "Hello!")])
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    assert main([str(data), "--model_name_or_path", str(tiny_chat_model)]) == 0
    assert sorted(p.name for p in shared.iterdir()) == ["train.json"]
    assert sorted(p.name for p in workdir.iterdir()) == ["train.json.check.json", "train.json.check.png"]
    assert json.loads((workdir / "train.json.check.json").read_text())["records"] == 1
    out = capsys.readouterr().out
    assert f"report: {workdir / 'train.json.check.json'}; length histogram: {workdir / 'train.json.check.png'}" in out


def test_report_goes_into_output_dir(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", [chat_record("Hi", "Hello!")], jsonl=True)
    out_dir = tmp_path / "checks" / "new"  # created when missing
    assert main([str(data), "--model_name_or_path", str(tiny_chat_model), "--output_dir", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["train.jsonl.check.json", "train.jsonl.check.png"]
    assert f"report: {out_dir / 'train.jsonl.check.json'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("data_name", "flags", "input_flag"),
    [
        ("D.json", ["--report", "D.json"], "--data_path"),
        ("D.json", ["--report", "./sub/../D.json"], "--data_path"),  # the same file by another path
        ("D.png", ["--report", "D.json"], "--data_path"),  # the histogram beside the report, D.png, is the data
        ("D.json", ["--output_dir", "MODEL/reports"], "--model_name_or_path"),
    ],
    ids=["data", "data-by-another-path", "histogram-is-the-data", "inside-the-model"],
)
def test_report_never_replaces_or_lands_inside_an_input(
    tiny_chat_model, tmp_path, capsys, monkeypatch, data_name, flags, input_flag
):
    """issue 16.4: `check D.json --report D.json` overwrote the data. Refused before anything is read or written."""
    data = write_records(tmp_path / data_name, [chat_record("Hi", "Hello!")])
    before = data.read_bytes()
    (tmp_path / "sub").mkdir()
    model_files = sorted(p.name for p in tiny_chat_model.iterdir())
    monkeypatch.chdir(tmp_path)
    flags = [flag.replace("MODEL", str(tiny_chat_model)) for flag in flags]
    with pytest.raises(SystemExit) as info:
        main([data_name, "--model_name_or_path", str(tiny_chat_model), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "it would overwrite an input" in err and input_flag in err
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data_name, "sub"])
    assert sorted(p.name for p in tiny_chat_model.iterdir()) == model_files


def test_report_and_output_dir_together_are_refused(tiny_chat_model, tmp_path, capsys):
    data = write_records(tmp_path / "D.json", [chat_record("Hi", "Hello!")])
    with pytest.raises(SystemExit) as info:
        main([str(data), "--model_name_or_path", str(tiny_chat_model), "--report", "r.json", "--output_dir", "x"])
    assert info.value.code == 2
    assert "--report and --output_dir" in capsys.readouterr().err
