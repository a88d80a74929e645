"""finetune.py on mistakes a user can fix: one `error:` message on stderr that lists every problem, exit status 2, no
traceback, and nothing written to the output directory.

A few cases run the real script in a subprocess (each costs the imports of torch and transformers); the others call
`finetune.main` in this process, which goes through the same `exit_on_user_error` wrapper.
"""

import json
import os
import re
from pathlib import Path

import pytest

from llmft.args import ARGUMENT_CLASSES
from llmft.config import parse_args
from llmft.errors import ConfigError
from tests.conftest import REPO, argv, chat_record, run_script, write_records

GOOD = [chat_record("Who are you?", "I am Pico.", id="good-0"), chat_record("What is 2 + 3?", "5.", id="good-1")]


def error_block(stderr: str) -> str:
    """The one `error: ...` message, from its first line to the end of stderr (it is the last thing printed)."""
    assert "Traceback" not in stderr, stderr
    starts = [m.start() for m in re.finditer(r"^error: ", stderr, flags=re.MULTILINE)]
    assert len(starts) == 1, stderr
    return stderr[starts[0] :].rstrip("\n")


def tree(path) -> dict | None:
    """Every file and folder under `path` with the files' bytes, or None when `path` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.fixture
def fails(run_finetune, capsys):
    """Run finetune.main in this process; assert exit 2 with one error message and an untouched --output_dir."""

    def run(*flags) -> str:
        flags = [str(f) for f in flags]
        out = flags[flags.index("--output_dir") + 1] if "--output_dir" in flags else None
        before = tree(out) if out else None
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            run_finetune(*flags)
        stderr = capsys.readouterr().err
        assert info.value.code == 2, stderr
        if out:
            assert tree(out) == before, f"--output_dir {out} changed by a failed run"
        return error_block(stderr)

    return run


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "train.jsonl", GOOD, jsonl=True)


@pytest.fixture
def model_dir(tmp_path):
    """What validate() takes for a local model: a directory holding a config.json (no weights; nothing is loaded in
    the tests that use it, which all stop at the settings)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    return path


def problems_of(argv) -> list[str]:
    """The problems parse_args reports for these flags; [] when it accepts them."""
    try:
        parse_args([str(a) for a in argv])
    except ConfigError as e:
        return e.problems
    return []


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty, private Hugging Face cache; `hub.offline(flag)` sets HF_HUB_OFFLINE as huggingface_hub reads it,
    `hub.cache(repo_id, config)` puts a model's config.json in the cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    class Hub:
        @staticmethod
        def offline(flag: bool):
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", flag)

        @staticmethod
        def cache(repo_id: str, config: dict):
            repo = cache / ("models--" + repo_id.replace("/", "--"))
            snapshot = repo / "snapshots" / "0123abcd"
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text(json.dumps(config), encoding="utf-8")
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text("0123abcd", encoding="utf-8")

    return Hub


