"""Bad data files through the dataset builders, finetune.py and a 2-rank launcher: each is one DataError naming the
file (and the record, where one is at fault), exit status 2, never a traceback from datasets, the tokenizer or the
lazy spool. Record-by-record checks live in tests/test_formats.py; this file is about the paths around them."""

import builtins
import json
import logging
import os

import pytest

from llmft.config import parse_args
from llmft.data.dataset import DataStats, RenderSettings, eager_dataset, lazy_dataset
from llmft.errors import DataError
from tests.conftest import TINY_RUN, argv, chat_record, launcher_env, run_launcher, write_records

SETTINGS = RenderSettings(None, 128, "truncate")
GOOD = [chat_record("Who are you?", "I am Pico.", id="good-0"), chat_record("What is 2 + 3?", "5.", id="good-1")]
BUILDERS = {"eager": eager_dataset, "lazy": lazy_dataset}


def lines(path, *records):
    """JSONL as json.dumps writes it by default: non-ASCII, lone surrogates included, as \\u escapes."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# name -> (writes the file at the path it is given, the message's fragment after "<path>: ")
BAD_FILES = {
    "empty-json-list": (
        lambda p: p.write_text("[]\n", encoding="utf-8"),
        "the file holds an empty JSON list: no records to train on",
    ),
    "lone-surrogate": (
        lambda p: lines(p, *GOOD, chat_record("Hi \ud800", "Hello!", id="bad")),
        "record #2 (line 3) (id 'bad'): conversations[0].value holds a lone surrogate '\\ud800'",
    ),
    "pretty-printed-jsonl": (
        lambda p: p.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1], indent=2), encoding="utf-8"),
        "line 2 (record #1): a JSON record spread over lines 2-",
    ),
    "all-answers-empty": (
        lambda p: lines(p, chat_record("Who are you?", "", id="e-0"), chat_record("Hi", "", id="e-1")),
        "record #0 (line 1) (id 'e-0'): turn 1: the assistant turn is empty (or whitespace only): "
        "it would train the model to reply with nothing",
    ),
}


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("mode", BUILDERS)
def test_bad_file_is_a_data_error_in_both_modes(bpe_tokenizer, datasets_cache, tmp_path, mode, name):
    write, fragment = BAD_FILES[name]
    path = tmp_path / "train.jsonl"
    write(path)
    with pytest.raises(DataError) as info:
        BUILDERS[mode](str(path), bpe_tokenizer, SETTINGS)
    assert str(info.value).startswith(f"{path}: {fragment}")


def test_lazy_pass_stopped_by_a_bad_record_leaves_no_spool(bpe_tokenizer, datasets_cache, tmp_path):
    path = lines(tmp_path / "train.jsonl", *GOOD, chat_record("Hi \ud800", "Hello!"))
    with pytest.raises(DataError):
        lazy_dataset(str(path), bpe_tokenizer, SETTINGS)
    spool_dir = os.path.join(str(datasets_cache), "llmft-lazy")  # shared by the session's tests: look for leftovers
    assert not [name for name in os.listdir(spool_dir) if name.endswith(".partial")]


@pytest.fixture
def unreadable(monkeypatch):
    """Make open() of the given path fail as it does for a user without read permission (tests run as root, whom
    file modes do not stop)."""
    real_open = builtins.open

    def refuse(path):
        def refusing_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        return path

    return refuse


@pytest.mark.parametrize("mode", BUILDERS)
def test_unreadable_file_is_a_data_error(bpe_tokenizer, datasets_cache, tmp_path, unreadable, mode):
    path = unreadable(str(write_records(tmp_path / "train.json", GOOD)))
    with pytest.raises(DataError) as info:  # eager: it was a PermissionError under datasets' DatasetGenerationError
        BUILDERS[mode](path, bpe_tokenizer, SETTINGS)
    assert str(info.value) == f"{path}: cannot be read: Permission denied"


def test_broken_symlink_is_no_such_file(bpe_tokenizer, datasets_cache, tmp_path):
    target = write_records(tmp_path / "gone.json", GOOD)
    link = tmp_path / "train.json"
    link.symlink_to(target)
    target.unlink()
    with pytest.raises(DataError) as info:  # it was a FileNotFoundError from os.stat, before any record was read
        eager_dataset(str(link), bpe_tokenizer, SETTINGS)
    assert str(info.value) == f"{link}: no such file"


def test_lazy_summary_says_token_counts_come_later(bpe_tokenizer, datasets_cache, tmp_path):
    path = write_records(tmp_path / "train.json", GOOD)
    _, stats = lazy_dataset(str(path), bpe_tokenizer, SETTINGS)
    assert stats == DataStats(samples=2, tokens_known=False)
    # It said "2 samples, 0 tokens (0.0% trained), 0 truncated", as if nothing would be trained.
    assert stats.summary("train data") == (
        "train data: 2 samples; their token counts (and which are truncated) are "
        "known only as the samples are used (--lazy_preprocess)"
    )


def test_eager_summary_keeps_its_counts():
    stats = DataStats(samples=2, tokens=40, trained_tokens=10, truncated=1)
    assert stats.summary("train data") == (
        "train data: 2 samples, 40 tokens (25.0% trained), 1 truncated, 0 dropped as over-long"
    )


# --- finetune.py, in this process ----------------------------------------------------------------------------------


@pytest.fixture
def fails(run_finetune, capsys):
    """finetune.main exits 2 with one `error:` message and no traceback; returns that message."""

    def run(*flags) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            run_finetune(*flags)
        stderr = capsys.readouterr().err
        assert info.value.code == 2, stderr
        assert "Traceback" not in stderr, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr
        return errors[0]

    return run


@pytest.mark.parametrize(
    "name, lazy", [("empty-json-list", "False"), ("lone-surrogate", "True"), ("all-answers-empty", "False")]
)
def test_finetune_names_the_bad_file(fails, tiny_chat_model, tmp_path, name, lazy):
    write, fragment = BAD_FILES[name]
    path = tmp_path / "train.jsonl"
    write(path)
    error = fails(
        *argv(
            "--model_name_or_path {model} --data_path {path} --lazy_preprocess {lazy} --output_dir {out}",
            model=tiny_chat_model,
            path=path,
            lazy=lazy,
            out=tmp_path / "out",
        ),
    )
    assert error.startswith(f"error: {path}: {fragment}")


def test_finetune_on_an_unreadable_file(fails, tiny_chat_model, tmp_path, unreadable):
    path = unreadable(str(write_records(tmp_path / "train.json", GOOD)))
    error = fails("--model_name_or_path", tiny_chat_model, "--data_path", path, "--output_dir", tmp_path / "out")
    assert error == f"error: {path}: cannot be read: Permission denied"


def test_directory_as_data_path_is_named_a_directory(tiny_chat_model, tmp_path):
    from llmft.errors import ConfigError

    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        parse_args(
            argv(
                "--model_name_or_path {model} --data_path {folder} --eval_data_path {folder} --output_dir {out}",
                model=tiny_chat_model,
                folder=folder,
                out=tmp_path / "out",
            )
        )
    assert info.value.problems == [
        f"--{flag} {folder}: is a directory, not a data file (give the path of a .json or .jsonl file)"
        for flag in ("data_path", "eval_data_path")
    ]


# --- --model_max_length against the model's context ----------------------------------------------------------------


@pytest.mark.parametrize(
    "config, max_length, warned",
    [
        ({"max_position_embeddings": 64}, 128, True),
        ({"max_position_embeddings": 64}, 64, False),
        (
            {
                "max_position_embeddings": 64,
                "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            },
            256,
            False,
        ),
        ({"max_position_embeddings": 64, "rope_scaling": {"type": "yarn", "factor": 2.0}}, 256, True),
        ({}, 100000, False),  # no context in the config: nothing to compare with
    ],
    ids=["above", "equal", "rope-scaled", "above-rope-scaled", "unknown"],
)
def test_model_max_length_above_the_context_is_warned_up_front(tmp_path, caplog, config, max_length, warned):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", **config}), encoding="utf-8")
    data = write_records(tmp_path / "train.json", GOOD)
    with caplog.at_level(logging.WARNING, logger="llmft.checks"):
        parse_args(
            argv(
                "--model_name_or_path {model} --data_path {data} --output_dir {out} --model_max_length {max_length}",
                model=model,
                data=data,
                out=tmp_path / "out",
                max_length=max_length,
            )
        )
    messages = [r.getMessage() for r in caplog.records if r.name == "llmft.checks"]
    if warned:
        limit = 128 if "rope_scaling" in config else 64  # factor 2 over max_position_embeddings
        assert messages == [
            f"--model_max_length {max_length} is above the model's context of {limit} tokens (max_position_embeddings "
            f"in its config.json): samples longer than {limit} tokens would train positions the model never learned; "
            f"lower --model_max_length to {limit}, or extend the context with rope_scaling in the model's config"
        ]
    else:
        assert not [m for m in messages if "--model_max_length" in m]


# --- the 2-rank launcher ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_launcher_names_the_bad_file_and_exits_2(tiny_chat_model, tmp_path):
    """Both ranks meet the same DataError (rank 0 first, then rank 1 once main_process_first lets it go), so the
    launcher stops quietly with status 2; before, datasets' DatasetGenerationError made it a torchrun traceback."""
    path = tmp_path / "train.json"
    BAD_FILES["empty-json-list"][0](path)
    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets-cache")
    result = run_launcher(
        "finetune_lora_ds.sh",
        *argv("-m {model} -d {path} -o {out} --", TINY_RUN, model=tiny_chat_model, path=path, out=tmp_path / "out"),
        env=env,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-8000:]
    assert f"error: {path}: the file holds an empty JSON list: no records to train on" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-8000:]
