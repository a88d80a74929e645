"""Training data as the trainer sees it: the batch collator finetune.py configures, the eager dataset's cache, the lazy
dataset's equality with the eager one, and the over-long sample policies."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

import llmft.data.dataset as dataset_module
from llmft.data.dataset import (
    DataStats,
    LazyConversationDataset,
    RenderSettings,
    build_datasets,
    eager_dataset,
    lazy_dataset,
)
from llmft.data.render import IGNORE_INDEX
from llmft.errors import DataError
from tests.conftest import EXAMPLES, argv, chat_record, write_records

STORY = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
PLAIN = RenderSettings(default_system=None, max_length=512, overlong="truncate")


def rows(dataset) -> list[dict]:
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in dataset]


class _TrainerReached(Exception):
    pass


@pytest.fixture(scope="module")
def finetune_trainer_kwargs(tiny_chat_model, datasets_cache, tmp_path_factory):
    """What finetune.main hands the Trainer (collator, datasets, tokenizer) for the example data; nothing trains."""
    import llmft.train as finetune  # finetune.py's main(); the module that builds the Trainer

    captured = {}

    def trainer(*args, **kwargs):
        captured.update(kwargs, args=args)
        raise _TrainerReached

    out = tmp_path_factory.mktemp("collator") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "LlmftTrainer", trainer)
        with pytest.raises(_TrainerReached):
            finetune.main(
                argv(
                    "--model_name_or_path {model} --data_path {examples} --output_dir {out} --model_max_length 512",
                    "--report_to none",
                    model=tiny_chat_model,
                    examples=EXAMPLES,
                    out=out,
                )
            )
    return captured


# --- the collator ----------------------------------------------------------------------------------------------


def lengths_of(dataset):
    return [len(r["input_ids"]) for r in dataset]


@pytest.mark.parametrize("pick", ["shortest-two", "odd-lengths", "longest-and-shortest", "one-sample"])
def test_collator_pads_to_longest_in_batch_rounded_up_to_8(finetune_trainer_kwargs, pick):
    collator = finetune_trainer_kwargs["data_collator"]
    tokenizer = finetune_trainer_kwargs["processing_class"]
    train = finetune_trainer_kwargs["train_dataset"]
    lengths = lengths_of(train)
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    odd = [i for i in by_length if lengths[i] % 8][:3]
    indices = {
        "shortest-two": by_length[:2],
        "odd-lengths": odd,
        "longest-and-shortest": [by_length[-1], by_length[0]],
        "one-sample": odd[-1:],
    }[pick]
    samples = [{"input_ids": list(train[i]["input_ids"]), "labels": list(train[i]["labels"])} for i in indices]
    longest = max(len(s["input_ids"]) for s in samples)
    assert any(len(s["input_ids"]) % 8 for s in samples)  # else rounding up would not be tested

    batch = collator(samples)

    width = math.ceil(longest / 8) * 8
    assert tokenizer.model_max_length == 512 and width < 512
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(samples), width)
    assert batch["labels"].dtype == torch.long
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == sample["input_ids"]  # right padding, content untouched
        assert batch["labels"][row, :n].tolist() == sample["labels"]
        assert batch["attention_mask"][row, :n].tolist() == [1] * n
        assert batch["input_ids"][row, n:].tolist() == [tokenizer.pad_token_id] * (width - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row, n:].tolist() == [0] * (width - n)


PAD = 1024  # the tiny chat model's <|endoftext|>, its pad token
X = IGNORE_INDEX


@pytest.mark.parametrize(
    "samples, expected",
    [
        pytest.param(
            [
                {"input_ids": [11, 12, 13], "labels": [X, 12, 13]},
                {"input_ids": [21, 22, 23, 24, 25], "labels": [X, X, 23, 24, 25]},
            ],
            {
                "input_ids": [[11, 12, 13, PAD, PAD, PAD, PAD, PAD], [21, 22, 23, 24, 25, PAD, PAD, PAD]],
                "labels": [[X, 12, 13, X, X, X, X, X], [X, X, 23, 24, 25, X, X, X]],
                "attention_mask": [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]],
            },
            id="3-and-5-to-8",
        ),
        pytest.param(
            [{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [X, X, X, X, 5, 6, 7, 8]}],
            {
                "input_ids": [[1, 2, 3, 4, 5, 6, 7, 8]],
                "labels": [[X, X, X, X, 5, 6, 7, 8]],
                "attention_mask": [[1, 1, 1, 1, 1, 1, 1, 1]],
            },
            id="8-stays-8",
        ),
        pytest.param(
            [
                {"input_ids": [31, 32], "labels": [X, 32]},
                {"input_ids": [41, 42, 43, 44, 45, 46, 47, 48, 49], "labels": [X, X, X, 44, 45, 46, 47, 48, 49]},
            ],
            {
                "input_ids": [[31, 32] + [PAD] * 14, [41, 42, 43, 44, 45, 46, 47, 48, 49] + [PAD] * 7],
                "labels": [[X, 32] + [X] * 14, [X, X, X, 44, 45, 46, 47, 48, 49] + [X] * 7],
                "attention_mask": [[1, 1] + [0] * 14, [1] * 9 + [0] * 7],
            },
            id="2-and-9-to-16",
        ),
    ],
)
def test_padding_collator_on_literal_batches(finetune_trainer_kwargs, samples, expected):
    """The collator finetune.py gives the Trainer (evaluation and unpacked training use it): right padding to the
    longest sample rounded up to a multiple of 8, pad token in the ids, -100 in the labels, 0 in the mask."""
    collator = finetune_trainer_kwargs["data_collator"]
    assert collator.tokenizer.pad_token_id == PAD

    batch = collator([{k: list(v) for k, v in s.items()} for s in samples])

    assert set(batch) == set(expected)
    for key, rows in expected.items():
        assert batch[key].dtype == torch.long, key
        assert batch[key].tolist() == rows, key


def test_finetune_hands_the_trainer_the_eager_example_dataset(finetune_trainer_kwargs):
    """What finetune.main gives the Trainer (stubbed: nothing trains here; tests/test_finetune_modes.py trains)."""
    train = finetune_trainer_kwargs["train_dataset"]
    assert finetune_trainer_kwargs["eval_dataset"] is None
    assert set(train.column_names) == {"input_ids", "labels"}
    assert len(train) == len(json.loads(EXAMPLES.read_text()))


# --- the eager cache ---------------------------------------------------------------------------------------------

RECORDS = [
    chat_record("Hi", "Hello!", id="a"),
    chat_record("What is 2 + 3?", "5.", id="b"),
    chat_record("Hi", "Hello!", "Tell me a story.", STORY, id="c"),
    {"id": "d", "text": "Water boils."},
]


class RenderSpy:
    """Counts render_samples calls (one per conversation) and passes them on."""

    def __init__(self, render):
        self.render, self.calls = render, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.render(*args, **kwargs)


@pytest.fixture
def render_spy(monkeypatch):
    spy = RenderSpy(dataset_module.render_samples)
    monkeypatch.setattr(dataset_module, "render_samples", spy)
    return spy


def refuse(*args, **kwargs):
    raise AssertionError("the second build of the same file and settings must come from the cache")


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_second_eager_build_renders_nothing_and_returns_identical_rows(
    bpe_tokenizer, datasets_cache, tmp_path, monkeypatch, overlong
):
    path = str(write_records(tmp_path / "train.jsonl", RECORDS, jsonl=True))
    settings = RenderSettings(None, 48, overlong)
    first, first_stats = eager_dataset(path, bpe_tokenizer, settings)

    monkeypatch.setattr(dataset_module, "render_samples", refuse)
    monkeypatch.setattr(dataset_module, "iter_conversations", refuse)  # nor is the file read again
    second, second_stats = eager_dataset(path, bpe_tokenizer, settings)

    assert rows(second) == rows(first)
    assert second_stats == first_stats
    assert first_stats.truncated + first_stats.dropped == 1  # the long sample "c" took its policy's path


def test_changed_content_rerenders(bpe_tokenizer, datasets_cache, tmp_path, render_spy):
    path = tmp_path / "train.json"
    write_records(path, RECORDS)
    first, _ = eager_dataset(str(path), bpe_tokenizer, PLAIN)
    assert render_spy.calls == len(RECORDS)

    write_records(path, RECORDS + [chat_record("Bye", "Goodbye.", id="e")])
    second, stats = eager_dataset(str(path), bpe_tokenizer, PLAIN)
    assert render_spy.calls == 2 * len(RECORDS) + 1
    assert stats.samples == len(second) == len(first) + 1
    assert rows(second)[:-1] == rows(first)


def test_same_size_edit_with_new_mtime_rerenders(bpe_tokenizer, datasets_cache, tmp_path, render_spy):
    path = tmp_path / "train.jsonl"
    write_records(path, RECORDS, jsonl=True)
    first, _ = eager_dataset(str(path), bpe_tokenizer, PLAIN)
    before = os.stat(path)

    path.write_text(path.read_text().replace("Hello!", "Howdy!"))  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    assert os.stat(path).st_size == before.st_size
    second, _ = eager_dataset(str(path), bpe_tokenizer, PLAIN)

    assert render_spy.calls == 2 * len(RECORDS)
    assert rows(second) != rows(first)
    assert bpe_tokenizer.decode(second[0]["input_ids"]).count("Howdy!") == 1


def test_touched_file_rerenders_to_the_same_rows(bpe_tokenizer, datasets_cache, tmp_path, render_spy):
    path = tmp_path / "train.jsonl"
    write_records(path, RECORDS, jsonl=True)
    first, _ = eager_dataset(str(path), bpe_tokenizer, PLAIN)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second, _ = eager_dataset(str(path), bpe_tokenizer, PLAIN)
    assert render_spy.calls == 2 * len(RECORDS)
    assert rows(second) == rows(first)


@pytest.mark.parametrize(
    "changed",
    [
        RenderSettings("You are Pico.", 512, "truncate"),
        RenderSettings(None, 48, "truncate"),
        RenderSettings(None, 48, "drop"),
    ],
    ids=["system-prompt", "max-length", "overlong-policy"],
)
def test_changed_settings_rerender(bpe_tokenizer, datasets_cache, tmp_path, render_spy, changed):
    path = str(write_records(tmp_path / "train.jsonl", RECORDS, jsonl=True))
    base = RenderSettings(None, 48, "truncate") if changed.overlong == "drop" else PLAIN
    first, _ = eager_dataset(path, bpe_tokenizer, base)
    second, _ = eager_dataset(path, bpe_tokenizer, changed)
    assert render_spy.calls == 2 * len(RECORDS)
    assert rows(second) != rows(first)
    # and each rendering stays cached under its own settings
    calls = render_spy.calls
    assert rows(eager_dataset(path, bpe_tokenizer, base)[0]) == rows(first)
    assert render_spy.calls == calls


# --- lazy == eager -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    records = json.loads(EXAMPLES.read_text(encoding="utf-8"))
    return {"json": str(EXAMPLES), "jsonl": str(write_records(folder / "conversations.jsonl", records, jsonl=True))}


@pytest.mark.parametrize(
    "settings",
    [PLAIN, RenderSettings("You are Pico, a small assistant.", 88, "truncate")],
    ids=["plain", "system-prompt-and-truncation"],
)
def test_lazy_equals_eager_on_every_example(bpe_tokenizer, datasets_cache, example_files, settings):
    built = {}
    for kind, path in example_files.items():
        eager, stats = eager_dataset(path, bpe_tokenizer, settings)
        lazy, lazy_stats = lazy_dataset(path, bpe_tokenizer, settings)
        assert isinstance(lazy, LazyConversationDataset)
        assert len(lazy) == len(eager) == lazy_stats.samples == stats.samples == 26
        assert [lazy[i] for i in range(len(lazy))] == rows(eager), kind
        built[kind] = rows(eager)
        if settings.max_length == 88:
            assert stats.truncated > 0 and stats.dropped == 0  # truncation is exercised, nothing left out
    assert built["json"] == built["jsonl"]


def test_lazy_spool_is_reused(bpe_tokenizer, datasets_cache, tmp_path, monkeypatch):
    path = str(write_records(tmp_path / "train.jsonl", RECORDS, jsonl=True))
    first = LazyConversationDataset(path, bpe_tokenizer, PLAIN)
    monkeypatch.setattr(dataset_module, "iter_conversations", refuse)
    second = LazyConversationDataset(path, bpe_tokenizer, PLAIN)
    assert second.spool == first.spool and str(datasets_cache) in second.spool
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]


def test_lazy_keeps_a_sample_whose_prompt_alone_is_too_long_without_loss(bpe_tokenizer, datasets_cache, tmp_path):
    path = str(write_records(tmp_path / "train.jsonl", [chat_record(STORY, "Yes.")], jsonl=True))
    settings = RenderSettings(None, 48, "truncate")
    sample = LazyConversationDataset(path, bpe_tokenizer, settings)[0]
    assert len(sample["input_ids"]) == len(sample["labels"]) == 48
    assert set(sample["labels"]) == {IGNORE_INDEX}
    eager, stats = eager_dataset(path, bpe_tokenizer, settings)
    assert (len(eager), stats.dropped) == (0, 1)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_file_with_a_byte_order_mark_gives_the_same_rows(bpe_tokenizer, datasets_cache, tmp_path, suffix):
    plain = write_records(tmp_path / f"plain{suffix}", RECORDS, jsonl=suffix == ".jsonl")
    with_bom = tmp_path / f"bom{suffix}"
    with_bom.write_bytes("\ufeff".encode("utf-8") + plain.read_bytes())
    expected = rows(eager_dataset(str(plain), bpe_tokenizer, PLAIN)[0])
    assert len(expected) == len(RECORDS)
    assert rows(eager_dataset(str(with_bom), bpe_tokenizer, PLAIN)[0]) == expected
    lazy = LazyConversationDataset(str(with_bom), bpe_tokenizer, PLAIN)
    assert [lazy[i] for i in range(len(lazy))] == expected


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_not_utf8_data_is_a_data_error_naming_the_line(bpe_tokenizer, datasets_cache, tmp_path, lazy):
    path = write_records(tmp_path / "train.jsonl", RECORDS, jsonl=True)
    raw = path.read_bytes().replace(b"Water boils.", "Wasser kocht bei 100 °C.".encode("latin-1"))
    path.write_bytes(raw)
    byte = raw.splitlines()[3].index("°".encode("latin-1"))  # 0xB0: a continuation byte, so no UTF-8 start
    build = lazy_dataset if lazy else eager_dataset
    with pytest.raises(DataError) as info:
        build(str(path), bpe_tokenizer, PLAIN)
    assert str(info.value) == f"{path}: line 4: not UTF-8 text (invalid start byte at byte {byte})"


# --- over-long samples -------------------------------------------------------------------------------------------

OVERLONG_RECORDS = [
    chat_record("Hi", "Hello!", id="short"),
    chat_record("What is 2 + 3?", "5.", id="short-2"),
    chat_record("Hi", "Hello!", "Tell me a story.", STORY, id="second-turn-too-long"),  # keeps turn 1 when truncated
    chat_record("Tell me a story.", STORY, id="answer-too-long"),  # cut inside the answer when truncated
    chat_record(STORY, "Yes.", id="prompt-too-long"),  # nothing to train on within 48 tokens: dropped either way
]


@pytest.mark.parametrize("overlong, samples, truncated, dropped", [("drop", 2, 0, 3), ("truncate", 4, 2, 1)])
def test_overlong_counts(bpe_tokenizer, datasets_cache, tmp_path, overlong, samples, truncated, dropped):
    path = str(write_records(tmp_path / "train.jsonl", OVERLONG_RECORDS, jsonl=True))
    dataset, stats = eager_dataset(path, bpe_tokenizer, RenderSettings(None, 48, overlong))

    assert (stats.samples, stats.truncated, stats.dropped) == (samples, truncated, dropped)
    assert len(dataset) == samples
    assert all(len(ids) <= 48 for ids in dataset["input_ids"])
    assert stats.tokens == sum(len(ids) for ids in dataset["input_ids"])
    assert stats.trained_tokens == sum(sum(t != IGNORE_INDEX for t in labels) for labels in dataset["labels"])
    assert f"{samples} samples" in stats.summary("train") and f"{dropped} dropped" in stats.summary("train")
    if overlong == "truncate":
        # the multi-turn sample keeps its first whole turn: it ends on the trained <|im_end|>
        kept_turn = dataset[2]["labels"]
        assert kept_turn[-1] == bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert len(dataset[3]["input_ids"]) == 48


def test_no_overlong_sample_counts_nothing(bpe_tokenizer, datasets_cache, tmp_path):
    path = str(write_records(tmp_path / "train.json", OVERLONG_RECORDS[:2]))
    _, stats = eager_dataset(path, bpe_tokenizer, RenderSettings(None, 48, "drop"))
    # the whole ChatML text of each sample, as the chat template renders it
    rendered = [
        bpe_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=True, return_dict=True
        )["input_ids"]
        for q, a in [("Hi", "Hello!"), ("What is 2 + 3?", "5.")]
    ]
    assert [len(ids) for ids in rendered] == [16, 22]
    # trained: "Hello" "!" <|im_end|> and "5" "." <|im_end|>
    assert stats == DataStats(samples=2, truncated=0, dropped=0, tokens=16 + 22, trained_tokens=3 + 3)


# --- build_datasets ----------------------------------------------------------------------------------------------


def data_args(**overrides):
    values = dict(
        data_path=None,
        eval_data_path=None,
        lazy_preprocess=False,
        model_max_length=48,
        overlong_samples="truncate",
        system_prompt=None,
        preprocessing_num_workers=None,
        train_turns="all",
    )
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def training_args(tmp_path_factory):
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("ta") / "out"), report_to="none")


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_build_datasets_train_and_eval(bpe_tokenizer, datasets_cache, tmp_path, training_args, lazy):
    train = str(write_records(tmp_path / "train.jsonl", OVERLONG_RECORDS[:4], jsonl=True))
    evaluation = str(write_records(tmp_path / "eval.json", OVERLONG_RECORDS[:2]))
    train_set, eval_set = build_datasets(
        data_args(data_path=train, eval_data_path=evaluation, lazy_preprocess=lazy), bpe_tokenizer, training_args
    )
    assert (len(train_set), len(eval_set)) == (4, 2)
    assert isinstance(train_set, LazyConversationDataset) == lazy
    assert max(len(train_set[i]["input_ids"]) for i in range(4)) == 48

    only_train = build_datasets(data_args(data_path=train, lazy_preprocess=lazy), bpe_tokenizer, training_args)
    assert only_train[1] is None


def test_build_datasets_with_nothing_left_is_a_data_error(bpe_tokenizer, datasets_cache, tmp_path, training_args):
    path = str(write_records(tmp_path / "train.json", OVERLONG_RECORDS[2:]))
    with pytest.raises(DataError, match=r"train.json: no sample left to train on \(3 dropped as over-long\)"):
        build_datasets(data_args(data_path=path, overlong_samples="drop"), bpe_tokenizer, training_args)


# --- a record is parsed and validated once --------------------------------------------------------------------------


def test_conversations_kept_between_reading_and_rendering_come_back_equal():
    from tests.test_formats import FORMATS

    for name, (_, conversation) in FORMATS.items():
        kept = json.loads(
            json.dumps(dataset_module.conversation_fields(conversation))
        )  # as Arrow and the spool keep it
        assert dataset_module.conversation_from_fields(kept) == conversation, name


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_each_record_is_parsed_once(bpe_tokenizer, datasets_cache, tmp_path, monkeypatch, lazy):
    import llmft.data.records as records

    parse_record, parsed = records.parse_record, []

    def counted(*args, **kwargs):
        parsed.append(1)
        return parse_record(*args, **kwargs)

    for module in (records, dataset_module):  # wherever the name is looked up
        monkeypatch.setattr(module, "parse_record", counted, raising=False)
    path = str(write_records(tmp_path / "train.jsonl", RECORDS, jsonl=True))
    dataset, _ = (lazy_dataset if lazy else eager_dataset)(path, bpe_tokenizer, PLAIN)
    assert [dataset[i]["input_ids"] for i in range(len(dataset))]
    assert len(parsed) == len(RECORDS)