# --- through the real script -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_script_malformed_record_is_named_without_traceback(tiny_chat_model, tmp_path):
    path = write_records(tmp_path / "train.jsonl", GOOD + [chat_record("Only a question?", id="lonely")], jsonl=True)
    out = tmp_path / "out"
    result = run_script(
        *argv(
            "--model_name_or_path {model} --data_path {path} --output_dir {out} --report_to none",
            model=tiny_chat_model,
            path=path,
            out=out,
        ),
        tmp_path=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert error_block(result.stderr) == (
        f"error: {path}: record #2 (line 3) (id 'lonely'): no assistant turn, so nothing to train on"
    )
    assert not out.exists()


@pytest.mark.slow
def test_script_unknown_flag(data, model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --learning_reat 1e-4",
            model=model_dir,
            data=data,
            out=out,
        ),
        tmp_path=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert error_block(result.stderr) == "error: invalid settings (1):\n  - unknown flag or key: --learning_reat"
    assert not out.exists()


@pytest.mark.slow
def test_script_yaml_config_with_unknown_key(data, model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ndata_path: {data}\noutput_dir: {tmp_path / 'out'}\n"
        "lora_rank: 8\nnum_train_epochs: 1\n",
        encoding="utf-8",
    )
    result = run_script(config, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert error_block(result.stderr) == "error: invalid settings (1):\n  - unknown flag or key: --lora_rank"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_script_wrong_model_and_data_paths_reported_together(tmp_path):
    out = tmp_path / "out"
    result = run_script(
        *argv(
            "--model_name_or_path {missing_model} --data_path {missing_data} --output_dir {out}",
            missing_model=tmp_path / "no-model",
            missing_data=tmp_path / "no.json",
            out=out,
        ),
        tmp_path=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert error_block(result.stderr) == (
        "error: invalid settings (2):\n"
        f"  - --model_name_or_path {tmp_path / 'no-model'}: no such directory\n"
        f"  - --data_path {tmp_path / 'no.json'}: no such file"
    )
    assert not out.exists()


@pytest.mark.slow
def test_script_contradictory_flags_reported_together(model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        *argv(
            "--model_name_or_path {model} --data_path {missing} --output_dir {out} --q_lora True",
            "--lazy_preprocess True --overlong_samples drop --model_max_length 8",
            model=model_dir,
            missing=tmp_path / "missing.jsonl",
            out=out,
        ),
        tmp_path=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    problems = error_block(result.stderr).splitlines()
    assert problems[0] == "error: invalid settings (4):"
    assert problems[1:] == [
        f"  - --data_path {tmp_path / 'missing.jsonl'}: no such file",
        "  - --model_max_length must be at least 16",
        "  - --lazy_preprocess tokenizes samples as they are used, so it cannot drop over-long ones: "
        "use --overlong_samples truncate, or eager preprocessing",
        "  - --q_lora True trains LoRA adapters on a quantized base: add --use_lora True",
    ]
    assert not out.exists()


# --- in process: data errors --------------------------------------------------------------------------------------


def test_malformed_json_list_names_line_and_column(fails, tiny_chat_model, tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"text": "fine"},\n {"text": "oops" "x"}\n]\n', encoding="utf-8")
    out = tmp_path / "out"
    block = fails("--model_name_or_path", tiny_chat_model, "--data_path", path, "--output_dir", out)
    assert block.startswith(f"error: {path}: malformed JSON at line 3, column ")
    assert not out.exists()


def test_bad_eval_record_is_named(fails, tiny_chat_model, data, tmp_path):
    eval_path = write_records(tmp_path / "eval.json", GOOD + [{"id": "e-9", "messages": []}])
    out = tmp_path / "out"
    block = fails(
        "--model_name_or_path", tiny_chat_model, "--data_path", data, "--eval_data_path", eval_path, "--output_dir", out
    )
    assert block == f"error: {eval_path}: record #2 (id 'e-9'): empty conversation"
    assert not out.exists()


def test_lazy_preprocess_also_names_the_bad_record(fails, tiny_chat_model, tmp_path):
    path = write_records(tmp_path / "train.jsonl", GOOD + [{"id": "r", "conversations": [{"from": "bot"}]}], jsonl=True)
    out = tmp_path / "out"
    block = fails(
        "--model_name_or_path", tiny_chat_model, "--data_path", path, "--lazy_preprocess", "True", "--output_dir", out
    )
    assert block.startswith(f"error: {path}: record #2 (line 3) (id 'r'): turn 0 needs 'from' and 'value'")
    assert not out.exists()


def test_every_sample_dropped_as_overlong(fails, tiny_chat_model, tmp_path):
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    path = write_records(tmp_path / "train.json", [chat_record("Tell me a story.", long_answer)])
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {path} --model_max_length 16 --overlong_samples drop",
            "--output_dir {out}",
            model=tiny_chat_model,
            path=path,
            out=tmp_path / "out",
        ),
    )
    assert block == f"error: {path}: no sample left to train on (1 dropped as over-long)"


# --- in process: settings -----------------------------------------------------------------------------------------


def test_unknown_flag_in_equals_form_and_stray_argument(fails, data, model_dir, tmp_path):
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_lroa=True stray",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        ),
    )
    assert block == (
        "error: invalid settings (2):\n  - unknown flag or key: --use_lroa\n  - unexpected argument: stray"
    )


def test_value_of_the_wrong_type_names_the_flag(fails, data, model_dir, tmp_path):
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --num_train_epochs three",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        ),
    )
    assert block.startswith("error: invalid settings (1):\n  - argument --num_train_epochs")
    assert "'three'" in block
    assert len(block.splitlines()) == 2  # one line, not argparse's usage text


def test_training_arguments_error_is_one_problem_among_the_others(fails, data, model_dir, tmp_path):
    # TrainingArguments.__post_init__ refuses bf16 with fp16 itself; the unknown flag before it and validate()'s
    # checks of the other settings are still all reported. (--use_cpu keeps transformers from first refusing bf16
    # on a machine without a bf16 GPU.)
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {missing} --output_dir {out} --learnin_rate 0.1",
            "--use_cpu True --q_lora True --bf16 True --fp16 True",
            model=model_dir,
            missing=tmp_path / "missing.jsonl",
            out=tmp_path / "out",
        ),
    )
    assert block == (
        "error: invalid settings (4):\n"
        "  - unknown flag or key: --learnin_rate\n"
        "  - At most one of fp16 and bf16 can be True, but not both\n"
        f"  - --data_path {tmp_path / 'missing.jsonl'}: no such file\n"
        "  - --q_lora True trains LoRA adapters on a quantized base: add --use_lora True"
    )


@pytest.mark.parametrize("strategy", [["steps", "--eval_steps", "5"], ["epoch"]], ids=["steps", "epoch"])
def test_eval_strategy_without_eval_data_names_the_value_as_typed(fails, data, model_dir, tmp_path, strategy):
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --eval_strategy",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        ),
        *strategy,
    )
    assert block == f"error: invalid settings (1):\n  - --eval_strategy {strategy[0]} needs --eval_data_path"


OFFLINE_MISS = "no such directory, and no Hub model of that name in the local cache (HF_HUB_OFFLINE is set)"


@pytest.mark.parametrize(
    "model, expected",
    [
        ("{tmp}/absent", "no such directory"),
        ("./absent-model", "no such directory"),
        ("../absent-model", "no such directory"),
        ("~/absent-model", "no such directory"),
        ("models/org/absent-model", "no such directory"),  # three parts: no Hub id
        ("absent-model", OFFLINE_MISS),
        ("build/tiny-modle", OFFLINE_MISS),  # a mistyped relative path reads as a Hub id: offline, it is not cached
    ],
    ids=["absolute", "dot-relative", "parent-relative", "home", "three-parts", "one-part-offline", "two-parts-offline"],
)
def test_missing_model_path(fails, data, tmp_path, monkeypatch, hub, model, expected):
    hub.offline(True)
    monkeypatch.chdir(tmp_path)
    model = model.format(tmp=tmp_path)
    block = fails("--model_name_or_path", model, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block == f"error: invalid settings (1):\n  - --model_name_or_path {model}: {expected}"


def test_model_path_that_is_a_file(fails, data, tmp_path):
    block = fails("--model_name_or_path", data, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block == f"error: invalid settings (1):\n  - --model_name_or_path {data}: not a directory"


def test_model_path_without_a_model(fails, data, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}", encoding="utf-8")  # anything but a config.json
    block = fails("--model_name_or_path", empty, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block == (
        f"error: invalid settings (1):\n  - --model_name_or_path {empty}: the directory holds no model (no config.json)"
    )


def test_real_model_directory_is_accepted(tiny_chat_model, data, tmp_path):
    model_args, *_ = parse_args(
        ["--model_name_or_path", str(tiny_chat_model), "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    )
    assert model_args.model_name_or_path == str(tiny_chat_model)


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2"])
def test_hub_id_is_accepted_online(data, tmp_path, hub, model):
    hub.offline(False)
    assert problems_of(["--model_name_or_path", model, "--data_path", data, "--output_dir", tmp_path / "out"]) == []


def test_hub_id_offline_is_accepted_only_from_the_local_cache(data, tmp_path, hub):
    hub.offline(True)
    hub.cache("pico/tiny-chat", {"model_type": "qwen2"})
    flags = ["--data_path", data, "--output_dir", tmp_path / "out"]
    assert problems_of(["--model_name_or_path", "pico/tiny-chat", *flags]) == []
    assert problems_of(["--model_name_or_path", "pico/tiny-chad", *flags]) == [
        f"--model_name_or_path pico/tiny-chad: {OFFLINE_MISS}"
    ]


def test_gptq_hub_model_from_the_cache_is_checked_like_a_local_one(data, tmp_path, hub):
    hub.offline(True)
    hub.cache("pico/tiny-gptq", {"model_type": "qwen2", "quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert problems_of(
        ["--model_name_or_path", "pico/tiny-gptq", "--data_path", data, "--output_dir", tmp_path / "out"]
    ) == ["the base model is GPTQ-quantized: its weights cannot be fine-tuned in full; add --use_lora True"]


def test_missing_model_path_that_is_no_hub_id_offline(data, tmp_path, hub):
    hub.offline(True)
    assert problems_of(["--model_name_or_path", "my model", "--data_path", data, "--output_dir", tmp_path / "out"]) == [
        "--model_name_or_path my model: no such directory, and not a valid Hub model id"
    ]


def test_model_directory_with_unreadable_config(data, tmp_path):
    model = tmp_path / "half-downloaded"
    model.mkdir()
    (model / "config.json").write_text("", encoding="utf-8")
    problems = problems_of(["--model_name_or_path", model, "--data_path", data, "--output_dir", tmp_path / "out"])
    assert len(problems) == 1 and problems[0].startswith(f"--model_name_or_path {model}: ")


def test_missing_data_and_eval_paths(fails, model_dir, tmp_path):
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {train} --eval_data_path {eval} --output_dir {out}",
            model=model_dir,
            train=tmp_path / "a.json",
            eval=tmp_path / "b.jsonl",
            out=tmp_path / "out",
        ),
    )
    assert block == (
        f"error: invalid settings (2):\n  - --data_path {tmp_path / 'a.json'}: no such file\n"
        f"  - --eval_data_path {tmp_path / 'b.jsonl'}: no such file"
    )


def test_non_empty_output_dir_is_refused_and_left_alone(fails, data, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier run")
    block = fails("--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out)
    assert block == (
        f"error: invalid settings (1):\n  - --output_dir {out} is not empty: pass "
        "--resume_from_checkpoint True to continue that run, --overwrite_output_dir True to train over "
        "it, or choose another directory"
    )
    known = {f for cls in ARGUMENT_CLASSES for f in cls.__dataclass_fields__}
    suggested = set(re.findall(r"--(\w+)", block))
    assert suggested <= known, f"the message suggests unknown flags {suggested - known}"


def test_overwrite_output_dir_accepts_a_non_empty_output_dir(data, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier run")
    *_, training_args = parse_args(
        argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --overwrite_output_dir True",
            model=model_dir,
            data=data,
            out=out,
        )
    )
    assert training_args.overwrite_output_dir is True


@pytest.mark.parametrize("existing", [False, True], ids=["no-output-dir", "output-dir-without-checkpoint"])
def test_resume_true_without_checkpoint(fails, data, model_dir, tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        (out / "logs").mkdir(parents=True)
        (out / "logs" / "events").write_bytes(b"\x00\x01")
    block = fails(
        "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out, "--resume_from_checkpoint", "True"
    )
    assert block == (
        f"error: invalid settings (1):\n  - --resume_from_checkpoint True: no complete checkpoint-* directory "
        f"in --output_dir {out}"
    )
    assert out.exists() == existing


def test_resume_from_missing_checkpoint_path(fails, data, model_dir, tmp_path):
    checkpoint = tmp_path / "out" / "checkpoint-5"
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --resume_from_checkpoint {checkpoint}",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
            checkpoint=checkpoint,
        ),
    )
    assert (
        block
        == f"error: invalid settings (1):\n  - --resume_from_checkpoint {checkpoint}: no such checkpoint directory"
    )


def test_resume_true_with_a_checkpoint_is_accepted(data, model_dir, tmp_path):
    out = tmp_path / "out"
    checkpoint = out / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')  # what makes a checkpoint complete
    import torch

    torch.save({}, checkpoint / "optimizer.bin")  # whole: an empty file is one whose save was cut short
    *_, training_args = parse_args(
        argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --resume_from_checkpoint True",
            model=model_dir,
            data=data,
            out=out,
        )
    )
    assert training_args.resume_from_checkpoint == "True"


def test_numbers_that_fail_late_are_reported_up_front_together(fails, data, model_dir, tmp_path):
    """Before, each of these got past the settings and failed after the model was loaded and the data tokenized
    (gradient accumulation 0 with a ZeroDivisionError), or trained with a negative learning rate."""
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --learning_rate -0.001",
            "--per_device_train_batch_size 0 --gradient_accumulation_steps 0 --seed -1",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        ),
    )
    assert block == (
        "error: invalid settings (4):\n"
        "  - --learning_rate -0.001: must be a finite number, 0 or more\n"
        "  - --per_device_train_batch_size 0: must be at least 1\n"
        "  - --gradient_accumulation_steps 0: must be at least 1\n"
        "  - --seed -1: must be in [0, 2**32 - 1]"
    )


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_learning_rate_that_is_not_a_number(data, model_dir, tmp_path, value):
    assert problems_of(
        argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --learning_rate {value}",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
            value=value,
        )
    ) == [f"--learning_rate {float(value)}: must be a finite number, 0 or more"]


def test_eval_batch_size_zero_with_eval_data(data, model_dir, tmp_path):
    assert problems_of(
        argv(
            "--model_name_or_path {model} --data_path {data} --eval_data_path {data} --output_dir {out}",
            "--per_device_eval_batch_size 0",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        )
    ) == ["--per_device_eval_batch_size 0: must be at least 1"]


def test_output_dir_that_is_a_file(fails, data, model_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    block = fails("--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out)
    assert block == f"error: invalid settings (1):\n  - --output_dir {out} is a file, not a directory"
    assert out.read_text() == "not a folder"


def test_output_dir_that_cannot_be_created(fails, data, model_dir, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder would be")
    out = blocker / "lora" / "out"
    block = fails("--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out)
    assert block == f"error: invalid settings (1):\n  - --output_dir {out} cannot be created: {blocker} is a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_output_dir_without_write_permission(fails, data, model_dir, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        block = fails("--model_name_or_path", model_dir, "--data_path", data, "--output_dir", parent / "out")
    finally:
        parent.chmod(0o755)
    assert block == (
        f"error: invalid settings (1):\n  - --output_dir {parent / 'out'} cannot be written: no write "
        f"permission on {parent}"
    )


def broken_weights_copy(model, dest, content: bytes | None = None):
    """A copy of `model` whose model.safetensors is cut short (or replaced by `content`)."""
    import shutil

    shutil.copytree(model, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(content if content is not None else weights.read_bytes()[:100_000])
    return weights


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "is truncated: tensor model.embed_tokens.weight ends at byte"),
        (b"<html>Bad gateway</html>" * 40, "is not a readable safetensors file (its header claims"),
        (
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
            "is not a readable safetensors file (its header is not JSON)",
        ),
    ],
    ids=["truncated", "garbage", "bad-header"],
)
def test_broken_weights_file_is_named_before_loading(fails, tiny_chat_model, data, tmp_path, content, reason):
    weights = broken_weights_copy(tiny_chat_model, tmp_path / "model", content)
    block = fails("--model_name_or_path", tmp_path / "model", "--data_path", data, "--output_dir", tmp_path / "out")
    assert block.startswith(
        f"error: invalid settings (1):\n  - --model_name_or_path {tmp_path / 'model'}: {weights} {reason}"
    ), block


# --- config files ------------------------------------------------------------------------------------------------


def test_yaml_config_with_unknown_key(fails, data, model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 8\nlearnin_rate: 0.1\nuse_lora: true\n", encoding="utf-8")
    block = fails(config, "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block == "error: invalid settings (1):\n  - unknown flag or key: --learnin_rate"


@pytest.mark.parametrize("values", [["0.1"], ["q_proj", "v_proj"], []], ids=["one-value", "list", "no-value"])
def test_unknown_key_is_one_problem_whatever_its_values(fails, data, model_dir, tmp_path, values):
    # the strings after an unknown key are its values, not stray arguments; the next key is still read
    config = tmp_path / "run.yaml"
    config.write_text(
        f"learnin_rate: {json.dumps(values) if values != ['0.1'] else '0.1'}\nlora_r: 0\nuse_lora: true\n",
        encoding="utf-8",
    )
    block = fails(config, "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block == (
        "error: invalid settings (2):\n  - unknown flag or key: --learnin_rate\n"
        "  - --lora_r and --lora_alpha must be positive"
    )


def test_unknown_key_with_a_negative_value_is_one_problem(data, model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_stpes: -1\n", encoding="utf-8")
    assert problems_of(
        [config, "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out"]
    ) == ["unknown flag or key: --max_stpes"]


@pytest.mark.parametrize("where", ["config", "flag"])
def test_truncated_key_is_unknown_not_an_abbreviation(data, model_dir, tmp_path, where):
    flags = ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out"]
    if where == "config":
        config = tmp_path / "run.yaml"
        config.write_text("learning_rat: 0.1\n", encoding="utf-8")
        flags = [config, *flags]
    else:
        flags += ["--learning_rat", "0.1"]
    assert problems_of(flags) == ["unknown flag or key: --learning_rat"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("lora_r: [8\n", "cannot parse: while parsing a flow sequence"),
        ("- lora_r\n- 8\n", "expected a mapping of flag names to values"),
    ],
    ids=["unparsable", "not-a-mapping"],
)
def test_bad_yaml_config(fails, data, model_dir, tmp_path, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content, encoding="utf-8")
    block = fails(config, "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out")
    assert block.startswith(f"error: invalid settings (1):\n  - config file {config}: {expected}")
    if "parse" in expected:
        assert "line 1, column" in block  # yaml's own message says where
    else:
        assert block == f"error: invalid settings (1):\n  - config file {config}: {expected}"


def test_missing_config_file(fails, data, model_dir, tmp_path):
    block = fails(tmp_path / "run.yaml", "--model_name_or_path", model_dir, "--data_path", data)
    assert block == f"error: invalid settings (1):\n  - config file {tmp_path / 'run.yaml'}: no such file"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_override_config_file(data, model_dir, tmp_path, suffix):
    values = {
        "model_name_or_path": str(model_dir),
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "use_lora": True,
        "lora_r": 16,
        "lora_target_modules": ["q_proj", "v_proj"],
        "learning_rate": 3e-3,
        "num_train_epochs": 40,
        "model_max_length": 512,
        "report_to": "none",
        "save_strategy": "no",
    }
    config = tmp_path / f"run{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(values), encoding="utf-8")
    else:
        import yaml

        config.write_text(yaml.safe_dump(values), encoding="utf-8")
    model, data_args, lora, quant, training = parse_args(
        argv(
            "{config} --learning_rate 1e-5 --lora_target_modules k_proj --use_lora False",
            "--model_max_length=64",
            config=config,
        )
    )
    # overridden on the command line
    assert training.learning_rate == 1e-5
    assert lora.lora_target_modules == ["k_proj"]
    assert lora.use_lora is False
    assert data_args.model_max_length == 64
    # from the file
    assert training.num_train_epochs == 40
    assert lora.lora_r == 16
    assert model.model_name_or_path == str(model_dir)
    assert training.output_dir == str(tmp_path / "out")
    assert str(training.save_strategy) in ("no", "SaveStrategy.NO")


def test_shipped_demo_config_with_overrides(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo config's data_path is relative to the repository
    model, data_args, lora, _, training = parse_args(
        argv(
            "examples/demo_lora.yaml --model_name_or_path {model} --output_dir {out} --num_train_epochs 2",
            "--lora_r 4",
            model=tiny_chat_model,
            out=tmp_path / "out",
        )
    )
    assert (training.num_train_epochs, lora.lora_r) == (2, 4)
    assert (lora.use_lora, lora.lora_alpha, data_args.model_max_length, training.learning_rate) == (True, 32, 512, 3e-3)
    assert training.warmup_steps == 0.05  # a fraction of all steps: warmup_ratio is gone from transformers 5
    assert data_args.data_path == "examples/conversations.json"


def test_liger_kernel_config_is_given_as_json(data, model_dir, tmp_path):
    """transformers declares liger_kernel_config a dict, which its flag parser cannot fill from a command line."""
    *_, training_args = parse_args(
        argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_liger_kernel True",
            """--liger_kernel_config '{"rms_norm": true, "swiglu": false}'""",
            model=model_dir,
            data=data,
            out=tmp_path / "out",
        )
    )
    assert training_args.liger_kernel_config == {"rms_norm": True, "swiglu": False}


@pytest.mark.parametrize("value, says", [("{rms_norm: true}", "not JSON"), ('["rms_norm"]', "a JSON object")])
def test_liger_kernel_config_that_is_not_a_json_object_is_named(data, model_dir, tmp_path, value, says):
    problems = problems_of(
        argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --liger_kernel_config {value}",
            model=model_dir,
            data=data,
            out=tmp_path / "o",
            value=value,
        )
    )
    assert len(problems) == 1 and problems[0].startswith(f"--liger_kernel_config {value}: ") and says in problems[0]


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("weight_decay", "nan", "--weight_decay nan: must be a finite number, 0 or more"),
        ("num_train_epochs", "nan", "--num_train_epochs nan: must be a finite number, 0 or more"),
        ("adam_epsilon", "nan", "--adam_epsilon nan: must be a finite number, 0 or more"),
        ("adam_epsilon", "0", "--adam_epsilon 0.0: must be above 0 (it keeps Adam's update from dividing by zero)"),
        ("adam_beta1", "-0.1", "--adam_beta1 -0.1: must be in [0, 1)"),
        ("adam_beta2", "nan", "--adam_beta2 nan: must be in [0, 1)"),
        ("adam_beta2", "1", "--adam_beta2 1.0: must be in [0, 1)"),
        ("max_grad_norm", "inf", "--max_grad_norm inf: must be a finite number, 0 or more"),
        ("warmup_steps", "nan", "--warmup_steps nan: must be a finite number, 0 or more"),
        ("label_smoothing_factor", "1", "--label_smoothing_factor 1.0: must be in [0, 1)"),
        ("logging_steps", "inf", "--logging_steps inf: must be a finite number, 0 or more"),
        ("save_steps", "nan", "--save_steps nan: must be a finite number, 0 or more"),
    ],
)
def test_training_numbers_that_are_not_finite_or_out_of_range(data, model_dir, tmp_path, flag, value, problem):
    """Before, --weight_decay nan trained an all-NaN adapter with exit 0, NaN epochs, epsilon or beta2 failed with a
    traceback once the model had loaded, and an infinite --logging_steps with an OverflowError in transformers."""
    flags = ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", tmp_path / "out"]
    assert problems_of([*flags, f"--{flag}", value]) == [problem]


BROKEN_TEMPLATES = {
    "sandbox": "{% for m in messages %}{{ m.content.__class__.__mro__[1].__subclasses__() }}{% endfor %}",
    "syntax": "{% for m in messages %}{{ m.content }{% endfor %}",
}


@pytest.mark.parametrize("kind", sorted(BROKEN_TEMPLATES))
def test_a_chat_template_jinja_refuses_is_a_clear_error(fails, tiny_chat_model, data, tmp_path, kind):
    """Before, Jinja's SecurityError or TemplateSyntaxError came out as a traceback, from loading the tokenizer."""
    template = tmp_path / "template.jinja"
    template.write_text(BROKEN_TEMPLATES[kind], encoding="utf-8")
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_cpu True --max_steps 1",
            "--report_to none --chat_template {template}",
            model=tiny_chat_model,
            data=data,
            out=tmp_path / "out",
            template=template,
        )
    )
    error = "SecurityError: access to attribute '__class__'" if kind == "sandbox" else "TemplateSyntaxError: unexpected"
    assert f"the chat template cannot render a one-turn conversation ({error}" in block


def test_deepspeed_without_a_launcher_is_refused_before_the_model_loads(
    fails, tiny_chat_model, data, tmp_path, monkeypatch
):
    """Before, DeepSpeed looked for MPI itself and failed with mpi4py's ImportError once the model had loaded."""
    import llmft.train

    for name in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(llmft.train, "build_model", lambda *args: pytest.fail("the model was loaded"))
    block = fails(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_cpu True --max_steps 1",
            "--report_to none --deepspeed {zero2}",
            model=tiny_chat_model,
            data=data,
            out=tmp_path / "out",
            zero2=REPO / "ds_configs" / "zero2.json",
        )
    )
    assert block.startswith(
        f"error: invalid settings (1):\n  - --deepspeed {REPO / 'ds_configs' / 'zero2.json'} runs in a process group "
        "that a launcher starts: use finetune/finetune_ds.sh"
    )
